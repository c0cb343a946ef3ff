"""Fit the planner's efficiency assumptions to a recorded run, save and apply them.

    calibration, notes = fit_calibration(run_model(...), metrics)
    save_calibration(calibration, "calibration.yaml")
    assumptions, iteration = apply_calibration(load_calibration(path), Assumptions(),
                                               IterationAssumptions())

MFU is fitted so the estimated optimizer step equals the measured median step (FP8
layouts fit ``mfu_fp8``, others ``mfu_bf16``); the decode efficiency so the estimated
rollout equals the measured mean rollout. Both estimates fall monotonically as the
efficiency rises, so each fit is a bisection.
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

from omegaconf import OmegaConf

from megatron_tpo.config import ConfigError
from megatron_tpo.config.loading import load_structured
from megatron_tpo.plan.cost.iteration import IterationAssumptions, rollout_seconds
from megatron_tpo.plan.cost.timing import step_time
from megatron_tpo.plan.recorded.run_check import RunModel, colocated_iteration
from megatron_tpo.plan.recorded.run_dir import RunMetrics
from megatron_tpo.plan.workload import Assumptions

# Bounds of a plausible efficiency; a fit outside them means the model is missing
# something (e.g. the run was not compute-bound), and the fit is refused.
EFFICIENCY_BOUNDS = (1e-4, 1.0)
BISECTION_STEPS = 60


@dataclass
class Calibration:
    """What ``--calibrate`` writes and ``--calibration`` reads (null: keep the default)."""

    hardware: str = ""
    source: str = ""
    mfu_bf16: Optional[float] = None
    mfu_fp8: Optional[float] = None
    decode_efficiency: Optional[float] = None

    def validate(self, where: str) -> None:
        low, high = EFFICIENCY_BOUNDS
        for name in ("mfu_bf16", "mfu_fp8", "decode_efficiency"):
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ConfigError(f"{where}: {name}={value}: must be in [{low}, {high}]")


def solve_decreasing(estimate: Callable[[float], float], target: float) -> Optional[float]:
    """x in EFFICIENCY_BOUNDS with estimate(x) = target for a decreasing estimate; None
    when even the bounds cannot reach it."""
    low, high = EFFICIENCY_BOUNDS
    if not estimate(high) <= target <= estimate(low):
        return None
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if estimate(middle) > target else (low, middle)
    return (low + high) / 2


def _fit_mfu(model: RunModel, measured: float) -> Optional[float]:
    field = "mfu_fp8" if model.layout.fp8 else "mfu_bf16"

    def seconds(mfu: float) -> float:
        assumptions = replace(model.workload.assumptions, **{field: mfu})
        return step_time(replace(model.workload, assumptions=assumptions), model.layout).total
    return solve_decreasing(seconds, measured)


def _fit_decode(model: RunModel, measured: float) -> Optional[float]:
    iteration = colocated_iteration(model)
    if iteration is None:
        return None
    pool = model.workload.cluster

    def seconds(efficiency: float) -> float:
        assume = replace(model.iteration_assumptions, decode_efficiency=efficiency)
        return rollout_seconds(model.request, model.workload.model, pool,
                               iteration.policy_engine, assume)
    return solve_decreasing(seconds, measured)


def fit_calibration(model: RunModel, metrics: RunMetrics, source: str) -> Tuple[Calibration, List[str]]:
    """The fitted calibration and one note per figure that could not be fitted."""
    calibration = Calibration(hardware=model.workload.cluster.gpu_name, source=source)
    notes = []
    step = metrics.step_seconds()
    mfu = _fit_mfu(model, step) if step else None
    field = "mfu_fp8" if model.layout.fp8 else "mfu_bf16"
    if mfu is None:
        notes.append(f"{field} not fitted: " + ("no train_step records" if not step else
                     f"no MFU in {EFFICIENCY_BOUNDS} gives the measured {step:.3f} s step"))
    setattr(calibration, field, mfu)
    rollout = metrics.stage_seconds("rollout")
    decode = _fit_decode(model, rollout) if rollout else None
    if decode is None:
        notes.append("decode_efficiency not fitted: " + (
            "no timing/rollout in the iteration records" if not rollout else
            f"no efficiency in {EFFICIENCY_BOUNDS} gives the measured {rollout:.3f} s "
            "rollout (or the engines do not fit in the estimate)"))
    calibration.decode_efficiency = decode
    return calibration, notes


def save_calibration(calibration: Calibration, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# tpo-plan --calibrate {calibration.source}: efficiencies fitted on "
              f"{calibration.hardware}; pass it back with --calibration {path.name}\n")
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.structured(calibration)))
    return path


def load_calibration(path: Union[str, Path]) -> Calibration:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration file not found: {path}")
    calibration = load_structured(Calibration, path)
    calibration.validate(str(path))
    return calibration


def apply_calibration(calibration: Calibration, assumptions: Assumptions,
                      iteration: IterationAssumptions) -> Tuple[Assumptions, IterationAssumptions]:
    """The assumptions with every fitted value of ``calibration`` in place of the default."""
    fitted = {name: getattr(calibration, name) for name in ("mfu_bf16", "mfu_fp8")
              if getattr(calibration, name) is not None}
    if calibration.decode_efficiency is not None:
        iteration = replace(iteration, decode_efficiency=calibration.decode_efficiency)
    return replace(assumptions, **fitted), iteration
