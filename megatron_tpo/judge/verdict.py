"""The pairwise judge's prompt and the verdict it must end with."""

import re
from typing import Optional

# Written for this project in the style of the Self-Taught Evaluator's pairwise prompt:
# reason first, then a verdict in a fixed form that a regular expression can find.
PAIRWISE_JUDGE_PROMPT = """Please act as an impartial judge and evaluate the quality of the \
responses provided by two AI assistants to the user question displayed below. Choose the \
assistant that follows the user's instructions and answers the user's question better. \
Consider helpfulness, relevance, accuracy, depth, creativity and level of detail. Do not let \
the order in which the responses were presented, their length, or the names of the \
assistants influence your decision. First explain your evaluation briefly, then output your \
final verdict strictly in this format: "[[A]]" if assistant A is better, "[[B]]" if \
assistant B is better.

[User Question]
{instruction}

[The Start of Assistant A's Answer]
{response_a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{response_b}
[The End of Assistant B's Answer]"""

VERDICT_PATTERN = re.compile(r"\[\[([AB])\]\]")


def render_judge_prompt(template: str, instruction: str, response_a: str, response_b: str) -> str:
    # Plain replacement, not str.format: responses are model text full of braces.
    return (template.replace("{instruction}", instruction)
            .replace("{response_a}", response_a).replace("{response_b}", response_b))


def parse_verdict(text: str) -> Optional[str]:
    """"A" or "B" from the judge's output; ``None`` when absent or contradictory.

    A judge that names both verdicts (say, quoting the format, then deciding) is read as
    undecided rather than guessed at; such verdicts count as ties and are reported.
    """
    verdicts = set(VERDICT_PATTERN.findall(text))
    return verdicts.pop() if len(verdicts) == 1 else None
