"""The judgments stage: the judge scores the responses (never the thoughts) of the valid
samples, and each score is stored with the response's length for length control."""

from collections import Counter
from typing import List, Sequence, Tuple

from megatron_tpo.data.storage import JudgmentRow, RolloutRow
from megatron_tpo.judge.base import Judge
from megatron_tpo.judge.config import LengthControlConfig
from megatron_tpo.preference.parse import by_prompt, is_judged


def response_length(response: str, unit: str, tokenizer=None) -> int:
    if unit == "chars":
        return len(response)
    if tokenizer is None:
        raise ValueError("length_control.unit=tokens needs the policy tokenizer")
    return len(tokenizer(response, add_special_tokens=False)["input_ids"])


def judge_rollouts(rollouts: Sequence[RolloutRow], judge: Judge,
                   length_control: LengthControlConfig, tokenizer=None
                   ) -> Tuple[List[JudgmentRow], Counter]:
    """Score the responses (never the thoughts) of the valid samples, grouped by prompt."""
    groups = {prompt_id: [r for r in rows if is_judged(r)]
              for prompt_id, rows in by_prompt(rollouts).items()}
    instructions = [rows[0]["instruction"] for rows in by_prompt(rollouts).values()]
    judgment = judge.judge(instructions, [[r["response"] for r in g] for g in groups.values()])
    rows: List[JudgmentRow] = []
    for position_of_prompt, judged in enumerate(groups.values()):
        for position, sample in enumerate(judged):
            row = JudgmentRow(
                prompt_id=sample["prompt_id"], sample_index=sample["sample_index"],
                score=float(judgment.scores[position_of_prompt][position]),
                response_length=response_length(sample["response"], length_control.unit,
                                                tokenizer))
            row.update({name: values[position_of_prompt][position]
                        for name, values in judgment.extras.items()})
            rows.append(row)
    return rows, Counter(judgment.counts)
