"""Estimate a recorded run again and set each figure beside its measurement.

    model = run_model(config, metrics, cluster, Assumptions(), IterationAssumptions())
    for figure in check_figures(model, metrics):
        figure.name, figure.estimate, figure.measured, figure.relative_error

The estimate is made for exactly what the run did: its layout, its measured batch and
sequence lengths, its measured sample and pair counts, so the errors are the model's,
not the workload guess's.
"""

import math
from dataclasses import dataclass, replace
from typing import List, Optional

from megatron_tpo.config import ConfigError
from megatron_tpo.plan.cost.iteration import (IterationAssumptions, IterationEstimate,
                                              IterationRequest)
from megatron_tpo.plan.cost.memory import training_memory
from megatron_tpo.plan.cost.pools import estimate_iteration
from megatron_tpo.plan.cost.timing import step_time
from megatron_tpo.plan.hardware import GIB
from megatron_tpo.plan.recorded.run_dir import STAGES, RecordedRun, RunMetrics
from megatron_tpo.plan.search.given_layout import layout_from_parallel
from megatron_tpo.plan.search.training import estimate_plan
from megatron_tpo.plan.workload import Assumptions, Cluster, TrainingLayout, Workload

# The metrics record thought + response together; the judge reads the response only.
# Without a per-part count, half of the completion is taken to be the response.
RESPONSE_SHARE = 0.5


@dataclass(frozen=True)
class Figure:
    name: str
    unit: str
    measured: Optional[float]
    estimate: Optional[float]
    note: str = ""  # why a figure is not compared, or what its estimate assumed

    @property
    def relative_error(self) -> Optional[float]:
        """(estimate - measured) / measured; None when either is missing."""
        if self.measured is None or self.estimate is None or self.measured == 0:
            return None
        return (self.estimate - self.measured) / self.measured


@dataclass(frozen=True)
class RunModel:
    """The run as the planner sees it: what to estimate, on which hardware."""

    config: RecordedRun
    workload: Workload           # the trainer's steps at their measured mean length
    peak_workload: Workload      # ... at the longest step's length (sizes the peak)
    layout: TrainingLayout
    request: Optional[IterationRequest]  # None without "iteration" records
    iteration_assumptions: IterationAssumptions
    lengths_from: str = "measured step tokens"  # where the sequence lengths came from


def _global_batch(config: RecordedRun, metrics: RunMetrics, layout: TrainingLayout) -> int:
    """Sequences per step: 2 x run.pairs_per_step, else 2 x pairs / steps of an iteration,
    else one micro-batch per DP rank."""
    if config.pairs_per_step:
        return 2 * config.pairs_per_step
    pairs, steps = metrics.iteration_mean("pairs"), metrics.steps_per_iteration()
    if pairs and steps:
        return max(1, round(2 * pairs / steps))
    return config.micro_batch_sequences * layout.dp


def _iteration_request(config: RecordedRun, metrics: RunMetrics) -> Optional[IterationRequest]:
    samples = metrics.iteration_mean("samples")
    completion = metrics.iteration_mean("mean_completion_tokens")
    if not samples or completion is None:
        return None
    return IterationRequest(
        prompts=max(1, round(samples / config.samples_per_prompt)),
        samples=config.samples_per_prompt,
        prompt_tokens=metrics.iteration_mean("mean_prompt_tokens") or 0.0,
        thought_tokens=completion * (1 - RESPONSE_SHARE),
        response_tokens=completion * RESPONSE_SHARE,
        judge_kind="pairwise" if config.judge_kind == "pairwise" else "reward_model",
        judge_model=config.model,  # the judge's own config is not in the run's config
        verdict_tokens=config.pairwise_verdict_tokens,
        comparisons_per_prompt=config.pairwise_max_pairs,
        pairs=round(metrics.iteration_mean("pairs") or 0) or None,
    )


def run_model(config: RecordedRun, metrics: RunMetrics, cluster: Cluster, assumptions: Assumptions,
              iteration_assumptions: IterationAssumptions) -> RunModel:
    if cluster.world_size != config.world_size:
        raise ConfigError(f"run.world_size={config.world_size} but the cluster has "
                          f"{cluster.world_size} GPUs ({cluster.nodes} x {cluster.gpus_per_node})")
    layout = layout_from_parallel(config.parallel, config.world_size,
                                  config.micro_batch_sequences, config.recompute,
                                  config.train.fp8.enabled)
    global_batch = _global_batch(config, metrics, layout)
    mean_len, longest, source = _sequence_lengths(config, metrics, global_batch)
    workload = Workload(config.model, cluster, max(1, round(mean_len)), global_batch, assumptions)
    return RunModel(config, workload, replace(workload, seq_len=max(1, math.ceil(longest))),
                    layout, _iteration_request(config, metrics), iteration_assumptions, source)


def _sequence_lengths(config: RecordedRun, metrics: RunMetrics, global_batch: int):
    """(mean, longest, where from): the steps' own token counts, else the iterations'
    mean prompt + completion, else the config's maxima."""
    step_tokens = [row["sequence_tokens"] for row in metrics.train_steps
                   if row.get("sequence_tokens")]
    if step_tokens:
        return (sum(step_tokens) / len(step_tokens) / global_batch,
                max(step_tokens) / global_batch, "measured step tokens")
    completion = metrics.iteration_mean("mean_completion_tokens")
    if completion is not None:
        mean = (metrics.iteration_mean("mean_prompt_tokens") or 0.0) + completion
        return mean, mean, "iterations' mean prompt + completion"
    longest = config.max_prompt_tokens + config.max_new_tokens
    return longest, longest, "config maxima: nothing measured"


def colocated_iteration(model: RunModel) -> Optional[IterationEstimate]:
    """The run's iteration estimated as tpo-run runs it: engines inside the trainer's
    processes, in the memory the trainer's resident state leaves."""
    if model.request is None:
        return None
    plan = estimate_plan(model.workload, model.layout)
    memory = plan.memory
    resident = memory.weights + memory.gradients + memory.optimizer
    utilization = (model.iteration_assumptions.gpu_memory_utilization
                   - resident / model.workload.cluster.gpu.memory_bytes)
    return estimate_iteration("colocated", model.workload, plan, model.workload.cluster,
                              utilization, model.request, model.iteration_assumptions)


def _trainer_figures(model: RunModel, metrics: RunMetrics) -> List[Figure]:
    workload, layout = model.workload, model.layout
    step = step_time(workload, layout).total
    tokens = workload.global_batch * workload.seq_len
    measured_rate = [row["tokens_per_second"] for row in metrics.train_steps
                     if row.get("tokens_per_second")]
    peak = metrics.peak_memory_bytes()
    return [
        Figure("train step", "s", metrics.step_seconds(), step,
               f"{workload.global_batch} sequences of {workload.seq_len} tokens ({model.lengths_from})"),
        Figure("train tokens/s", "tokens/s",
               sorted(measured_rate)[len(measured_rate) // 2] if measured_rate else None,
               tokens / step),
        Figure("peak memory (most loaded rank)", "GiB", peak / GIB if peak is not None else None,
               training_memory(model.peak_workload, layout).total / GIB,
               "" if peak is not None else "no peak recorded (CPU runs have no "
               "torch.cuda.max_memory_allocated)"),
    ]


def check_figures(model: RunModel, metrics: RunMetrics) -> List[Figure]:
    """Estimate against measurement for the step, its memory and every loop stage."""
    figures = _trainer_figures(model, metrics)
    iteration = colocated_iteration(model)
    if model.request is None:
        note = "no \"iteration\" records in metrics.jsonl"
    elif iteration is None:
        note = "the engines do not fit beside the trainer in the estimate"
    else:
        note = ""
    for stage in STAGES:
        estimate = getattr(iteration.stages, stage) if iteration else None
        figures.append(Figure(f"iteration: {stage}", "s", metrics.stage_seconds(stage),
                              estimate, note))
    return figures


def uncomparable_figures(metrics: RunMetrics, reason: str) -> List[Figure]:
    """The measured figures alone, each saying why there is no estimate beside it."""
    peak = metrics.peak_memory_bytes()
    rows = [Figure("train step", "s", metrics.step_seconds(), None, reason),
            Figure("peak memory (most loaded rank)", "GiB",
                   peak / GIB if peak is not None else None, None, reason)]
    return rows + [Figure(f"iteration: {stage}", "s", metrics.stage_seconds(stage), None, reason)
                   for stage in STAGES]


def _show(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.3f}"


def format_figures(figures: List[Figure]) -> List[str]:
    lines = [f"  {'figure':<34} {'estimate':>12} {'measured':>12} {'rel. error':>10}"]
    for figure in figures:
        error = figure.relative_error
        lines.append(f"  {figure.name + ' (' + figure.unit + ')':<34} {_show(figure.estimate):>12} "
                     f"{_show(figure.measured):>12} {'-' if error is None else f'{error:+.1%}':>10}"
                     + (f"  {figure.note}" if figure.note else ""))
    return lines
