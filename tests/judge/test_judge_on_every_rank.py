"""A pairwise judge generates through engines whose ranks must all take part, so it runs
on every rank: its prompts are spread over the engine replicas (``EngineReplicas``), every
rank ends with the same judgment as one process judging alone, and a tensor-parallel
engine's ranks all see every prompt. In the loop, a two-rank run with the policy judging
itself stores a judgment of every battle, once."""

import json
import re

import pytest


from megatron_tpo.judge.pairwise import PairwiseJudge
from megatron_tpo.parallel.local_launch import spawn_local
from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine, SamplingParams
from tpo_fixtures import run_loop, stage_rows

pytestmark = pytest.mark.slow

PROMPTS = ["pick one", "which is best", "say more"]
RESPONSES = [["a", "bbb", "cc", "dddd"], ["xx", "y", "zzz", "wwwwww"], ["q", "rr", "sss", "t"]]
ANSWER = re.compile(r"Assistant A's Answer\]\n(.*)\n\[The End of Assistant A's Answer\].*"
                    r"Assistant B's Answer\]\n(.*)\n\[The End of Assistant B's Answer\]", re.S)


class ShorterWins(RolloutEngine):
    """A scripted judge model: the shorter answer wins (ties go to B); records its prompts."""

    def __init__(self):
        self.seen = []

    def generate(self, prompts, sampling):
        self.seen += list(prompts)
        outputs = []
        for prompt in prompts:
            a, b = ANSWER.search(prompt).groups()
            verdict = "[[A]]" if len(a) < len(b) else "[[B]]"
            outputs.append(GenerationOutput(prompt=prompt, texts=[verdict], num_tokens=[1]))
        return outputs

    def update_weights(self, stream):
        raise NotImplementedError


def _judge(engine):
    return PairwiseJudge(engine, SamplingParams(n=1, temperature=0.0), score_method="win_rate")


RANKS_PER_ENGINE = (1, 2)


def _spread_worker(rank, world_size):
    """Worker: for each of RANKS_PER_ENGINE, a fresh scripted judge behind EngineReplicas;
    the judgment's scores and counts, and the prompts this rank's engine saw."""
    import torch

    from megatron_tpo.rollout.replicas import EngineReplicas

    torch.distributed.init_process_group("gloo")
    reports = {}
    for ranks_per_engine in RANKS_PER_ENGINE:
        engine = ShorterWins()
        judgment = _judge(EngineReplicas(engine, ranks_per_engine)).judge(PROMPTS, RESPONSES)
        reports[ranks_per_engine] = judgment.scores, judgment.counts, engine.seen
    return reports


@pytest.fixture(scope="module")
def spread_reports():
    """One world of two ranks judging at every RANKS_PER_ENGINE."""
    return spawn_local(_spread_worker, 2)


@pytest.mark.parametrize("ranks_per_engine", RANKS_PER_ENGINE)
def test_a_pairwise_judge_on_every_rank_equals_one_judging_alone(spread_reports,
                                                                   ranks_per_engine):
    alone_engine = ShorterWins()
    alone = _judge(alone_engine).judge(PROMPTS, RESPONSES)
    # The script is decisive: the shortest answer of each prompt wins every game.
    assert alone.scores[0][0] == 1.0 and alone.scores[1][1] == 1.0
    reports = [report[ranks_per_engine] for report in spread_reports]
    everything = sorted(alone_engine.seen)
    assert len(everything) == 3 * 12   # 6 pairs per prompt, both orders
    for scores, counts, _ in reports:
        assert scores == alone.scores and counts == alone.counts
    seen = [sorted(report[2]) for report in reports]
    if ranks_per_engine == 1:   # two replicas: each judges its own half
        assert len(seen[0]) == len(seen[1]) == 18
        assert sorted(seen[0] + seen[1]) == everything
    else:                       # one engine over both ranks: both get every prompt
        assert seen[0] == seen[1] == everything


def test_the_loop_judges_pairwise_on_every_rank(tmp_path):
    # Two ranks, two HF replicas of the policy, which judges its own samples.
    run_loop(tmp_path, world_size=2, extra=[
        "judge=pairwise", "judge.pairwise.sampling.max_new_tokens=4",
        "judge.pairwise.max_pairs_per_prompt=2"])
    judged = stage_rows(tmp_path / "run", 0, "judgments")
    per_instruction = {}
    for row in judged:
        per_instruction[row["prompt_id"]] = per_instruction.get(row["prompt_id"], 0) + 1
    assert len(per_instruction) > 1 and len(judged) > len(per_instruction)
    manifest = tmp_path / "run" / "stages" / "iteration_000" / "judgments.manifest.json"
    # At most two pairs per instruction, each judged in both orders: every battle once.
    battles = sum(2 * min(2, k * (k - 1) // 2) for k in per_instruction.values())
    assert json.loads(manifest.read_text())["counts"]["verdicts"] == battles
