"""rollout/memory.py: the most bytes a piece of code held at once beyond what it started
with, measured (on CPU from the profiler's allocation events, in time order): blocks
alive together add up, a block freed before the next is allocated does not, and freeing
memory that existed before the code ran gives it no credit."""

import torch

from megatron_tpo.rollout.memory import peak_extra_bytes

MIB = 1024 * 1024
CPU = torch.device("cpu")


def _floats(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes // 4, dtype=torch.float32)


def test_blocks_alive_together_add_up_and_the_result_comes_back():
    def together():
        first, second = _floats(1 * MIB), _floats(2 * MIB)
        return first.numel() + second.numel()

    result, peak = peak_extra_bytes(together, CPU)
    assert result == 3 * MIB // 4
    assert 3 * MIB <= peak < 3 * MIB + 64 * 1024   # a little bookkeeping at most


def test_a_block_freed_before_the_next_is_not_counted_twice():
    def one_after_the_other():
        first = _floats(2 * MIB)
        del first
        second = _floats(1 * MIB)
        del second

    _, peak = peak_extra_bytes(one_after_the_other, CPU)
    assert 2 * MIB <= peak < 2 * MIB + 64 * 1024


def test_freeing_what_existed_before_lowers_nothing():
    held = [_floats(4 * MIB)]

    def free_then_allocate():
        held.pop()                 # 4 MiB the code did not allocate
        return _floats(1 * MIB).numel()

    _, peak = peak_extra_bytes(free_then_allocate, CPU)
    assert 1 * MIB <= peak < 1 * MIB + 64 * 1024


def test_code_that_allocates_nothing_peaks_at_nothing():
    assert peak_extra_bytes(lambda: "done", CPU) == ("done", 0)
