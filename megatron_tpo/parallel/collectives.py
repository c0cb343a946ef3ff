"""The few collectives the TPO loop needs beyond megatron's own: who is rank 0, one
decision for all ranks, waiting for work rank 0 does alone, and seeds every rank computes
alike without talking. Tensors and ranks only: generation spread over engine replicas is
``rollout.replicas``'s."""

import hashlib
import itertools
import time
from typing import Callable, TypeVar

import torch

T = TypeVar("T")
# The waiting ranks look at the store this often at most: a long wait costs the store
# almost nothing, a short one (most are) ends within milliseconds of rank 0's answer.
_LONGEST_POLL_SECONDS = 1.0
# The n-th wait of this process: every rank waits in the same order, as for any collective.
_waits = itertools.count()


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when work rank 0 did alone failed, outlasted its bound,
    or when rank 0 went away during it."""


def world() -> tuple:
    if not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_rank_zero() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_from_rank_zero(value):
    """Rank 0's ``value`` on every rank (itself without a process group): one decision
    for all, whatever each rank saw."""
    if not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def rank_zero_result(compute: Callable[[], T], what: str, timeout_seconds: float,
                     bound_by: str) -> T:
    """``compute()`` on rank 0 alone; its result on every rank, or its error raised on
    every rank (rank 0 raises its own, the others ``RankZeroFailed``), so no rank is left
    waiting for a rank 0 that failed. See ``after_rank_zero`` for how the others wait."""
    return after_rank_zero(lambda: compute() if is_rank_zero() else None, what,
                           timeout_seconds, bound_by)


def after_rank_zero(work: Callable[[], T], what: str, timeout_seconds: float,
                    bound_by: str) -> T:
    """``work()`` on every rank, then rank 0's outcome on every rank: the value its
    ``work()`` returned, or its error. Call it on every rank, as any collective.

    The ranks that finish first wait for rank 0 on the default store, for at most
    ``timeout_seconds`` (``bound_by`` names the setting), and only then meet it in a
    collective. A collective would wait at most the process group's timeout
    (``run.process_group_timeout_seconds``; on GPUs NCCL's watchdog then kills the job),
    and what rank 0 does alone (a request to an engine pool, converting M_0, a stage it
    computes or stores) may take hours. A rank 0 that dies ends the wait at once: the
    store is served from its process.
    """
    rank, world_size = world()
    if world_size == 1:
        return work()
    key = f"megatron_tpo/after_rank_zero/{next(_waits)}"
    store = torch.distributed.distributed_c10d._get_default_store()
    if rank == 0:
        try:
            value = work()
        except Exception as error:
            store.set(key, "")
            broadcast_from_rank_zero((None, f"{type(error).__name__}: {error}"))
            raise
        store.set(key, "")
        return broadcast_from_rank_zero((value, None))[0]
    work()
    _wait_for_key(store, key, what, timeout_seconds, bound_by)
    value, error = broadcast_from_rank_zero(None)
    if error is not None:
        raise RankZeroFailed(f"(from rank 0) {what}: {error}")
    return value


def _wait_for_key(store, key: str, what: str, timeout_seconds: float, bound_by: str) -> None:
    # Polled with check(), never one long store.wait(): a TCPStore client holds its one
    # lock for the whole of a wait, which would stall every other user of the store in
    # this process (the NCCL process group's monitoring threads among them).
    deadline = time.monotonic() + timeout_seconds
    pause = 0.001
    try:
        while not store.check([key]):
            if time.monotonic() > deadline:
                raise RankZeroFailed(f"rank 0 did not finish {what} within {bound_by}="
                                     f"{timeout_seconds:g} s")
            time.sleep(pause)
            pause = min(2 * pause, _LONGEST_POLL_SECONDS)
    except torch.distributed.DistNetworkError as error:
        raise RankZeroFailed(f"rank 0 went away during {what} (the store it served "
                             f"closed): {error}") from error


def derived_seed(seed: int, iteration: int, purpose: str) -> int:
    """A seed per (run seed, iteration, purpose) that every rank computes alike, so a stage
    redone after a restart draws exactly what it drew before."""
    digest = hashlib.sha256(f"{seed}/{iteration}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
