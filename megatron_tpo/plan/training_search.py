"""Enumerate trainer layouts, reject the impossible ones with a reason, rank the rest."""

import math
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from megatron_tpo.config import ConfigError
from megatron_tpo.plan.hardware import GIB
from megatron_tpo.plan.memory import TrainingMemory, training_memory
from megatron_tpo.plan.timing import StepTime, model_flops_per_token, step_time
from megatron_tpo.plan.workload import RECOMPUTE_CHOICES, TrainingLayout, Workload

TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)
CONTEXT_PARALLEL_SIZES = (1, 2, 4, 8, 16)
MICRO_BATCH_SIZES = (1, 2, 4, 8)
# Estimates closer than this are a tie, broken in favour of less model parallelism (more
# DP), as NVIDIA's published recipes do: the fewest moving parts that fit.
NEAR_TIE = 0.01
# Transformer Engine's FP8 GEMMs need every dimension to be a multiple of 16.
FP8_DIM_MULTIPLE = 16


class PlanError(ValueError):
    """No plan can work for this request; the message says why."""


@dataclass(frozen=True)
class TrainingPlan:
    layout: TrainingLayout
    memory: TrainingMemory
    time: StepTime
    tokens_per_second: float
    mfu: float


@dataclass(frozen=True)
class Rejection:
    layout: TrainingLayout
    category: str  # short, for the summary ("out of memory", "heads not divisible", ...)
    reason: str    # one line, specific to this layout
    shortfall_gib: float = 0.0  # for "out of memory": how much is missing


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(workload: Workload) -> Iterator[TrainingLayout]:
    """Every combination whose sizes multiply to the world size (so DP is whole)."""
    world, layers = workload.cluster.world_size, workload.model.num_layers
    fp8_choices = (False, True) if workload.assumptions.allow_fp8 else (False,)
    for tp in TENSOR_PARALLEL_SIZES:
        for cp in CONTEXT_PARALLEL_SIZES:
            if world % (tp * cp):
                continue
            for pp in _divisors(world // (tp * cp)):
                if pp > layers:
                    continue
                dp = world // (tp * cp * pp)
                vpps = [1]
                if pp > 1 and layers % pp == 0:
                    vpps += [v for v in _divisors(layers // pp) if v > 1]
                for vpp in vpps:
                    for micro_batch in MICRO_BATCH_SIZES:
                        for recompute in RECOMPUTE_CHOICES:
                            for fp8 in fp8_choices:
                                yield TrainingLayout(tp, pp, vpp, cp, dp, micro_batch,
                                                     recompute, fp8)


def structural_rejection(workload: Workload, layout: TrainingLayout) -> Optional[Tuple[str, str]]:
    """(category, reason) if the layout cannot run at all, whatever the memory."""
    model, cluster, assume = workload.model, workload.cluster, workload.assumptions
    if layout.tp > cluster.gpus_per_node:
        return ("TP spans nodes", f"TP{layout.tp} would span nodes of {cluster.gpus_per_node} "
                "GPUs: tensor parallelism needs NVLink")
    try:
        layout.parallel_config().validate(model, cluster.world_size)
    except ConfigError as error:
        message = str(error)
        category = ("too few layers per stage" if "num_layers" in message
                    else "heads not divisible" if "heads" in message or "query_groups" in message
                    else "not divisible")
        return (category, message)
    if layout.cp > 1 and workload.seq_len % (2 * layout.cp):
        return ("sequence not divisible by 2*CP",
                f"seq-len {workload.seq_len} is not divisible by 2*CP={2 * layout.cp} "
                "(megatron splits the sequence into 2*CP load-balanced chunks)")
    if layout.cp > 1 and assume.attention != "flash":
        return ("CP needs flash attention", "context parallelism needs fused (flash) attention")
    if layout.recompute == "selective" and assume.attention == "flash":
        return ("selective = none under flash attention",
                "selective recompute (core attention) saves nothing with flash attention: "
                "the s*s scores are never stored")
    if workload.global_batch % (layout.micro_batch * layout.dp):
        return ("global batch not divisible",
                f"global batch {workload.global_batch} is not divisible by micro-batch "
                f"{layout.micro_batch} x DP {layout.dp}")
    microbatches = layout.num_microbatches(workload.global_batch)
    if layout.vpp > 1 and microbatches % layout.pp:
        return ("micro-batches not divisible by PP",
                f"interleaved schedule needs the number of micro-batches (m={microbatches}) "
                f"to be a multiple of PP={layout.pp} (megatron-core 0.16)")
    if layout.fp8:
        if not cluster.gpu.has_fp8:
            return ("no FP8 on this GPU", f"{cluster.gpu_name} has no FP8 tensor cores")
        tokens = layout.micro_batch * workload.seq_len // layout.cp
        dims = {"hidden_size": model.hidden_size,
                "ffn_hidden_size/TP": model.ffn_hidden_size // layout.tp,
                "tokens per micro-batch": tokens}
        bad = [f"{name}={value}" for name, value in dims.items() if value % FP8_DIM_MULTIPLE]
        if bad:
            return ("FP8 dims not multiples of 16",
                    f"FP8 GEMMs need multiples of {FP8_DIM_MULTIPLE}: {', '.join(bad)}")
    return None


def evaluate(workload: Workload, layout: TrainingLayout):
    """A ``TrainingPlan`` if the layout runs and fits, else a ``Rejection``."""
    structural = structural_rejection(workload, layout)
    if structural:
        return Rejection(layout, *structural)
    memory = training_memory(workload, layout)
    capacity = workload.cluster.gpu.memory_bytes
    if memory.total > capacity:
        shortfall = (memory.total - capacity) / GIB
        return Rejection(layout, "out of memory",
                         f"out of memory by {shortfall:.2f} GiB on PP stage "
                         f"{memory.pipeline_stage} (needs {memory.total / GIB:.1f} of "
                         f"{capacity / GIB:.1f} GiB)", shortfall)
    time = step_time(workload, layout)
    tokens = workload.global_batch * workload.seq_len
    mfu = (tokens * model_flops_per_token(workload.model, workload.seq_len)
           / (time.total * workload.cluster.world_size * workload.cluster.gpu.peak_flops(False)))
    return TrainingPlan(layout, memory, time, tokens / time.total, mfu)


@dataclass(frozen=True)
class TrainingSearch:
    plans: List[TrainingPlan]          # fastest first
    rejections: List[Rejection]

    def rejection_summary(self) -> List[Tuple[str, int, str]]:
        """(category, count, an example), most frequent first; the example of "out of
        memory" is the nearest miss, the layout an operator would try to squeeze in."""
        counts = Counter(r.category for r in self.rejections)
        example: Dict[str, Rejection] = {}
        for rejection in self.rejections:
            known = example.get(rejection.category)
            if known is None or rejection.shortfall_gib < known.shortfall_gib:
                example[rejection.category] = rejection
        return [(category, count, f"{example[category].layout.label()}: {example[category].reason}")
                for category, count in counts.most_common()]


def _ranking_key(plan: TrainingPlan) -> Tuple[int, int, float]:
    """Step time in bins of NEAR_TIE (log scale), then model-parallel size, then time."""
    layout = plan.layout
    time_bin = round(math.log(plan.time.total) / math.log1p(NEAR_TIE))
    return (time_bin, layout.tp * layout.pp * layout.cp, plan.time.total)


def search_training(workload: Workload) -> TrainingSearch:
    plans: List[TrainingPlan] = []
    rejections: List[Rejection] = []
    for layout in candidate_layouts(workload):
        result = evaluate(workload, layout)
        (plans if isinstance(result, TrainingPlan) else rejections).append(result)
    if not plans and not rejections:
        raise PlanError(f"no layout of TP{TENSOR_PARALLEL_SIZES} x CP x PP divides the world "
                        f"size {workload.cluster.world_size}")
    plans.sort(key=lambda plan: _ranking_key(plan))
    return TrainingSearch(plans, rejections)
