"""Colocated engines against separate GPU pools: estimate both, recommend the faster.

    comparison = compare_pools(workload, plans, request, IterationAssumptions())
    comparison.recommended.stages.as_dict()   # seconds per stage of one TPO iteration
"""

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

from megatron_tpo.plan.cost.iteration import (IterationAssumptions, IterationEstimate,
                                              IterationRequest, StageTimes, best_engine,
                                              checkpoint_seconds, judge_seconds, rollout_seconds,
                                              trainer_seconds, weight_sync_seconds)
from megatron_tpo.plan.search.training import TrainingPlan, search_training
from megatron_tpo.plan.workload import Cluster, Workload

# Colocated: the fastest trainer plans are tried in turn, since a plan that keeps less
# resident leaves the sleeping-and-waking engines more KV cache.
COLOCATED_CANDIDATES = 10


def judge_context_tokens(request: IterationRequest, assume: IterationAssumptions) -> float:
    if request.judge_kind == "reward_model":
        return request.prompt_tokens + request.response_tokens
    return (assume.judge_template_tokens + request.prompt_tokens + 2 * request.response_tokens
            + request.verdict_tokens)


def estimate_iteration(mode: str, workload: Workload, plan: TrainingPlan, engines: Cluster,
                       utilization: float, request: IterationRequest,
                       assume: IterationAssumptions) -> Optional[IterationEstimate]:
    """Stage times with the trainer on ``workload.cluster`` and engines on ``engines``
    given ``utilization`` of each engine GPU's memory; None if an engine cannot fit."""
    policy = workload.model
    policy_engine = best_engine("policy", policy, engines, request.sequence_tokens, utilization)
    judge_engine = best_engine("judge", request.judge_model, engines,
                                judge_context_tokens(request, assume), utilization)
    if policy_engine is None or judge_engine is None:
        return None
    colocated = mode == "colocated"
    reference, train = trainer_seconds(workload, plan, request)
    stages = StageTimes(
        rollout=rollout_seconds(request, policy, engines, policy_engine, assume),
        judge=judge_seconds(request, engines, judge_engine, assume),
        reference_logprobs=reference,
        train=train,
        weight_sync=weight_sync_seconds(policy, plan, workload.cluster, policy_engine, colocated,
                                        assume),
        checkpoint=checkpoint_seconds(policy, workload.cluster, assume),
        engine_switches=2 * assume.engine_switch_seconds if colocated else 0.0,
    )
    return IterationEstimate(mode, workload.cluster.world_size, engines.world_size, plan,
                             policy_engine, judge_engine, stages)


def colocated_estimate(workload: Workload, plans: List[TrainingPlan], request: IterationRequest,
                       assume: IterationAssumptions) -> Optional[IterationEstimate]:
    """The fastest iteration over the top trainer plans, engines in what each leaves."""
    capacity = workload.cluster.gpu.memory_bytes
    best = None
    for plan in plans[:COLOCATED_CANDIDATES]:
        memory = plan.memory
        resident = memory.weights + memory.gradients + memory.optimizer
        utilization = assume.gpu_memory_utilization - resident / capacity
        estimate = estimate_iteration("colocated", workload, plan, workload.cluster, utilization,
                                      request, assume)
        if estimate and (best is None or estimate.stages.total < best.stages.total):
            best = estimate
    return best


def pool_splits(cluster: Cluster) -> List[Tuple[Cluster, Cluster]]:
    """(trainer pool, engine pool) pairs: whole nodes when there are several, else GPUs
    of the one node; engine pools of a power of two, or all but a power of two."""
    if cluster.nodes > 1:
        units, make = cluster.nodes, lambda n: replace(cluster, nodes=n)
    else:
        units, make = cluster.gpus_per_node, lambda g: replace(cluster, gpus_per_node=g)
    powers = [2 ** k for k in range(units.bit_length()) if 2 ** k < units]
    engine_sizes = sorted({p for p in powers} | {units - p for p in powers})
    return [(make(units - engines), make(engines)) for engines in engine_sizes]


def separate_estimates(workload: Workload, request: IterationRequest,
                       assume: IterationAssumptions) -> List[IterationEstimate]:
    """Every split of the cluster whose trainer pool has a runnable plan, fastest first."""
    found = []
    for trainer_pool, engine_pool in pool_splits(workload.cluster):
        trainer_workload = replace(workload, cluster=trainer_pool)
        try:
            plans = search_training(trainer_workload).plans
        except ValueError:  # PlanError: nothing divides this pool
            continue
        if not plans:
            continue
        estimate = estimate_iteration("separate", trainer_workload, plans[0], engine_pool,
                                      assume.gpu_memory_utilization, request, assume)
        if estimate:
            found.append(estimate)
    return sorted(found, key=lambda estimate: estimate.stages.total)


@dataclass(frozen=True)
class PoolComparison:
    colocated: Optional[IterationEstimate]
    separate: List[IterationEstimate]  # fastest split first

    @property
    def recommended(self) -> Optional[IterationEstimate]:
        options = ([self.colocated] if self.colocated else []) + self.separate[:1]
        return min(options, key=lambda estimate: estimate.stages.total, default=None)


def compare_pools(workload: Workload, plans: List[TrainingPlan], request: IterationRequest,
                  assume: IterationAssumptions) -> PoolComparison:
    """``plans``: the trainer plans for the colocated case (the search's, or the one
    layout the operator gave); separate pools search their own trainer pool."""
    return PoolComparison(colocated_estimate(workload, plans, request, assume),
                          separate_estimates(workload, request, assume))
