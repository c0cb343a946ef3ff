"""Which pairs each data-parallel rank trains on at each DPO step.

The schedule is checked against the walk it documents, built independently here: the
pairs in the order of one seeded permutation per epoch, epoch after epoch, cut into
consecutive global batches, each split into contiguous DP-rank shares. megatron's
parallel_state getters are faked per rank, as each rank of a real run would see them.
"""

import numpy as np
import pytest

from megatron_tpo.train.pair_schedule import global_batch_indices, pairs_for_step

NUM_PAIRS, BATCH_SIZE, SEED = 10, 4, 3
# 40 batch positions: four epochs of 10 pairs, and steps 2 and 7 straddle an epoch end.
STEPS = 10


def seeded_epoch_walk(num_pairs: int, epochs: int, seed: int) -> np.ndarray:
    """Pair indices in training order: epoch e is rng([seed, e])'s permutation."""
    return np.concatenate([np.random.default_rng([seed, epoch]).permutation(num_pairs)
                           for epoch in range(epochs)])


def shares_of_every_rank(monkeypatch, pairs, ranks: int, step: int, seed: int = SEED):
    """``pairs_for_step`` as each of ``ranks`` data-parallel ranks computes it."""
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: ranks)
    shares = []
    for rank in range(ranks):
        monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: rank)
        shares.append(pairs_for_step(pairs, BATCH_SIZE, step, seed))
    return shares


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_dp_ranks_take_contiguous_shares_of_the_seeded_epoch_walk(monkeypatch, ranks):
    pairs = [f"pair {index}" for index in range(NUM_PAIRS)]
    walk = seeded_epoch_walk(NUM_PAIRS, epochs=BATCH_SIZE * STEPS // NUM_PAIRS, seed=SEED)
    share = BATCH_SIZE // ranks
    for step in range(STEPS):
        batch = walk[step * BATCH_SIZE:(step + 1) * BATCH_SIZE].tolist()
        assert global_batch_indices(NUM_PAIRS, BATCH_SIZE, step, SEED) == batch
        shares = shares_of_every_rank(monkeypatch, pairs, ranks, step)
        for rank, got in enumerate(shares):
            assert got == [pairs[i] for i in batch[rank * share:(rank + 1) * share]], (step, rank)
        # Together the ranks train on the step's whole global batch, each pair once.
        assert sum(shares, []) == [pairs[i] for i in batch]


def test_every_epoch_trains_on_every_pair_once_and_the_seed_picks_the_order():
    positions = [index for step in range(STEPS)
                 for index in global_batch_indices(NUM_PAIRS, BATCH_SIZE, step, SEED)]
    epochs = [positions[start:start + NUM_PAIRS] for start in range(0, len(positions), NUM_PAIRS)]
    assert len(epochs) == 4
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM_PAIRS))
    # Shuffled anew each epoch, not one order repeated, and not the identity.
    assert len({tuple(epoch) for epoch in epochs}) == 4
    assert epochs[0] != list(range(NUM_PAIRS))
    other_seed = [index for step in range(STEPS)
                  for index in global_batch_indices(NUM_PAIRS, BATCH_SIZE, step, SEED + 1)]
    assert other_seed != positions and sorted(other_seed) == sorted(positions)


def test_a_step_batch_depends_on_seed_and_step_alone(monkeypatch):
    # A resumed run asks for step 7 first; it gets what the uninterrupted run got there.
    pairs = list(range(NUM_PAIRS))
    resumed = shares_of_every_rank(monkeypatch, pairs, 2, step=7)
    for step in range(7):
        shares_of_every_rank(monkeypatch, pairs, 2, step)
    assert shares_of_every_rank(monkeypatch, pairs, 2, step=7) == resumed
    with pytest.raises(ValueError, match="no preference pairs"):
        global_batch_indices(0, BATCH_SIZE, 0, SEED)
