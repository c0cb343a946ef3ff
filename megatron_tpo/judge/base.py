"""The judge seam: scores for responses only, grouped by the prompt they answer."""

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence


@dataclass
class Judgment:
    """``scores[i][k]`` scores ``responses[i][k]``; ``counts`` reports what went wrong."""

    scores: List[List[float]]
    counts: Counter = field(default_factory=Counter)
    # Judge-specific per-response values to store beside the score (e.g. win rates).
    extras: Dict[str, List[List[Any]]] = field(default_factory=dict)


class Judge(ABC):
    # Whether every rank takes part in ``judge`` (with the same texts), or rank 0 judges
    # alone (a rule judge); the loop's judging stage runs where the judge does.
    on_every_rank: bool = False

    @abstractmethod
    def judge(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Judgment:
        """Judge ``responses[i]``, the parsed responses to instruction ``prompts[i]``."""

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]
              ) -> List[List[float]]:
        return self.judge(prompts, responses).scores

    # A judge with accelerator memory of its own (a reward model, a judge model's engine)
    # releases it between judging phases. The run's placement calls these as the loop
    # enters its phases; a judge that holds nothing (a rule) ignores them.
    def sleep(self) -> None:
        """Release this judge's accelerator memory until ``wake``."""

    def wake(self) -> None:
        """Be ready to judge on the accelerator."""

    def close(self) -> None:
        """Release what this judge owns (its engine) before the process group goes."""


def check_grouping(prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} groups of responses")
