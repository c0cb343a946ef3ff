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


def test_an_invalid_output_is_rejected_beside_a_single_judged_one():
    one_judged = PromptSamples(prompt_id=4, sample_indices=[2], scores=[0.3], lengths=[12])
    pair, reason = select_pair(one_judged, rho=0.5, rejectable=[3, 0])
    assert reason is None
    assert (pair.prompt_id, pair.chosen_index, pair.rejected_index) == (4, 2, 3)
    assert pair.chosen_score == 0.3
    # The rejected output was never judged: it has no score, so no margins either.
    assert (pair.rejected_score, pair.score_margin, pair.length_margin,
            pair.controlled_margin) == (None, None, None, None)
    # Without a judged output there is nothing to choose.
    nothing_judged = PromptSamples(prompt_id=5, sample_indices=[], scores=[], lengths=[])
    assert select_pair(nothing_judged, rho=0.5, rejectable=[0, 1]) == (
        None, "fewer_than_two_parsed")


def test_with_an_invalid_output_equal_scores_still_pair_and_length_control_chooses():
    # Equal scores: z(score) = 0 for all, so the shortest response (index 6) wins on
    # length alone; the invalid output is the rejected one, not the longest judged one.
    samples = PromptSamples(prompt_id=1, sample_indices=[0, 6, 4], scores=[0.5, 0.5, 0.5],
                            lengths=[30, 10, 20])
    pair, _ = select_pair(samples, rho=0.5, rejectable=[5, 2])
    assert (pair.chosen_index, pair.rejected_index) == (6, 5)
    assert select_pair(samples, rho=0.5) == (None, "all_scores_equal")
