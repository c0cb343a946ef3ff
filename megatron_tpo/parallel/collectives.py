"""The few collectives the TPO loop needs beyond megatron's own: sharing generation
work among the ranks' engine replicas, and agreeing on seeds without talking."""

import hashlib
from dataclasses import replace
from typing import List, Sequence

import torch

from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine, SamplingParams


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


def generate_on_all_ranks(engine: RolloutEngine, prompts: Sequence[str],
                          sampling: SamplingParams, engine_tensor_parallel_size: int = 1
                          ) -> List[GenerationOutput]:
    """Every engine replica generates its round-robin share of ``prompts``; the outputs come
    back in prompt order on every rank.

    The ranks of one tensor-parallel engine (consecutive blocks, as vLLM's external
    launcher groups them) get identical prompts and seeds; replicas get their own seed.
    """
    rank, world_size = world()
    replica, replicas = rank // engine_tensor_parallel_size, world_size // engine_tensor_parallel_size
    mine = list(range(replica, len(prompts), replicas))
    seed = None if sampling.seed is None else sampling.seed + replica
    outputs = engine.generate([prompts[i] for i in mine], replace(sampling, seed=seed)) if mine else []
    if replicas == 1:   # one engine spans the world: every rank already holds all outputs
        return outputs
    gathered: List[list] = [None] * world_size
    torch.distributed.all_gather_object(gathered, list(zip(mine, outputs)))
    ordered = {}
    for first_rank in range(0, world_size, engine_tensor_parallel_size):
        ordered.update(dict(gathered[first_rank]))
    return [ordered[i] for i in range(len(prompts))]


class EngineReplicas(RolloutEngine):
    """Every rank's engine replica seen as one engine, for what generates on every rank
    (a pairwise judge): ``generate`` spreads the prompts over the replicas and returns
    all outputs, in order, on every rank; every rank must call it with the same prompts,
    which keeps the ranks of one vLLM tensor-parallel engine in step."""

    def __init__(self, engine: RolloutEngine, engine_tensor_parallel_size: int):
        self.engine, self.engine_tensor_parallel_size = engine, engine_tensor_parallel_size

    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> List[GenerationOutput]:
        return generate_on_all_ranks(self.engine, prompts, sampling,
                                     self.engine_tensor_parallel_size)

    def update_weights(self, stream) -> None:
        raise NotImplementedError("EngineReplicas only generates; push weights into the "
                                  "engine itself (push_weights)")
