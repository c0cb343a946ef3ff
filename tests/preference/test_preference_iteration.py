import pytest

from megatron_tpo.data import SPECIFIC, IterationStore
from megatron_tpo.judge import Judge, Judgment, LengthControlConfig
from megatron_tpo.preference import PreferenceConfig, build_iteration_data, iteration_summary
from megatron_tpo.rollout import GenerationOutput


class ExclamationJudge(Judge):
    """Scores a response by its number of "!"; records what it was shown."""

    def __init__(self):
        self.seen = []

    def judge(self, prompts, responses):
        self.seen.append((list(prompts), [list(g) for g in responses]))
        return Judgment(scores=[[float(r.count("!")) for r in g] for g in responses],
                        extras={"bangs": [[r.count("!") for r in g] for g in responses]})


OUTPUTS = [
    GenerationOutput("<chat>q0", ["t0 <R>ok!", "t1 no marker", "t2 <R>great!!!", "t3 <R>meh"],
                     [3, 3, 3, 3]),
    GenerationOutput("<chat>q1", ["only <R>one!", "<R>"], [2, 1]),
    GenerationOutput("<chat>q2", ["a<R>same!", "b<R>same!"], [2, 2]),
]


def test_rollouts_to_pairs():
    judge = ExclamationJudge()
    data = build_iteration_data(["q0", "q1", "q2"], OUTPUTS, SPECIFIC, judge,
                                LengthControlConfig(rho=0.0, unit="chars"))
    # The judge saw the parsed responses only, grouped by instruction.
    assert judge.seen == [(["q0", "q1", "q2"],
                           [["ok!", "great!!!", "meh"], ["one!"], ["same!", "same!"]])]
    assert data.counts == {"no_response_marker": 1, "empty_response": 1,
                           "fewer_than_two_parsed": 1, "all_scores_equal": 1}
    assert len(data.rollouts) == 8
    assert [r["parse_ok"] for r in data.rollouts[:4]] == [True, False, True, True]
    assert [(j["prompt_id"], j["sample_index"], j["score"], j["bangs"]) for j in data.judgments][:3] \
        == [(0, 0, 1.0, 1), (0, 2, 3.0, 3), (0, 3, 0.0, 0)]
    [pair] = data.pairs
    assert (pair["chosen"], pair["rejected"]) == ("t2 <R>great!!!", "t3 <R>meh")
    assert (pair["chosen_index"], pair["rejected_index"]) == (2, 3)
    assert pair["prompt_text"] == "<chat>q0"
    assert pair["score_margin"] == 3.0
    assert pair["length_margin"] == len("great!!!") - len("meh")

    summary = iteration_summary(data)
    assert summary["samples"] == 8 and summary["parse_rate"] == 6 / 8
    assert summary["mean_score"] == pytest.approx((1 + 3 + 0 + 1 + 1 + 1) / 6)
    # parsed responses: ok! great!!! meh one! same! same!
    assert summary["mean_response_length"] == pytest.approx((3 + 8 + 3 + 4 + 5 + 5) / 6)
    # parsed thoughts: t0 t2 t3 only a b
    assert summary["mean_thought_chars"] == pytest.approx((2 + 2 + 2 + 4 + 1 + 1) / 6)
    assert (summary["pairs"], summary["mean_score_margin"], summary["mean_length_margin"]) == \
        (1, 3.0, 5.0)


def test_length_control_changes_the_pair_and_stages_store(tmp_path):
    outputs = [GenerationOutput("p", ["<R>good!", "<R>" + "long! " * 30 + "!", "<R>bad"], [1] * 3)]
    lc = LengthControlConfig(rho=2.0, unit="chars")
    data = build_iteration_data(["q"], outputs, SPECIFIC, ExclamationJudge(), lc)
    # Scores 1, 31, 0; the long response's length z-score (1.41) times rho=2 outweighs
    # its score z-score (1.41), so the short "good!" is chosen.
    assert (data.pairs[0]["chosen_index"], data.pairs[0]["rejected_index"]) == (0, 1)
    uncontrolled = build_iteration_data(["q"], outputs, SPECIFIC, ExclamationJudge(),
                                        LengthControlConfig(rho=0.0, unit="chars"))
    assert (uncontrolled.pairs[0]["chosen_index"], uncontrolled.pairs[0]["rejected_index"]) == (1, 2)

    store = IterationStore(tmp_path)
    for stage in ("rollouts", "judgments", "pairs"):
        store.write(0, stage, getattr(data, stage), seed=0, config_digest="d",
                    counts=data.counts)
        assert store.read(0, stage) == getattr(data, stage)


def test_token_lengths_need_a_tokenizer():
    with pytest.raises(ValueError, match="needs the policy tokenizer"):
        build_iteration_data(["q"], [GenerationOutput("p", ["<R>a", "<R>b"], [1, 1])], SPECIFIC,
                             ExclamationJudge(), LengthControlConfig(rho=0.1, unit="tokens"))


# Sample 1 of each prompt hit max_new_tokens: it parses, and its many "!" would make it
# the best response if the judge ever saw it. Prompt 1 has one complete, parsed sample
# beside it and a parse failure; prompt 2 has no complete, parsed sample at all.
TRUNCATED_OUTPUTS = [
    GenerationOutput("<chat>q0", ["t0 <R>ok!", "t1 <R>cut off!!!!!", "t2 <R>fine!!"], [3, 3, 3],
                     finish_reasons=["stop", "length", "stop"]),
    GenerationOutput("<chat>q1", ["t0 <R>alone!", "t1 <R>long!!!!!!", "no marker"], [3, 3, 2],
                     finish_reasons=["stop", "length", "stop"]),
    GenerationOutput("<chat>q2", ["no marker", "t1 <R>cut!!!!!!!"], [2, 3],
                     finish_reasons=["stop", "length"]),
]


@pytest.mark.parametrize("parse_failures, truncated, expected_pairs", [
    # (prompt_id, chosen_index, rejected_index, rejected_reason) per pair.
    ("drop", "drop", [(0, 2, 0, "judged")]),
    ("drop", "reject", [(0, 2, 1, "truncated"), (1, 0, 1, "truncated")]),
    ("reject", "drop", [(0, 2, 0, "judged"), (1, 0, 2, "parse_failure")]),
    # The first invalid sample of a prompt is the rejected one.
    ("reject", "reject", [(0, 2, 1, "truncated"), (1, 0, 1, "truncated")]),
])
def test_the_judge_sees_complete_responses_only_and_invalid_ones_may_be_rejected(
        parse_failures, truncated, expected_pairs):
    judge = ExclamationJudge()
    preference = PreferenceConfig(parse_failures=parse_failures, truncated=truncated)
    data = build_iteration_data(["q0", "q1", "q2"], TRUNCATED_OUTPUTS, SPECIFIC, judge,
                                LengthControlConfig(rho=0.0, unit="chars"),
                                preference=preference)
    assert judge.seen == [(["q0", "q1", "q2"], [["ok!", "fine!!"], ["alone!"], []])]
    assert [(j["prompt_id"], j["sample_index"]) for j in data.judgments] == [(0, 0), (0, 2),
                                                                            (1, 0)]
    assert [(p["prompt_id"], p["chosen_index"], p["rejected_index"], p["rejected_reason"])
            for p in data.pairs] == expected_pairs
    for pair in data.pairs:
        outputs = TRUNCATED_OUTPUTS[pair["prompt_id"]].texts
        assert (pair["chosen"], pair["rejected"]) == (outputs[pair["chosen_index"]],
                                                      outputs[pair["rejected_index"]])
    # Prompt 2 has nothing judged to choose, whatever may be rejected.
    assert data.counts["fewer_than_two_parsed"] == 3 - len(expected_pairs)
    assert data.counts["truncated"] == 3
