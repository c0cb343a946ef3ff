"""The report on one given layout (``tpo-plan --layout`` / ``--from``), as data and text."""

from typing import Dict, List

from megatron_tpo.plan.hardware import GIB
from megatron_tpo.plan.report.search import MEMORY_LABELS, training_plan_dict
from megatron_tpo.plan.search.given_layout import MAX_MOVES, LayoutAssessment
from megatron_tpo.plan.workload import Workload


def layout_report_dict(workload: Workload, assessment: LayoutAssessment) -> Dict:
    cluster = workload.cluster
    return {
        "request": {"model": workload.model.name, "gpu": cluster.gpu_name,
                    "nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node,
                    "world_size": cluster.world_size, "seq_len": workload.seq_len,
                    "global_batch": workload.global_batch, "layout": assessment.layout.label()},
        "runs": assessment.runs,
        "problems": [{"category": category, "reason": reason}
                     for category, reason in assessment.problems],
        "parameters": {"total": assessment.total_parameters,
                       "most_loaded_rank": assessment.most_loaded_rank_parameters,
                       "most_loaded_pipeline_stage": assessment.most_loaded_stage},
        "estimate": (training_plan_dict(workload, assessment.plan)
                     if assessment.plan is not None else None),
        "fixes": [dict(training_plan_dict(workload, fix.plan), changes=list(fix.changes))
                  for fix in assessment.fixes],
    }


def _estimate_lines(workload: Workload, assessment: LayoutAssessment) -> List[str]:
    plan = assessment.plan
    if plan is None:
        return ["", "No estimate: the layout does not split the model (see above)."]
    memory, capacity = plan.memory.as_gib(), workload.cluster.gpu.memory_gib
    lines = ["", f"Memory per GPU (PP stage {plan.memory.pipeline_stage}, the most loaded):"]
    lines += [f"  {label:<58} {memory[key]:>7.2f} GiB" for key, label in MEMORY_LABELS.items()]
    lines.append(f"  {'total':<58} {memory['total']:>7.2f} GiB of {capacity:.1f}")
    lines += ["", f"Step time {plan.time.total:.3f} s: " + ", ".join(
        f"{key.replace('_', ' ')} {value:.3f} s" for key, value in plan.time.as_dict().items()
        if key != "total"),
        f"  {plan.tokens_per_second:,.0f} tokens/s, MFU {plan.mfu:.1%} "
        f"({plan.layout.num_microbatches(workload.global_batch)} micro-batches per step)"]
    return lines


def format_layout_report(workload: Workload, assessment: LayoutAssessment) -> str:
    cluster, layout = workload.cluster, assessment.layout
    lines = [f"tpo-plan: {workload.model.name} on {cluster.nodes} x {cluster.gpus_per_node} "
             f"{cluster.gpu_name} ({cluster.world_size} GPUs), seq-len {workload.seq_len}, "
             f"global batch {workload.global_batch}",
             f"Layout: {layout.label()}",
             f"Parameters: {assessment.total_parameters / 1e9:.2f} B in the model"
             + (f", {assessment.most_loaded_rank_parameters / 1e9:.3f} B on each rank of PP "
                f"stage {assessment.most_loaded_stage} (the stage with the most)"
                if assessment.most_loaded_rank_parameters is not None else ""),
             ""]
    if assessment.runs:
        lines.append("Verdict: the trainer runs and fits (the whole run: see the end).")
    else:
        lines.append(f"Verdict: cannot run ({len(assessment.problems)} "
                     f"problem{'s' if len(assessment.problems) > 1 else ''}):")
        lines += [f"  - {reason}" for _, reason in assessment.problems]
    lines += _estimate_lines(workload, assessment)
    if assessment.problems:
        lines += ["", "Smallest changes that make it run (fewest changes, then fastest):"]
        lines += [f"  {' + '.join(fix.changes)}: {fix.plan.memory.total / GIB:.1f} GiB/GPU, "
                  f"{fix.plan.time.total:.2f} s/step, {fix.plan.tokens_per_second:,.0f} tokens/s"
                  for fix in assessment.fixes] or [f"  none within {MAX_MOVES} changes"]
    return "\n".join(lines)
