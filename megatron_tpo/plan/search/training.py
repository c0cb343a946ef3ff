"""Enumerate trainer layouts, reject the impossible ones with a reason, rank the rest."""

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

from megatron_tpo.config import ConfigError
from megatron_tpo.plan.cost.memory import TrainingMemory, training_memory
from megatron_tpo.plan.cost.timing import StepTime, model_flops_per_token, step_time
from megatron_tpo.plan.hardware import GIB
from megatron_tpo.plan.search.runnable import trainer_refusal
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


def _shape_violations(workload: Workload, layout: TrainingLayout) -> List[Tuple[str, str]]:
    """Rules on how the model and the cluster split; without them nothing can be sized."""
    model, cluster = workload.model, workload.cluster
    found = []
    if layout.tp > cluster.gpus_per_node:
        found.append(("TP spans nodes", f"TP{layout.tp} would span nodes of "
                      f"{cluster.gpus_per_node} GPUs: tensor parallelism needs NVLink"))
    try:
        layout.parallel_config().validate(model, cluster.world_size)
    except ConfigError as error:
        message = str(error)
        category = ("too few layers per stage" if "num_layers" in message
                    else "heads not divisible" if "heads" in message or "query_groups" in message
                    else "not divisible")
        found.append((category, message))
    return found


def _schedule_violations(workload: Workload, layout: TrainingLayout) -> List[Tuple[str, str]]:
    """Rules of megatron's sequence split, recomputation and pipeline schedule."""
    found = []
    if layout.cp > 1 and workload.seq_len % (2 * layout.cp):
        found.append(("sequence not divisible by 2*CP",
                      f"seq-len {workload.seq_len} is not divisible by 2*CP={2 * layout.cp} "
                      "(megatron splits the sequence into 2*CP load-balanced chunks)"))
    if layout.cp > 1 and workload.assumptions.attention != "flash":
        found.append(("CP needs flash attention",
                      "context parallelism needs fused (flash) attention"))
    if layout.recompute == "selective" and workload.assumptions.attention == "flash":
        found.append(("selective = none under flash attention",
                      "selective recompute (core attention) saves nothing with flash "
                      "attention: the s*s scores are never stored"))
    if workload.global_batch % (layout.micro_batch * layout.dp):
        found.append(("global batch not divisible",
                      f"global batch {workload.global_batch} is not divisible by micro-batch "
                      f"{layout.micro_batch} x DP {layout.dp}"))
    else:
        microbatches = layout.num_microbatches(workload.global_batch)
        if layout.vpp > 1 and microbatches % layout.pp:
            found.append(("micro-batches not divisible by PP",
                          f"interleaved schedule needs the number of micro-batches "
                          f"(m={microbatches}) to be a multiple of PP={layout.pp} "
                          "(megatron-core 0.16)"))
    return found


def _fp8_violations(workload: Workload, layout: TrainingLayout) -> List[Tuple[str, str]]:
    if not layout.fp8:
        return []
    model, cluster = workload.model, workload.cluster
    if not cluster.gpu.has_fp8:
        return [("no FP8 on this GPU", f"{cluster.gpu_name} has no FP8 tensor cores")]
    tokens = layout.micro_batch * workload.seq_len // layout.cp
    dims = {"hidden_size": model.hidden_size,
            "ffn_hidden_size/TP": model.ffn_hidden_size // layout.tp,
            "tokens per micro-batch": tokens}
    bad = [f"{name}={value}" for name, value in dims.items() if value % FP8_DIM_MULTIPLE]
    if bad:
        return [("FP8 dims not multiples of 16",
                 f"FP8 GEMMs need multiples of {FP8_DIM_MULTIPLE}: {', '.join(bad)}")]
    return []


def structural_rejections(workload: Workload, layout: TrainingLayout) -> List[Tuple[str, str]]:
    """Every (category, reason) why the layout cannot run at all, whatever the memory.

    The shape rules come first: when one fails (layers not divisible by PP, ...), the
    later checks and the memory estimate have no well-defined layout to look at.
    """
    shape = _shape_violations(workload, layout)
    if shape:
        return shape
    return _schedule_violations(workload, layout) + _fp8_violations(workload, layout)


def structural_rejection(workload: Workload, layout: TrainingLayout) -> Optional[Tuple[str, str]]:
    """The first of ``structural_rejections`` (None: the layout can run)."""
    found = structural_rejections(workload, layout)
    return found[0] if found else None


def estimate_plan(workload: Workload, layout: TrainingLayout,
                  memory: Optional[TrainingMemory] = None) -> TrainingPlan:
    """Memory, step time and throughput of a structurally valid layout, fit or not."""
    memory = memory or training_memory(workload, layout)
    time = step_time(workload, layout)
    tokens = workload.global_batch * workload.seq_len
    mfu = (tokens * model_flops_per_token(workload.model, workload.seq_len)
           / (time.total * workload.cluster.world_size * workload.cluster.gpu.peak_flops(False)))
    return TrainingPlan(layout, memory, time, tokens / time.total, mfu)


def out_of_memory(workload: Workload, layout: TrainingLayout,
                  memory: TrainingMemory) -> Optional[Rejection]:
    capacity = workload.cluster.gpu.memory_bytes
    if memory.total <= capacity:
        return None
    shortfall = (memory.total - capacity) / GIB
    return Rejection(layout, "out of memory",
                     f"out of memory by {shortfall:.2f} GiB on PP stage "
                     f"{memory.pipeline_stage} (needs {memory.total / GIB:.1f} of "
                     f"{capacity / GIB:.1f} GiB)", shortfall)


def evaluate(workload: Workload, layout: TrainingLayout):
    """A ``TrainingPlan`` if the layout runs and fits, else a ``Rejection``."""
    structural = structural_rejection(workload, layout)
    if structural:
        return Rejection(layout, *structural)
    memory = training_memory(workload, layout)
    return out_of_memory(workload, layout, memory) or estimate_plan(workload, layout, memory)


@dataclass(frozen=True)
class TrainingSearch:
    plans: List[TrainingPlan]          # fastest first; only layouts the trainer runs
    rejections: List[Rejection]
    # Layouts that fit but the DPO trainer refuses (runnable.trainer_refusal), fastest
    # first, with the refusal; shown to the operator, never ranked among the plans.
    not_runnable: List[Tuple[TrainingPlan, str]] = field(default_factory=list)

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


def search_training(workload: Workload, runnable_only: bool = True) -> TrainingSearch:
    """Every candidate layout evaluated; fitting ones ranked, fastest first.

    ``runnable_only``: plans the DPO trainer refuses go to ``not_runnable`` instead of
    ``plans``. False ranks everything megatron-core can run (the validation against
    NVIDIA's pre-training recipes, which use context parallelism, needs this).
    """
    plans: List[TrainingPlan] = []
    rejections: List[Rejection] = []
    not_runnable: List[Tuple[TrainingPlan, str]] = []
    for layout in candidate_layouts(workload):
        result = evaluate(workload, layout)
        if isinstance(result, Rejection):
            rejections.append(result)
        elif runnable_only and trainer_refusal(layout):
            not_runnable.append((result, trainer_refusal(layout)))
        else:
            plans.append(result)
    if not plans and not rejections and not not_runnable:
        raise PlanError(f"no layout of TP{TENSOR_PARALLEL_SIZES} x CP x PP divides the world "
                        f"size {workload.cluster.world_size}")
    plans.sort(key=_ranking_key)
    not_runnable.sort(key=lambda item: _ranking_key(item[0]))
    return TrainingSearch(plans, rejections, not_runnable)
