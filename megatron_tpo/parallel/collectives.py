"""The few collectives the TPO loop needs beyond megatron's own: who is rank 0, one
decision for all ranks, and seeds every rank computes alike without talking. Tensors
and ranks only: generation spread over engine replicas is ``rollout.replicas``'s."""

import hashlib

import torch


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


def derived_seed(seed: int, iteration: int, purpose: str) -> int:
    """A seed per (run seed, iteration, purpose) that every rank computes alike, so a stage
    redone after a restart draws exactly what it drew before."""
    digest = hashlib.sha256(f"{seed}/{iteration}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
