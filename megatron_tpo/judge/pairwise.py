"""A pairwise LLM judge (Self-Taught-Evaluator style) generating through a RolloutEngine.

Every chosen pair of a prompt's responses is judged twice, once in each order, so a
judge that prefers whichever answer comes first gives both a win and cancels out. The
verdicts become per-response scores by win rate and by a Bradley-Terry fit.
"""

import dataclasses
import itertools
from collections import Counter
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from megatron_tpo.judge.base import Judge, Judgment, check_grouping
from megatron_tpo.judge.tournament import bradley_terry, win_rates
from megatron_tpo.judge.verdict import PAIRWISE_JUDGE_PROMPT, parse_verdict, render_judge_prompt
from megatron_tpo.rollout.engine import RolloutEngine, SamplingParams

SCORE_METHODS = ("bradley_terry", "win_rate")


class Verdict(NamedTuple):
    """One judge call: responses ``first`` and ``second`` of prompt ``prompt`` shown as A
    and B; ``verdict`` "A", "B" or None (unreadable); ``text`` what the judge wrote."""

    prompt: int
    first: int
    second: int
    verdict: Optional[str]
    text: str


def pairs_to_judge(count: int, max_pairs: Optional[int], rng: np.random.Generator
                   ) -> List[Tuple[int, int]]:
    """All unordered pairs of ``count`` responses, or a random ``max_pairs`` of them."""
    pairs = list(itertools.combinations(range(count), 2))
    if max_pairs is None or max_pairs >= len(pairs):
        return pairs
    chosen = rng.choice(len(pairs), size=max_pairs, replace=False)
    return [pairs[i] for i in sorted(chosen)]


class PairwiseJudge(Judge):
    """Generates its verdicts through ``engine``. ``own_engine``: the judge model's engine,
    which this judge puts to sleep, wakes and closes (None when it judges through the
    policy's engine, whose memory the run places)."""

    on_every_rank = True   # it generates through every rank's engine replica

    def __init__(self, engine: RolloutEngine, sampling: SamplingParams,
                 format_prompt: Callable[[str], str] = lambda text: text,
                 prompt_template: str = PAIRWISE_JUDGE_PROMPT,
                 score_method: str = "bradley_terry", max_pairs_per_prompt: Optional[int] = None,
                 bradley_terry_prior: float = 0.5, seed: int = 0,
                 own_engine: Optional[RolloutEngine] = None):
        if score_method not in SCORE_METHODS:
            raise ValueError(f"score_method={score_method!r}: must be one of {SCORE_METHODS}")
        self.engine, self.own_engine = engine, own_engine
        # One verdict per judge prompt; n > 1 would need a vote this judge does not do.
        self.sampling = dataclasses.replace(sampling, n=1)
        self.format_prompt = format_prompt
        self.prompt_template = prompt_template
        self.score_method = score_method
        self.max_pairs_per_prompt = max_pairs_per_prompt
        self.bradley_terry_prior = bradley_terry_prior
        self.seed = seed

    def sleep(self) -> None:
        if self.own_engine is not None:
            self.own_engine.sleep()

    def wake(self) -> None:
        if self.own_engine is not None:
            self.own_engine.wake()

    def close(self) -> None:
        if self.own_engine is not None:
            self.own_engine.close()

    def verdicts(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]
                 ) -> List[Verdict]:
        """Every judged pair of each prompt's responses, in both orders, with the judge's
        text and the verdict read from it (None when unreadable)."""
        check_grouping(prompts, responses)
        rng = np.random.default_rng(self.seed)
        # (prompt index, first shown, second shown) for every judge prompt, both orders.
        battles: List[Tuple[int, int, int]] = []
        for prompt_index, group in enumerate(responses):
            for i, j in pairs_to_judge(len(group), self.max_pairs_per_prompt, rng):
                battles += [(prompt_index, i, j), (prompt_index, j, i)]
        judge_prompts = [
            self.format_prompt(render_judge_prompt(self.prompt_template, prompts[p],
                                                   responses[p][a], responses[p][b]))
            for p, a, b in battles]
        outputs = self.engine.generate(judge_prompts, self.sampling) if judge_prompts else []
        if len(outputs) != len(battles):
            raise RuntimeError(f"the judge engine answered {len(outputs)} of "
                               f"{len(battles)} judge prompts")
        return [Verdict(p, a, b, parse_verdict(output.texts[0]), output.texts[0])
                for (p, a, b), output in zip(battles, outputs)]

    def judge(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Judgment:
        wins = [np.zeros((len(group), len(group))) for group in responses]
        verdicts = {}
        counts: Counter = Counter()
        for p, a, b, verdict, _ in self.verdicts(prompts, responses):
            counts["verdicts"] += 1
            if verdict is None:
                counts["unparseable_verdicts"] += 1
                wins[p][a, b] += 0.5
                wins[p][b, a] += 0.5
            else:
                winner, loser = (a, b) if verdict == "A" else (b, a)
                wins[p][winner, loser] += 1
            verdicts[(p, a, b)] = verdict
        for (p, a, b), verdict in verdicts.items():
            if a < b and verdict is not None and verdicts.get((p, b, a)) == verdict:
                # Same letter in both orders: the judge followed the position, not the content.
                counts["position_inconsistent_pairs"] += 1

        rates = [win_rates(w).tolist() for w in wins]
        strengths = [bradley_terry(w, prior=self.bradley_terry_prior).tolist() for w in wins]
        scores = strengths if self.score_method == "bradley_terry" else rates
        return Judgment(scores=scores, counts=counts,
                        extras={"win_rate": rates, "bradley_terry": strengths})
