"""The rollouts stage: every sample of every prompt as a stored row with its parse.

Only *valid* samples are judged: parsed, and not cut at ``max_new_tokens``.
"""

from collections import Counter, defaultdict
from typing import Dict, List, Sequence, Tuple

from megatron_tpo.data.config import ThoughtTemplate
from megatron_tpo.data.parsing import ParseError, parse_thought_response
from megatron_tpo.data.storage import RolloutRow
from megatron_tpo.rollout.engine import GenerationOutput


def is_judged(row: RolloutRow) -> bool:
    return row["parse_ok"] and row["finish_reason"] != "length"


def rollout_rows(instructions: Sequence[str], outputs: Sequence[GenerationOutput],
                 template: ThoughtTemplate) -> Tuple[List[RolloutRow], Counter]:
    """``outputs[i]`` holds the K samples of ``instructions[i]``; every sample becomes a
    row with its token ids and its parse, failures counted by reason."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    rows: List[RolloutRow] = []
    failures: Counter = Counter()
    for prompt_id, (instruction, output) in enumerate(zip(instructions, outputs)):
        # Outputs built by hand (tests, external samples) may carry text only.
        token_ids = output.token_ids or [[] for _ in output.texts]
        finish_reasons = output.finish_reasons or ["stop" for _ in output.texts]
        for sample_index, text in enumerate(output.texts):
            try:
                parsed, failure = parse_thought_response(text, template), None
            except ParseError as error:
                parsed, failure = None, error.reason.value
                failures[failure] += 1
            if finish_reasons[sample_index] == "length":
                failures["truncated"] += 1
            rows.append(RolloutRow(
                prompt_id=prompt_id, sample_index=sample_index, instruction=instruction,
                prompt_text=output.prompt, prompt_token_ids=list(output.prompt_token_ids),
                output=text, output_token_ids=list(token_ids[sample_index]),
                finish_reason=finish_reasons[sample_index],
                thought=parsed.thought if parsed else None,
                response=parsed.response if parsed else None,
                parse_ok=parsed is not None, parse_failure=failure))
    return rows, failures


def by_prompt(rows: Sequence[Dict]) -> Dict[int, List[Dict]]:
    grouped: Dict[int, List[Dict]] = defaultdict(list)
    for row in rows:
        grouped[row["prompt_id"]].append(row)
    return dict(sorted(grouped.items()))
