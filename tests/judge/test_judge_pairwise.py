import re
from typing import Callable, List

import numpy as np
import pytest
import torch

from megatron_tpo.judge import PairwiseJudge, bradley_terry, parse_verdict, win_rates
from megatron_tpo.rollout import GenerationOutput, RolloutEngine, SamplingParams


GREEDY = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=16)


class ScriptedJudgeEngine(RolloutEngine):
    """Answers each judge prompt with ``verdict(response_a, response_b)``; records prompts."""

    def __init__(self, verdict: Callable[[str, str], str]):
        self.verdict = verdict
        self.prompts: List[str] = []

    def generate(self, prompts, sampling):
        self.prompts += list(prompts)
        outputs = []
        for prompt in prompts:
            a = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End", prompt, re.S).group(1)
            b = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End", prompt, re.S).group(1)
            outputs.append(GenerationOutput(prompt, [self.verdict(a, b)], [1]))
        return outputs

    def update_weights(self, stream):
        raise NotImplementedError


def quality(response: str) -> int:
    return response.count("!")


def bt_by_lbfgs(wins: np.ndarray, prior: float) -> np.ndarray:
    """Independent check: maximise the regularised BT log-likelihood with torch's L-BFGS."""
    count = len(wins)
    w = torch.tensor(np.where(~np.eye(count, dtype=bool), wins + prior, 0.0))
    theta = torch.zeros(count, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-14,
                                  tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        diff = theta[:, None] - theta[None, :]
        loss = -(w * torch.nn.functional.logsigmoid(diff)).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    result = theta.detach().numpy()
    return result - result.mean()


def test_bradley_terry_two_players_closed_form():
    # With prior a, the MLE satisfies p1/p2 = (w12 + a) / (w21 + a).
    strengths = bradley_terry(np.array([[0, 3], [1, 0]]), prior=0.5)
    assert strengths[0] - strengths[1] == pytest.approx(np.log(3.5 / 1.5), abs=1e-9)
    assert strengths.sum() == pytest.approx(0.0, abs=1e-12)


def test_bradley_terry_matches_lbfgs_with_an_undefeated_player():
    wins = np.array([[0, 2, 2, 2],      # player 0 never loses
                     [0, 0, 1, 2],
                     [0, 1, 0, 1.5],    # a tie adds 0.5 to both sides
                     [0, 0, 0.5, 0]], dtype=float)
    ours = bradley_terry(wins, prior=0.5)
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, bt_by_lbfgs(wins, 0.5), atol=1e-6)
    assert list(np.argsort(-ours)) == [0, 1, 2, 3]
    # every player played 6 games: wins 6, 3, 2.5, 0.5
    np.testing.assert_allclose(win_rates(wins), [6 / 6, 3 / 6, 2.5 / 6, 0.5 / 6])


def test_verdict_parsing():
    assert parse_verdict("Both are fine, but A is clearer. [[A]]") == "A"
    assert parse_verdict("final verdict: [[B]]") == "B"
    assert parse_verdict("[[A]] ... on reflection [[B]]") is None
    assert parse_verdict("A is better") is None


def test_pairwise_judge_all_pairs_both_orders():
    engine = ScriptedJudgeEngine(lambda a, b: "[[A]]" if quality(a) >= quality(b) else "[[B]]")
    judge = PairwiseJudge(engine, GREEDY, score_method="win_rate")
    responses = [["ok", "good!", "great!!"], ["x!", "y"]]
    judgment = judge.judge(["q1", "q2"], responses)
    # K=3: 3 pairs x 2 orders; K=2: 1 pair x 2 orders.
    assert len(engine.prompts) == 8 and judgment.counts["verdicts"] == 8
    assert judgment.scores == [[0.0, 0.5, 1.0], [1.0, 0.0]]
    bt = judgment.extras["bradley_terry"][0]
    expected = bt_by_lbfgs(np.array([[0, 0, 0], [2, 0, 0], [2, 2, 0]], float), 0.5)
    np.testing.assert_allclose(bt, expected, atol=1e-6)
    assert judgment.counts["unparseable_verdicts"] == 0


def test_position_bias_cancels_over_both_orders():
    # This judge says "A" unless B is better by at least 2 "!": for close pairs it only
    # follows the position. Qualities 0, 1, 3: pairs (0,1) close, (0,2) and (1,2) clear.
    def biased(a, b):
        return "[[B]]" if quality(b) - quality(a) >= 2 else "[[A]]"

    judge = PairwiseJudge(ScriptedJudgeEngine(biased), GREEDY, score_method="win_rate")
    judgment = judge.judge(["q"], [["a", "b!", "c!!!"]])
    # (0,1): one win each; (0,2), (1,2): 2 wins to response 2.
    # wins: r0 1 of 4, r1 1 of 4, r2 4 of 4.
    assert judgment.scores == [[0.25, 0.25, 1.0]]
    assert judgment.counts["position_inconsistent_pairs"] == 1

    always_a = PairwiseJudge(ScriptedJudgeEngine(lambda a, b: "[[A]]"), GREEDY)
    flat = always_a.judge(["q"], [["a", "b!", "c!!!"]])
    np.testing.assert_allclose(flat.scores[0], [0, 0, 0], atol=1e-12)
    assert flat.extras["win_rate"] == [[0.5, 0.5, 0.5]]
    assert flat.counts["position_inconsistent_pairs"] == 3


def test_unparseable_verdicts_are_ties_and_reported():
    calls = iter(["no idea", "[[A]]", "[[A]] or [[B]]", "[[B]]", "", "[[A]]"])
    judge = PairwiseJudge(ScriptedJudgeEngine(lambda a, b: next(calls)), GREEDY,
                          score_method="win_rate")
    judgment = judge.judge(["q"], [["r0", "r1", "r2"]])
    assert judgment.counts["unparseable_verdicts"] == 3
    # Battles in order: (0,1) tie, (1,0) A->1 wins, (0,2) tie, (2,0) B->0 wins,
    # (1,2) tie, (2,1) A->2 wins.  r0: 0.5+0.5+1 = 2 of 4; r1: 0.5+1+0.5 = 2; r2: 0.5+0.5+1 = 2
    assert judgment.scores == [[0.5, 0.5, 0.5]]


def test_subset_of_pairs_is_seeded_and_bounded():
    engine = ScriptedJudgeEngine(lambda a, b: "[[A]]")
    judge = PairwiseJudge(engine, GREEDY, max_pairs_per_prompt=4, seed=3)
    judge.judge(["q"], [[f"r{i}" for i in range(6)]])
    first = list(engine.prompts)
    assert len(first) == 8       # 4 of the 15 pairs, both orders
    engine.prompts.clear()
    judge.judge(["q"], [[f"r{i}" for i in range(6)]])
    assert engine.prompts == first


def test_judge_sees_only_responses_never_thoughts():
    from megatron_tpo.data import SPECIFIC, parse_outputs

    outputs = ["SECRET-THOUGHT-1 <R>answer one!", "SECRET-THOUGHT-2 <R>answer two"]
    parsed, _ = parse_outputs(outputs, SPECIFIC)
    engine = ScriptedJudgeEngine(lambda a, b: "[[A]]")
    PairwiseJudge(engine, GREEDY).judge(["q"], [[p.response for p in parsed]])
    assert engine.prompts and not any("SECRET" in prompt for prompt in engine.prompts)


def test_an_engine_that_drops_prompts_is_an_error():
    class Lossy(ScriptedJudgeEngine):
        def generate(self, prompts, sampling):
            return super().generate(prompts, sampling)[:-1]

    with pytest.raises(RuntimeError, match="answered 1 of 2 judge prompts"):
        PairwiseJudge(Lossy(lambda a, b: "[[A]]"), GREEDY).judge(["q"], [["a", "b"]])
