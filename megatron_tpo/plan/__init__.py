"""The parallelism planner behind ``tpo-plan``.

hardware (GPU table) -> parameters (megatron's exact per-rank buffers) -> memory and
timing (per layout) -> training_search (enumerate, reject with a reason, rank) and
rollout (vLLM engine layouts) -> report / emit.
"""

from megatron_tpo.plan.hardware import GpuSpec, find_gpu, load_gpu_table
from megatron_tpo.plan.rollout import plan_engines
from megatron_tpo.plan.training_search import PlanError, search_training
from megatron_tpo.plan.workload import Assumptions, Cluster, TrainingLayout, Workload

__all__ = ["Assumptions", "Cluster", "GpuSpec", "PlanError", "TrainingLayout", "Workload",
           "find_gpu", "load_gpu_table", "plan_engines", "search_training"]
