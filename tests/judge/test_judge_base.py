"""judge/base.py: the seam every judge implements. Scores come grouped by the prompt they
answer, and a mismatched grouping is refused before any judging; a judge that holds no
accelerator memory may ignore the placement's sleep/wake/close calls; only the judges
that compute on every rank say so."""

from collections import Counter

import pytest

from megatron_tpo.judge import ExactAnswerJudge, FormatJudge, PairwiseJudge, RewardModelJudge
from megatron_tpo.judge.base import Judge, Judgment, check_grouping


class LengthJudge(Judge):
    """Scores each response by its length; counts the empty ones."""

    def judge(self, prompts, responses):
        check_grouping(prompts, responses)
        judgment = Judgment(scores=[[float(len(r)) for r in group] for group in responses])
        judgment.counts["empty"] = sum(not r for group in responses for r in group)
        return judgment


def test_a_judge_must_say_how_it_judges():
    class NoJudging(Judge):
        pass

    with pytest.raises(TypeError, match="abstract"):
        NoJudging()


def test_score_is_the_judgments_scores_in_the_groups_order():
    prompts, responses = ["a", "b"], [["xyz", ""], ["wxyz"]]
    judgment = LengthJudge().judge(prompts, responses)
    assert LengthJudge().score(prompts, responses) == judgment.scores == [[3.0, 0.0], [4.0]]
    assert judgment.counts == Counter(empty=1) and judgment.extras == {}


def test_judgments_do_not_share_their_counts_or_extras():
    first, second = Judgment(scores=[]), Judgment(scores=[])
    first.counts["unparseable_verdicts"] += 1
    first.extras["win_rate"] = [[0.5]]
    assert second.counts == Counter() and second.extras == {}


def test_a_mismatched_grouping_is_refused_naming_both_counts():
    check_grouping(["a", "b"], [["x"], []])   # an empty group is still a group
    with pytest.raises(ValueError) as refused:
        check_grouping(["a", "b", "c"], [["x"], ["y"]])
    assert str(refused.value) == "3 prompts but 2 groups of responses"
    for judge in (LengthJudge(), FormatJudge(r"\d"), ExactAnswerJudge({"a": "1"})):
        with pytest.raises(ValueError, match="1 prompts but 2 groups of responses"):
            judge.judge(["a"], [["1"], ["2"]])


def test_a_judge_holding_nothing_ignores_sleep_wake_and_close():
    judge = LengthJudge()
    assert (judge.sleep(), judge.wake(), judge.close()) == (None, None, None)
    assert judge.score(["a"], [["xy"]]) == [[2.0]]   # still judges after all three


def test_rule_judges_judge_on_rank_zero_model_judges_on_every_rank():
    assert Judge.on_every_rank is False
    assert not FormatJudge.on_every_rank and not ExactAnswerJudge.on_every_rank
    assert PairwiseJudge.on_every_rank and RewardModelJudge.on_every_rank
