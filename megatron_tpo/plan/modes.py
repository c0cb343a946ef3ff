"""The modes of ``tpo-plan``: rank every layout, judge one layout, or check (calibrate)
against a recorded run, each from its request to its report. ``args`` is tpo-plan's
parsed command line (cli/plan.py); the whole run of ``--experiment`` comes composed and
dry-run by the command, so its verdicts are ``tpo-run --dry-run``'s."""

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_tpo.config import ConfigError, ModelConfig, load_model_config, load_parallel_config
from megatron_tpo.overrides import as_override, with_settings
from megatron_tpo.plan.cost.engines import plan_engines
from megatron_tpo.plan.cost.iteration import IterationAssumptions, IterationRequest
from megatron_tpo.plan.cost.pools import compare_pools
from megatron_tpo.plan.hardware import find_gpu
from megatron_tpo.plan.recorded.calibration import (apply_calibration, fit_calibration,
                                                    load_calibration, save_calibration)
from megatron_tpo.plan.recorded.run_check import (check_figures, format_figures, run_model,
                                                  uncomparable_figures)
from megatron_tpo.plan.recorded.run_dir import RecordedRun, read_recorded_run, read_run_dir
from megatron_tpo.plan.report.emit import emit_plan
from megatron_tpo.plan.report.iteration import format_iteration, iteration_report_dict
from megatron_tpo.plan.report.layout import format_layout_report, layout_report_dict
from megatron_tpo.plan.report.search import format_report, plan_report_dict
from megatron_tpo.plan.search.given_layout import assess_layout, layout_from_parallel, parse_layout
from megatron_tpo.plan.search.training import PlanError, TrainingPlan, search_training
from megatron_tpo.plan.workload import Assumptions, Cluster, TrainingLayout, Workload
from megatron_tpo.tpo_config import TPOConfig

DEFAULT_GPU = "h100-80gb"
CALIBRATION_FILE = "calibration.yaml"
OVERRIDES_FILE = "tpo_run_overrides.txt"


@dataclass(frozen=True)
class WholeRun:
    """``--experiment``: the run's phases as its dry run entered them, sized again for each
    layout with the same ledger, so tpo-plan's verdict is tpo-run --dry-run's."""

    config: TPOConfig
    sized: object           # the recipe's DryRun as given (megatron_tpo/dry_run.py)

    def verdict(self, layout: TrainingLayout, world_size: int) -> str:
        """'' when every phase of the run fits at ``layout``; else the misfit and a fix."""
        return self.sized.verdict_for(with_layout(self.config, layout), world_size)

    def fits(self, layout: TrainingLayout, world_size: int) -> bool:
        """``verdict``'s yes or no, without searching for a fix (cheap: a search asks it
        of hundreds of layouts)."""
        return self.sized.fits(with_layout(self.config, layout), world_size)


@dataclass(frozen=True)
class PlanRequest:
    workload: Workload
    layout: Optional[TrainingLayout]        # --layout / --from: judge this one
    iteration: Optional[IterationRequest]   # --prompts / --response-tokens
    iteration_assumptions: IterationAssumptions
    run_config: Optional[RecordedRun]
    whole_run: Optional[WholeRun] = None    # --experiment


def layout_settings(layout: TrainingLayout) -> List[Tuple[str, object]]:
    """The run settings that give the trainer this layout: TP, PP, VPP, CP, sequence
    parallelism, micro-batch, recomputation and FP8."""
    return [("parallel.tensor_model_parallel_size", layout.tp),
            ("parallel.pipeline_model_parallel_size", layout.pp),
            ("parallel.virtual_pipeline_model_parallel_size",
             layout.vpp if layout.vpp > 1 else None),
            ("parallel.context_parallel_size", layout.cp),
            ("parallel.sequence_parallel", layout.sequence_parallel),
            ("train.micro_batch_pairs", layout.micro_batch // 2),
            ("train.recompute_granularity",
             None if layout.recompute == "none" else layout.recompute),
            ("train.fp8.enabled", layout.fp8)]


def with_layout(config: TPOConfig, layout: TrainingLayout) -> TPOConfig:
    """``config`` with the trainer's layout set to ``layout``."""
    return with_settings(config, layout_settings(layout))


def layout_overrides(layout: TrainingLayout) -> List[str]:
    """tpo-run overrides that give a run this trainer layout (what --emit writes)."""
    return [as_override(key, value) for key, value in layout_settings(layout)]


def _read_from_file(path: str):
    """(RecordedRun, None) for a run's config.yaml, (None, ParallelConfig) for a parallel YAML."""
    try:
        top = OmegaConf.load(path) if Path(path).is_file() else None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path}: {error}") from error
    if top is None:
        raise ConfigError(f"--from {path}: file not found")
    if "parallel" in top:
        return read_recorded_run(path), None
    return None, load_parallel_config(path)


def _cluster(args: argparse.Namespace, run_config: Optional[RecordedRun]) -> Cluster:
    gpu_name = args.gpu or (run_config.hardware if run_config else DEFAULT_GPU)
    gpu = find_gpu(gpu_name, args.gpu_table)
    if args.gpus_per_node <= 0:
        raise ConfigError(f"--gpus-per-node must be positive, got {args.gpus_per_node}")
    if args.nodes is not None:
        return Cluster(gpu_name, gpu, args.nodes, args.gpus_per_node)
    if run_config is None or run_config.world_size is None:
        raise ConfigError("--nodes is required (or --from a run's config.yaml with run.world_size)")
    per_node = min(args.gpus_per_node, run_config.world_size)
    if run_config.world_size % per_node:
        raise ConfigError(f"run.world_size={run_config.world_size} is not a whole number of "
                          f"{per_node}-GPU nodes; pass --gpus-per-node")
    return Cluster(gpu_name, gpu, run_config.world_size // per_node, per_node)


def _assumptions(args: argparse.Namespace):
    assumptions = Assumptions(attention=args.attention, logprobs=args.logprobs,
                              mfu_bf16=args.mfu_bf16, mfu_fp8=args.mfu_fp8,
                              allow_fp8=not args.no_fp8)
    iteration = IterationAssumptions(gpu_memory_utilization=args.gpu_memory_utilization)
    if args.calibration:
        assumptions, iteration = apply_calibration(load_calibration(args.calibration),
                                                   assumptions, iteration)
    return assumptions, iteration


REQUIRED = {"--nodes": "nodes in the allocation, or --experiment's run.world_size",
            "--seq-len": "tokens per sequence the memory must hold, or --experiment",
            "--global-batch": "sequences per optimizer step, or --experiment"}


def _check_required(args: argparse.Namespace, seq_len: Optional[int],
                    run_config: Optional[RecordedRun]) -> None:
    """Every missing required option in one error, not one per try."""
    from_run = run_config.world_size if run_config is not None else None
    given = {"--nodes": args.nodes if args.nodes is not None else from_run,
             "--seq-len": seq_len, "--global-batch": args.global_batch}
    missing = [name for name, value in given.items() if value is None]
    clauses = []
    if len(missing) == 1:
        clauses.append(f"{missing[0]} is required ({REQUIRED[missing[0]]})")
    elif missing:
        clauses.append(f"{', '.join(missing[:-1])} and {missing[-1]} are required ("
                       + "; ".join(f"{name}: {REQUIRED[name]}" for name in missing) + ")")
    iteration = _iteration_missing(args, run_config)
    if iteration:
        clauses.append(f"the iteration estimate needs {', '.join(iteration)}")
    if clauses:
        raise ConfigError("; ".join(clauses))


def _check_numbers(args: argparse.Namespace, cluster: Cluster, seq_len: int,
                   global_batch: int) -> None:
    for name, value in (("nodes", cluster.nodes), ("seq-len", seq_len),
                        ("global-batch", global_batch), ("top", args.top)):
        if value <= 0:
            raise ConfigError(f"--{name} must be positive, got {value}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
    for name in ("mfu_bf16", "mfu_fp8"):
        if not 0 < getattr(args, name) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1]")


def _layout(args: argparse.Namespace, run_config, parallel, world_size: int):
    if args.layout and args.from_file:
        raise ConfigError("--layout and --from: give one")
    if args.layout:
        return parse_layout(args.layout, world_size, args.recompute or "none", args.fp8)
    if run_config is not None:
        return layout_from_parallel(run_config.parallel, world_size,
                                    args.micro_batch or run_config.micro_batch_sequences,
                                    args.recompute or run_config.recompute,
                                    args.fp8 or run_config.train.fp8.enabled)
    if parallel is not None:
        return layout_from_parallel(parallel, world_size, args.micro_batch or 1,
                                    args.recompute or "none", args.fp8)
    if args.recompute or args.fp8 or args.micro_batch:
        raise ConfigError("--recompute, --fp8 and --micro-batch describe a given layout: "
                          "use them with --layout or --from")
    return None


def _iteration_missing(args: argparse.Namespace, run_config: Optional[RecordedRun]) -> List[str]:
    """What the whole-iteration estimate (asked for by --prompts or --response-tokens)
    lacks."""
    if args.prompts is None and args.response_tokens is None:
        return []
    missing = [f"--{name.replace('_', '-')}" for name in
               ("prompt_tokens", "thought_tokens", "response_tokens")
               if getattr(args, name) is None]
    if args.prompts is None and run_config is None:
        missing.insert(0, "--prompts")
    return missing


def _iteration(args: argparse.Namespace, model: ModelConfig,
               run_config: Optional[RecordedRun]) -> Optional[IterationRequest]:
    if args.prompts is None and args.response_tokens is None:
        return None
    judge_kind = args.judge_kind or (run_config.judge_kind if run_config else "reward_model")
    request = IterationRequest(
        prompts=args.prompts or run_config.prompts_per_iteration,
        samples=args.samples or (run_config.samples_per_prompt if run_config else 8),
        prompt_tokens=args.prompt_tokens, thought_tokens=args.thought_tokens,
        response_tokens=args.response_tokens,
        judge_kind=judge_kind if judge_kind in ("reward_model", "pairwise") else "reward_model",
        judge_model=load_model_config(args.judge) if args.judge else model,
        verdict_tokens=args.verdict_tokens, comparisons_per_prompt=args.comparisons_per_prompt)
    request.validate()
    return request


def _with_recipe_defaults(args: argparse.Namespace, config) -> argparse.Namespace:
    """``args`` with what the recipe says where the command line says nothing."""
    filled = dict(vars(args))
    filled["model"] = args.model or config.model.name
    filled["seq_len"] = args.seq_len or (config.prompts.max_tokens
                                         + config.rollout.sampling.max_new_tokens)
    filled["global_batch"] = args.global_batch or 2 * config.run.pairs_per_step
    filled["gpu"] = args.gpu or (None if config.run.hardware == "cpu" else config.run.hardware)
    if args.nodes is None and config.run.world_size:
        filled["nodes"] = max(1, config.run.world_size // args.gpus_per_node)
    return argparse.Namespace(**filled)


def resolve_request(args: argparse.Namespace, whole_run: Optional[WholeRun]) -> PlanRequest:
    """The request of ``args``; ``whole_run``: --experiment's run, composed and dry-run."""
    if whole_run is None and args.overrides:
        raise ConfigError(f"{' '.join(args.overrides)}: tpo-run overrides go with --experiment")
    if whole_run is not None:
        args = _with_recipe_defaults(args, whole_run.config)
    run_config, parallel = _read_from_file(args.from_file) if args.from_file else (None, None)
    if args.model:
        model = load_model_config(args.model)
    elif run_config is not None:
        model = run_config.model
    else:
        raise ConfigError("--model is required (or --from a run's config.yaml, or --experiment)")
    seq_len = args.seq_len or (run_config.max_prompt_tokens + run_config.max_new_tokens
                               if run_config else None)
    _check_required(args, seq_len, run_config)
    cluster = _cluster(args, run_config)
    _check_numbers(args, cluster, seq_len, args.global_batch)
    if seq_len > model.max_position_embeddings:
        raise ConfigError(f"--seq-len {seq_len} exceeds {model.name}'s "
                          f"max_position_embeddings={model.max_position_embeddings}")
    assumptions, iteration_assumptions = _assumptions(args)
    workload = Workload(model, cluster, seq_len, args.global_batch, assumptions)
    return PlanRequest(workload, _layout(args, run_config, parallel, cluster.world_size),
                       _iteration(args, model, run_config), iteration_assumptions, run_config,
                       whole_run)


def _engines(args: argparse.Namespace, workload: Workload):
    engines = [plan_engines("policy", workload.model, workload.cluster, workload.seq_len,
                            args.gpu_memory_utilization)]
    if args.judge:
        engines.append(plan_engines("judge", load_model_config(args.judge), workload.cluster,
                                    workload.seq_len, args.gpu_memory_utilization))
    return engines


def _with_iteration(args, request: PlanRequest, plans: List[TrainingPlan], text: str,
                    report: dict) -> str:
    """Append the whole-iteration estimate (if asked for) to the text or JSON report."""
    if request.iteration is not None:
        comparison = compare_pools(request.workload, plans, request.iteration,
                                   request.iteration_assumptions)
        if args.json:
            report["iteration"] = iteration_report_dict(comparison, request.iteration,
                                                        request.iteration_assumptions)
        else:
            text += "\n\n" + format_iteration(comparison, request.iteration)
    return json.dumps(report, indent=2) if args.json else text


def _fitting_whole_runs(request: PlanRequest, plans: List[TrainingPlan], wanted: int):
    """``(the fastest plans, up to wanted, whose whole run fits; the fastest plan's misfit
    if none does)``; all plans without ``--experiment``."""
    if request.whole_run is None:
        return plans, ""
    world = request.workload.cluster.world_size
    fitting = []
    for plan in plans:
        if request.whole_run.fits(plan.layout, world):
            fitting.append(plan)
            if len(fitting) == wanted:
                break
    if fitting or not plans:
        return fitting, ""
    return [], request.whole_run.verdict(plans[0].layout, world)


def search_report(args: argparse.Namespace, request: PlanRequest) -> str:
    workload = request.workload
    search = search_training(workload)
    fitting, misfit = _fitting_whole_runs(request, search.plans, max(args.top, 1))
    if search.plans and not fitting:
        raise PlanError(f"{len(search.plans)} layouts fit the trainer alone, none the whole "
                        f"run beside its engines and judge; the fastest, "
                        f"{search.plans[0].layout.label()}: {misfit}")
    search = replace(search, plans=fitting)
    if not search.plans:
        summary = search.rejection_summary()[:3]
        if search.not_runnable:
            plan, reason = search.not_runnable[0]
            summary.insert(0, ("fits but not runnable", len(search.not_runnable),
                               f"{plan.layout.label()}: {reason}"))
        reasons = "; ".join(f"{count} x {category} (e.g. {example})"
                            for category, count, example in summary)
        cluster = workload.cluster
        raise PlanError(f"no layout of {workload.model.name} fits {cluster.nodes} x "
                        f"{cluster.gpus_per_node} {cluster.gpu_name}: {reasons}")
    engines = _engines(args, workload)
    emitted = _emit(args, request, search.plans[0], engines)
    report = plan_report_dict(workload, search, args.top, args.show_rejected, engines)
    report["emitted"] = [str(path) for path in emitted]
    text = format_report(workload, search, args.top, args.show_rejected, engines,
                         args.gpu_memory_utilization)
    text += "\n\n" + _whole_run_line(request, "")
    if emitted:
        text += "\n\n" + _emitted_lines(args, emitted)
    return _with_iteration(args, request, search.plans, text, report)


def _whole_run_line(request: PlanRequest, verdict: str) -> str:
    if request.whole_run is None:
        return ("Counted: the trainer only. The engines and the judge beside it are not: "
                "--experiment NAME [tpo-run overrides] judges the whole run by its memory "
                "ledger, as tpo-run --dry-run does.")
    name = request.whole_run.config.run.name
    return (f"Whole run ({name}, engines and judge beside the trainer, as tpo-run --dry-run "
            f"sizes it): " + (verdict or "fits in every phase."))


def _emit(args: argparse.Namespace, request: PlanRequest, plan: TrainingPlan,
          engines) -> List[Path]:
    if not args.emit:
        return []
    paths = emit_plan(Path(args.emit), request.workload, plan, engines,
                      job_name=f"tpo-{request.workload.model.name}")
    overrides = Path(args.emit) / OVERRIDES_FILE
    overrides.write_text("\n".join(layout_overrides(plan.layout)) + "\n")
    return paths + [overrides]


def _emitted_lines(args: argparse.Namespace, emitted: List[Path]) -> str:
    recipe = f"experiment={args.experiment} " if args.experiment else ""
    return ("Wrote " + ", ".join(str(path) for path in emitted) + "\nRun it with: tpo-run "
            f"--dry-run {recipe}$(cat {Path(args.emit) / OVERRIDES_FILE}) ..., then the same "
            "overrides after sbatch slurm/<recipe>.sh")


def layout_report(args: argparse.Namespace, request: PlanRequest) -> str:
    workload = request.workload
    assessment = assess_layout(workload, request.layout)
    # The iteration runs on this layout if it runs, else on the smallest fix.
    plans = [assessment.plan] if assessment.runs else [fix.plan for fix in assessment.fixes[:1]]
    text = format_layout_report(workload, assessment)
    report = layout_report_dict(workload, assessment)
    verdict = (request.whole_run.verdict(request.layout, workload.cluster.world_size)
               if request.whole_run is not None and assessment.runs else "")
    report["whole_run"] = (None if request.whole_run is None or not assessment.runs
                           else {"fits": not verdict, "verdict": verdict})
    if assessment.runs:
        text += "\n\n" + _whole_run_line(request, verdict)
    if args.emit:
        if not assessment.runs or verdict:
            raise ConfigError("--emit: this layout cannot run (see the report without --emit)")
        emitted = _emit(args, request, assessment.plan, _engines(args, workload))
        report["emitted"] = [str(path) for path in emitted]
        text += "\n\n" + _emitted_lines(args, emitted)
    return _with_iteration(args, request, plans, text, report)


def run_dir_report(args: argparse.Namespace) -> str:
    """``--check RUN_DIR`` or ``--calibrate RUN_DIR``."""
    run_dir = Path(args.check or args.calibrate)
    config, metrics = read_run_dir(run_dir)
    gpu_name = args.gpu or config.hardware
    try:
        cluster = _cluster(argparse.Namespace(**dict(vars(args), gpu=gpu_name, nodes=None)),
                           config)
    except ConfigError as error:
        if args.calibrate:
            raise ConfigError(f"cannot calibrate {run_dir}: {error}") from error
        return _check_text(run_dir, config, uncomparable_figures(
            metrics, f"no estimate: {error}"), args)
    assumptions, iteration_assumptions = _assumptions(args)
    model = run_model(config, metrics, cluster, assumptions, iteration_assumptions)
    if args.check:
        return _check_text(run_dir, config, check_figures(model, metrics), args)
    calibration, notes = fit_calibration(model, metrics, source=str(run_dir))
    path = save_calibration(calibration, args.calibration_out or run_dir / CALIBRATION_FILE)
    fitted = {name: getattr(calibration, name) for name in
              ("mfu_bf16", "mfu_fp8", "decode_efficiency")}
    if args.json:
        return json.dumps({"calibration": str(path), "fitted": fitted, "notes": notes}, indent=2)
    lines = [f"tpo-plan --calibrate {run_dir} on {calibration.hardware}: wrote {path}"]
    lines += [f"  {name}: {'-' if value is None else f'{value:.4f}'}" for name, value in fitted.items()]
    return "\n".join(lines + [f"  {note}" for note in notes])


def _check_text(run_dir: Path, config: RecordedRun, figures, args: argparse.Namespace) -> str:
    if args.json:
        return json.dumps({"run_dir": str(run_dir), "figures": [
            {"name": f.name, "unit": f.unit, "estimate": f.estimate, "measured": f.measured,
             "relative_error": f.relative_error, "note": f.note} for f in figures]}, indent=2)
    header = (f"tpo-plan --check {run_dir}: {config.model.name}, {config.world_size} x "
              f"{args.gpu or config.hardware}, layout TP{config.parallel.tensor_model_parallel_size}"
              f" PP{config.parallel.pipeline_model_parallel_size}")
    return "\n".join([header] + format_figures(figures))
