"""Split a policy output into its hidden thought and the response the judge sees.

Outputs that do not follow the template are never guessed at: they are counted under
the reason they failed and dropped, so a judge never scores a thought by mistake.
"""

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import List, Optional, Sequence, Tuple

from megatron_tpo.data.config import ThoughtTemplate


class ParseFailure(str, Enum):
    NO_RESPONSE_MARKER = "no_response_marker"
    REPEATED_RESPONSE_MARKER = "repeated_response_marker"
    EMPTY_RESPONSE = "empty_response"


@dataclass(frozen=True)
class ThoughtResponse:
    thought: str
    response: str


class ParseError(ValueError):
    def __init__(self, reason: ParseFailure):
        super().__init__(reason.value)
        self.reason = reason


def parse_thought_response(text: str, template: ThoughtTemplate) -> ThoughtResponse:
    """Thought and response of ``text``; raises ``ParseError`` with the failure reason."""
    marker = template.response_marker
    if marker is None:  # a direct response: nothing to split off
        if not text.strip():
            raise ParseError(ParseFailure.EMPTY_RESPONSE)
        return ThoughtResponse(thought="", response=text.strip())
    occurrences = text.count(marker)
    if occurrences == 0:
        raise ParseError(ParseFailure.NO_RESPONSE_MARKER)
    # A second marker means the model wrote a second answer (or quoted the marker); which
    # part is "the response" is ambiguous, so the output is rejected.
    if occurrences > 1:
        raise ParseError(ParseFailure.REPEATED_RESPONSE_MARKER)
    thought, response = text.split(marker)
    thought, response = thought.strip(), response.strip()
    if not response:
        raise ParseError(ParseFailure.EMPTY_RESPONSE)
    if template.thought_marker and thought.startswith(template.thought_marker):
        thought = thought[len(template.thought_marker):].strip()
    return ThoughtResponse(thought=thought, response=response)


def parse_outputs(texts: Sequence[str], template: ThoughtTemplate
                  ) -> Tuple[List[Optional[ThoughtResponse]], Counter]:
    """Parse every output; failures become ``None`` and are counted by reason."""
    parsed: List[Optional[ThoughtResponse]] = []
    failures: Counter = Counter()
    for text in texts:
        try:
            parsed.append(parse_thought_response(text, template))
        except ParseError as error:
            parsed.append(None)
            failures[error.reason.value] += 1
    return parsed, failures
