"""Token-based length control measures responses with the policy tokenizer (issue 12, item 4)."""


import pytest

from megatron_tpo.data import SPECIFIC
from megatron_tpo.judge import Judge, Judgment, LengthControlConfig
from megatron_tpo.preference import build_iteration_data
from megatron_tpo.rollout import GenerationOutput

from tiny_hf import tiny_tokenizer  # a real (word-level) HF tokenizer


class FixedJudge(Judge):
    def __init__(self, scores):
        self.scores = scores

    def judge(self, prompts, responses):
        return Judgment(scores=[[self.scores[r] for r in group] for group in responses])


def test_token_length_control_counts_the_policy_tokenizers_tokens_not_characters():
    responses = ["the moon is here now", "a b c d e f g h", "sun is a cat"]
    # characters 20, 15, 12 but tokens 5, 8, 4: the order of the first two flips.
    outputs = [GenerationOutput("p", [f"t{i} <R>{r}" for i, r in enumerate(responses)],
                                [1] * 3)]
    judge = FixedJudge(dict(zip(responses, [0.0, 1.0, 2.0])))
    by_tokens = build_iteration_data(["q"], outputs, SPECIFIC, judge,
                                     LengthControlConfig(rho=1.0, unit="tokens"),
                                     tokenizer=tiny_tokenizer())
    assert [j["response_length"] for j in by_tokens.judgments] == [5, 8, 4]
    # By hand: z(score) = [-1.225, 0, 1.225]; z(tokens) = [-0.392, 1.373, -0.981], so
    # controlled = [-0.833, -1.373, 2.205]: the 8-token response is the rejected one.
    [pair] = by_tokens.pairs
    assert (pair["chosen_index"], pair["rejected_index"]) == (2, 1)
    assert pair["length_margin"] == 4 - 8
    assert pair["controlled_margin"] == pytest.approx(2.205 + 1.373, abs=2e-3)
    by_chars = build_iteration_data(["q"], outputs, SPECIFIC, judge,
                                    LengthControlConfig(rho=1.0, unit="chars"))
    assert [j["response_length"] for j in by_chars.judgments] == [20, 15, 12]
    # Characters would reject the other one: z(chars) = [1.313, -0.202, -1.111], so
    # controlled = [-2.538, 0.202, 2.336].
    [pair] = by_chars.pairs
    assert (pair["chosen_index"], pair["rejected_index"]) == (2, 0)
