"""Generation spread over every rank's engine replica: each replica takes its round-robin
share of the prompts and every rank gets all outputs back, in prompt order."""

from dataclasses import replace
from typing import List, Sequence

import torch

from megatron_tpo.parallel.collectives import world
from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine, SamplingParams


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
