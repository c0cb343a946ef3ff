"""Rule judges for verifiable tasks: no model, a check that is right or wrong."""

import re
from typing import Mapping, Optional, Sequence

from megatron_tpo.judge.base import Judge, Judgment, check_grouping


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".")


class ExactAnswerJudge(Judge):
    """1 when the response's answer equals the reference answer of its instruction, else 0.

    The answer is the first capture group of ``answer_pattern`` (its last match in the
    response), or the whole response without a pattern; case and spacing are ignored.
    """

    def __init__(self, answers: Mapping[str, str], answer_pattern: Optional[str] = None):
        self.answers = {prompt: normalise_answer(answer) for prompt, answer in answers.items()}
        self.answer_pattern = re.compile(answer_pattern) if answer_pattern else None

    def extract_answer(self, response: str) -> Optional[str]:
        if self.answer_pattern is None:
            return normalise_answer(response)
        matches = self.answer_pattern.findall(response)
        return normalise_answer(matches[-1]) if matches else None

    def judge(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Judgment:
        check_grouping(prompts, responses)
        missing = [prompt for prompt in prompts if prompt not in self.answers]
        if missing:
            raise KeyError(f"no reference answer for {len(missing)} instruction(s), first: "
                           f"{missing[0][:80]!r}")
        judgment = Judgment(scores=[])
        for prompt, group in zip(prompts, responses):
            row = []
            for response in group:
                answer = self.extract_answer(response)
                if answer is None:
                    judgment.counts["no_answer_found"] += 1
                row.append(float(answer is not None and answer == self.answers[prompt]))
            judgment.scores.append(row)
        return judgment


class FormatJudge(Judge):
    """1 when the response matches ``pattern`` (``re.search``) and fits ``max_chars``, else 0."""

    def __init__(self, pattern: str, max_chars: Optional[int] = None):
        self.pattern = re.compile(pattern, re.DOTALL)
        self.max_chars = max_chars

    def follows_format(self, response: str) -> bool:
        if self.max_chars is not None and len(response) > self.max_chars:
            return False
        return self.pattern.search(response) is not None

    def judge(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Judgment:
        check_grouping(prompts, responses)
        return Judgment(scores=[[float(self.follows_format(r)) for r in group]
                                for group in responses])
