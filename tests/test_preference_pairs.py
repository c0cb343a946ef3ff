import numpy as np
import pytest

from megatron_tpo.preference import (PromptSamples, length_controlled_scores, select_pair,
                                     select_pairs)


def test_length_controlled_scores_by_hand():
    # scores 1, 2, 3: mean 2, population std sqrt(2/3) -> z = -1.2247, 0, 1.2247
    # lengths 10, 10, 40: mean 20, std sqrt(200) = 14.142 -> z = -0.7071, -0.7071, 1.4142
    controlled = length_controlled_scores([1, 2, 3], [10, 10, 40], rho=0.5)
    expected = [-1.224744871 + 0.353553391, 0 + 0.353553391, 1.224744871 - 0.707106781]
    np.testing.assert_allclose(controlled, expected, atol=1e-9)


def test_zero_std_counts_as_one():
    # Equal lengths: z(length) = 0, so rho has no effect; equal scores give zeros.
    np.testing.assert_allclose(length_controlled_scores([0.0, 2.0], [5, 5], rho=0.5), [-1, 1])
    np.testing.assert_allclose(length_controlled_scores([3, 3], [1, 3], rho=0.0), [0, 0])


def test_length_control_can_flip_the_chosen_response():
    # Sample 2 has the best score but is far longer; with rho=1 sample 1 wins.
    samples = PromptSamples(prompt_id=7, sample_indices=[0, 3, 5], scores=[1.0, 2.0, 2.2],
                            lengths=[100, 100, 400])
    no_control, _ = select_pair(samples, rho=0.0)
    assert (no_control.chosen_index, no_control.rejected_index) == (5, 0)
    controlled, _ = select_pair(samples, rho=1.0)
    # scores: mean 1.7333, population std 0.52493 -> z = [-1.3970, 0.5080, 0.8890]
    # lengths: z = [-0.7071, -0.7071, 1.4142]
    # controlled = [-0.6899, 1.2151, -0.5252] -> chosen 3 (index 1), rejected 0
    assert (controlled.chosen_index, controlled.rejected_index) == (3, 0)
    assert controlled.score_margin == pytest.approx(1.0)
    assert controlled.length_margin == pytest.approx(0.0)
    assert controlled.controlled_margin == pytest.approx(1.2151 + 0.6899, abs=1e-4)
    assert (controlled.chosen_score, controlled.rejected_score) == (2.0, 1.0)


def test_select_pairs_skips_and_counts():
    prompts = [
        PromptSamples(0, [0, 1], [0.1, 0.9], [10, 30]),
        PromptSamples(1, [2], [0.5], [10]),                 # one parsed output
        PromptSamples(2, [0, 1, 2], [0.4, 0.4, 0.4], [1, 2, 3]),  # all equal
        PromptSamples(3, [], [], []),
    ]
    pairs, skipped = select_pairs(prompts, rho=0.0)
    assert [(p.prompt_id, p.chosen_index, p.rejected_index) for p in pairs] == [(0, 1, 0)]
    assert pairs[0].length_margin == 20
    assert pairs[0].score_margin == pytest.approx(0.8)
    assert skipped == {"fewer_than_two_parsed": 2, "all_scores_equal": 1}


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="3 scores but 2 lengths"):
        length_controlled_scores([1, 2, 3], [1, 2], rho=0.1)
