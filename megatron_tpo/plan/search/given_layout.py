"""Judge one layout the operator chose: does it run, what it costs, what would fix it.

    layout = parse_layout("tp=4,pp=4,vpp=5,cp=2,mbs=1", world_size=64)
    assessment = assess_layout(workload, layout)
    assessment.problems   # every reason it cannot run (empty: it runs)
    assessment.plan       # its memory breakdown and step time, fitting or not
    assessment.fixes      # the smallest changes after which it runs, fastest first
"""

from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, List, Optional, Tuple

from megatron_tpo.config import ConfigError, ParallelConfig
from megatron_tpo.plan.cost.parameters import most_loaded_rank_parameters, total_parameters
from megatron_tpo.plan.search.runnable import NOT_RUNNABLE, trainer_refusal
from megatron_tpo.plan.search.training import (TENSOR_PARALLEL_SIZES, TrainingPlan, evaluate,
                                               estimate_plan, out_of_memory, structural_rejections)
from megatron_tpo.plan.workload import RECOMPUTE_CHOICES, TrainingLayout, Workload

LAYOUT_KEYS = ("tp", "pp", "vpp", "cp", "dp", "mbs")
# How many alternatives the report lists.
MAX_FIXES = 3
# Fixes are searched up to this many moves away (each level is ~15x the previous one).
MAX_MOVES = 3


def layout_for_world(tp: int, pp: int, vpp: int, cp: int, micro_batch: int, recompute: str,
                     fp8: bool, world_size: int) -> TrainingLayout:
    """The layout with DP = world / (TP x PP x CP); an error naming the sizes if not whole."""
    for name, value in (("tp", tp), ("pp", pp), ("vpp", vpp), ("cp", cp), ("mbs", micro_batch)):
        if value < 1:
            raise ConfigError(f"layout {name}={value}: must be >= 1")
    if recompute not in RECOMPUTE_CHOICES:
        raise ConfigError(f"--recompute {recompute!r}: must be one of {RECOMPUTE_CHOICES}")
    if world_size % (tp * pp * cp):
        raise ConfigError(f"world size {world_size} is not a multiple of TP x PP x CP = "
                          f"{tp} x {pp} x {cp}: no whole data-parallel size")
    return TrainingLayout(tp, pp, vpp, cp, world_size // (tp * pp * cp), micro_batch,
                          recompute, fp8)


def parse_layout(text: str, world_size: int, recompute: str = "none",
                 fp8: bool = False) -> TrainingLayout:
    """``tp=4,pp=4,vpp=5,cp=2,mbs=1`` (missing sizes are 1; ``dp``, if given, is checked)."""
    values: Dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        key = key.strip().lower()
        if key not in LAYOUT_KEYS or not value.strip().isdigit():
            raise ConfigError(f"--layout {text!r}: {item!r} is not one of "
                              f"{', '.join(k + '=N' for k in LAYOUT_KEYS)}")
        values[key] = int(value)
    layout = layout_for_world(values.get("tp", 1), values.get("pp", 1), values.get("vpp", 1),
                              values.get("cp", 1), values.get("mbs", 1), recompute, fp8,
                              world_size)
    if "dp" in values and values["dp"] != layout.dp:
        raise ConfigError(f"--layout {text!r}: dp={values['dp']} but {world_size} GPUs / "
                          f"(TP x PP x CP) give DP={layout.dp}")
    return layout


def layout_from_parallel(parallel: ParallelConfig, world_size: int, micro_batch: int,
                         recompute: str, fp8: bool) -> TrainingLayout:
    return layout_for_world(parallel.tensor_model_parallel_size,
                            parallel.pipeline_model_parallel_size,
                            parallel.virtual_pipeline_model_parallel_size or 1,
                            parallel.context_parallel_size, micro_batch, recompute, fp8,
                            world_size)


@dataclass(frozen=True)
class Fix:
    changes: Tuple[str, ...]  # "PP 4 -> 8", "DP 2 -> 1", ...
    plan: TrainingPlan


@dataclass(frozen=True)
class LayoutAssessment:
    layout: TrainingLayout
    problems: List[Tuple[str, str]]  # (category, reason); empty: it runs and fits
    plan: Optional[TrainingPlan]     # None when the layout does not split the model at all
    total_parameters: int
    most_loaded_stage: Optional[int]
    most_loaded_rank_parameters: Optional[int]
    fixes: List[Fix]

    @property
    def runs(self) -> bool:
        return not self.problems


def assess_layout(workload: Workload, layout: TrainingLayout) -> LayoutAssessment:
    """Every problem of ``layout`` on this cluster, its estimate, and the smallest fixes."""
    problems = structural_rejections(workload, layout)
    shape_ok = not any(_is_shape_problem(category) for category, _ in problems)
    plan, stage, rank_params = None, None, None
    if shape_ok:
        plan = estimate_plan(workload, layout)
        full = out_of_memory(workload, layout, plan.memory)
        if full:
            problems.append((full.category, full.reason))
        stage, rank_params = most_loaded_rank_parameters(workload.model, layout.tp, layout.pp,
                                                         layout.vpp)
    refusal = trainer_refusal(layout)
    if refusal:
        problems.append((NOT_RUNNABLE, refusal))
    fixes = smallest_fixes(workload, layout) if problems else []
    return LayoutAssessment(layout, problems, plan, total_parameters(workload.model), stage,
                            rank_params, fixes)


def _is_shape_problem(category: str) -> bool:
    return category in ("TP spans nodes", "too few layers per stage", "heads not divisible",
                        "not divisible")


# ---- the smallest change that makes a layout run ------------------------------------

Move = Callable[[Workload, TrainingLayout], List[TrainingLayout]]


def _with_sizes(workload: Workload, layout: TrainingLayout, **sizes) -> Optional[TrainingLayout]:
    """``layout`` with new TP/PP/CP (DP follows the world size), or None if not whole."""
    new = replace(layout, **sizes)
    world = workload.cluster.world_size
    if world % (new.tp * new.pp * new.cp):
        return None
    new = replace(new, dp=world // (new.tp * new.pp * new.cp))
    if new.vpp > 1 and (new.pp == 1 or workload.model.num_layers % (new.pp * new.vpp)):
        new = replace(new, vpp=1)
    return new


def _pipeline_moves(workload: Workload, layout: TrainingLayout) -> List[TrainingLayout]:
    """The next larger and the next smaller PP that divide the layers and the world."""
    layers, world = workload.model.num_layers, workload.cluster.world_size
    sizes = [pp for pp in range(1, layers + 1)
             if layers % pp == 0 and world % (layout.tp * layout.cp * pp) == 0]
    larger = [pp for pp in sizes if pp > layout.pp][:1]
    smaller = [pp for pp in sizes if pp < layout.pp][-1:]
    return [_with_sizes(workload, layout, pp=pp) for pp in larger + smaller]


def _tensor_moves(workload: Workload, layout: TrainingLayout) -> List[TrainingLayout]:
    larger = [tp for tp in TENSOR_PARALLEL_SIZES if tp > layout.tp][:1]
    smaller = [tp for tp in TENSOR_PARALLEL_SIZES if tp < layout.tp][-1:]
    return [_with_sizes(workload, layout, tp=tp) for tp in larger + smaller]


def _context_moves(workload: Workload, layout: TrainingLayout) -> List[TrainingLayout]:
    # Only towards CP1: the DPO trainer refuses CP > 1, so more CP never makes it run.
    return [_with_sizes(workload, layout, cp=1)] if layout.cp > 1 else []


def _schedule_moves(workload: Workload, layout: TrainingLayout) -> List[TrainingLayout]:
    layers = workload.model.num_layers
    vpps = [v for v in range(1, layers // layout.pp + 1)
            if layout.pp > 1 and (layers // layout.pp) % v == 0 and v != layout.vpp]
    micro = [m for m in (layout.micro_batch // 2, layout.micro_batch * 2)
             if m >= 1 and m != layout.micro_batch]
    return ([replace(layout, vpp=v) for v in vpps]
            + [replace(layout, micro_batch=m) for m in micro])


def _memory_moves(workload: Workload, layout: TrainingLayout) -> List[TrainingLayout]:
    moves = [replace(layout, recompute=r) for r in RECOMPUTE_CHOICES if r != layout.recompute]
    if workload.cluster.gpu.has_fp8:
        moves.append(replace(layout, fp8=not layout.fp8))
    return moves


MOVES: Tuple[Move, ...] = (_pipeline_moves, _tensor_moves, _context_moves, _schedule_moves,
                           _memory_moves)


def _neighbours(workload: Workload, layout: TrainingLayout) -> List[TrainingLayout]:
    found = []
    for move in MOVES:
        found += [new for new in move(workload, layout) if new is not None and new != layout]
    return found


def describe_change(old: TrainingLayout, new: TrainingLayout) -> Tuple[str, ...]:
    """``("PP 4 -> 8", "DP 2 -> 1")``: each size or setting that differs, DP last."""
    names = {"tp": "TP", "pp": "PP", "vpp": "VPP", "cp": "CP", "micro_batch": "MBS",
             "recompute": "recompute", "fp8": "FP8", "dp": "DP"}
    order = [f.name for f in fields(TrainingLayout) if f.name != "dp"] + ["dp"]
    return tuple(f"{names[name]} {getattr(old, name)} -> {getattr(new, name)}"
                 for name in order if getattr(old, name) != getattr(new, name))


def _runs(workload: Workload, layout: TrainingLayout) -> Optional[TrainingPlan]:
    result = evaluate(workload, layout)
    if isinstance(result, TrainingPlan) and not trainer_refusal(layout):
        return result
    return None


def smallest_fixes(workload: Workload, layout: TrainingLayout,
                   limit: int = MAX_FIXES) -> List[Fix]:
    """Layouts one move away that run, fastest first; two or three moves away if none does.

    A move is one step of one knob: the next PP or TP up or down (DP follows), CP to 1,
    another VPP, half or double the micro-batch, another recomputation, FP8 on or off.
    """
    frontier = [layout]
    seen = {layout}
    for _ in range(MAX_MOVES):
        candidates = []
        for start in frontier:
            for new in _neighbours(workload, start):
                if new not in seen:
                    seen.add(new)
                    candidates.append(new)
        fits = [(new, plan) for new in candidates
                for plan in [_runs(workload, new)] if plan is not None]
        if fits:
            # DP follows TP, PP and CP, so it is not a knob of its own.
            fits.sort(key=lambda item: (sum(not change.startswith("DP ") for change in
                                            describe_change(layout, item[0])),
                                        item[1].time.total))
            return [Fix(describe_change(layout, new), plan) for new, plan in fits[:limit]]
        frontier = candidates
    return []
