"""checkpoint/rng.py: a captured state, through JSON and back, makes python's random,
numpy and torch CPU draw the same next numbers again."""

import json
import random

import numpy as np
import torch

from megatron_tpo.checkpoint.rng import capture_rng_state, restore_rng_state


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.standard_normal(), torch.rand(4).tolist(), torch.randn(2).tolist())


def test_restore_gives_the_same_next_random_numbers_after_a_json_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()   # a mid-stream state: gauss and numpy's cached normal may be pending
    random.gauss(0, 1)
    state = json.loads(json.dumps(capture_rng_state()))   # what the RNG file holds
    wanted = _draws()
    _draws()   # move every generator on
    restore_rng_state(state)
    assert _draws() == wanted


def test_a_restored_state_differs_from_a_fresh_seed():
    """The check above is not vacuous: other states give other numbers."""
    torch.manual_seed(3)
    state = capture_rng_state()
    first = torch.rand(4).tolist()
    restore_rng_state(state)
    torch.manual_seed(4)
    assert torch.rand(4).tolist() != first
