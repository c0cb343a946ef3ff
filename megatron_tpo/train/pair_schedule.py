"""Which preference pairs each DPO step trains on, on this data-parallel rank.

An iteration yields however many pairs its prompts gave; training runs a fixed number
of steps over them, walking one seeded shuffle after another (an epoch each), so a
step's batch is a function of (seed, step) alone and a resumed run continues exactly.
"""

from typing import List, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def global_batch_indices(num_pairs: int, batch_size: int, step: int, seed: int) -> List[int]:
    """Indices of the ``batch_size`` pairs of ``step`` over all data-parallel ranks."""
    if num_pairs < 1:
        raise ValueError("no preference pairs to train on")
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_pairs)
        order = np.random.default_rng([seed, epoch]).permutation(num_pairs)
        indices.append(int(order[offset]))
    return indices


def pairs_for_step(pairs: Sequence[T], batch_size: int, step: int, seed: int) -> List[T]:
    """This data-parallel rank's contiguous share of the step's global batch."""
    from megatron.core import parallel_state

    rank = parallel_state.get_data_parallel_rank()
    # megatron answers 0 without a process group: one process (the dry run) is one rank.
    ranks = parallel_state.get_data_parallel_world_size() or 1
    indices = global_batch_indices(len(pairs), batch_size, step, seed)
    share = batch_size // ranks
    return [pairs[i] for i in indices[rank * share:(rank + 1) * share]]
