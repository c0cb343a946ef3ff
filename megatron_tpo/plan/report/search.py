"""The planner's answer as plain data (for --json) and as a readable report."""

from dataclasses import asdict
from typing import Dict, List

from megatron_tpo.plan.cost.engines import EngineSearch
from megatron_tpo.plan.cost.parameters import most_loaded_rank_parameters, total_parameters
from megatron_tpo.plan.hardware import GIB
from megatron_tpo.plan.search.training import NEAR_TIE, TrainingPlan, TrainingSearch
from megatron_tpo.plan.workload import Workload

MEMORY_LABELS = {
    "weights": "weights (bf16, padded buffer; + FP8 copies)",
    "gradients": "gradients (fp32 main grads)",
    "optimizer": "optimizer (fp32 master + Adam m, v; sharded over DP x CP)",
    "activations": "activations (in-flight micro-batches)",
    "logits": "logits / fused log-prob workspace",
    "communication": "communication buffers",
    "runtime_reserve": "CUDA context, workspaces, fragmentation",
}


def parameter_count_dict(workload: Workload, plan: TrainingPlan) -> Dict:
    layout = plan.layout
    stage, on_rank = most_loaded_rank_parameters(workload.model, layout.tp, layout.pp, layout.vpp)
    return {"total": total_parameters(workload.model), "most_loaded_rank": on_rank,
            "most_loaded_pipeline_stage": stage}


def parameter_count_line(workload: Workload, plan: TrainingPlan) -> str:
    counts = parameter_count_dict(workload, plan)
    return (f"Parameters: {counts['total'] / 1e9:.2f} B in the model, "
            f"{counts['most_loaded_rank'] / 1e9:.3f} B on each rank of PP stage "
            f"{counts['most_loaded_pipeline_stage']} (the stage with the most; padded vocabulary)")


def training_plan_dict(workload: Workload, plan: TrainingPlan) -> Dict:
    layout = plan.layout
    return {
        "tensor_model_parallel_size": layout.tp,
        "pipeline_model_parallel_size": layout.pp,
        "virtual_pipeline_model_parallel_size": layout.vpp if layout.vpp > 1 else None,
        "context_parallel_size": layout.cp,
        "data_parallel_size": layout.dp,
        "sequence_parallel": layout.sequence_parallel,
        "micro_batch_size": layout.micro_batch,
        "num_microbatches": layout.num_microbatches(workload.global_batch),
        "recompute": layout.recompute,
        "fp8": layout.fp8,
        "memory_gib": plan.memory.as_gib(),
        "memory_peak_pipeline_stage": plan.memory.pipeline_stage,
        "step_time_s": plan.time.as_dict(),
        "tokens_per_second": plan.tokens_per_second,
        "mfu": plan.mfu,
        "parameters": parameter_count_dict(workload, plan),
    }


def plan_report_dict(workload: Workload, search: TrainingSearch, top: int,
                     show_rejected: bool, engines: List[EngineSearch]) -> Dict:
    cluster = workload.cluster
    report = {
        "request": {
            "model": workload.model.name,
            "gpu": cluster.gpu_name,
            "nodes": cluster.nodes,
            "gpus_per_node": cluster.gpus_per_node,
            "world_size": cluster.world_size,
            "seq_len": workload.seq_len,
            "global_batch": workload.global_batch,
        },
        "assumptions": asdict(workload.assumptions),
        "training": {
            "feasible": len(search.plans),
            "rejected": len(search.rejections),
            "plans": [training_plan_dict(workload, plan) for plan in search.plans[:top]],
            "rejected_summary": [{"reason": category, "count": count, "example": example}
                                 for category, count, example in search.rejection_summary()],
            "not_runnable": {
                "count": len(search.not_runnable),
                "best": [dict(training_plan_dict(workload, plan), reason=reason)
                         for plan, reason in search.not_runnable[:top]],
            },
        },
        "rollout": {},
    }
    if show_rejected:
        report["training"]["rejected_layouts"] = [
            {"layout": r.layout.label(), "reason": r.reason} for r in search.rejections]
    for engine in engines:
        report["rollout"][engine.role] = {
            "model": engine.model_name,
            "plans": [asdict(plan) for plan in engine.plans],
            "rejected": [{"tp": r.tp, "reason": r.reason} for r in engine.rejections],
        }
    return report


def _training_table(workload: Workload, plans: List[TrainingPlan]) -> List[str]:
    header = (f"{'#':>3} {'TP':>3} {'PP':>3} {'VPP':>4} {'CP':>3} {'DP':>4} {'MBS':>4} "
              f"{'m':>5} {'recompute':>9} {'prec':>5} {'GiB/GPU':>8} {'step s':>8} "
              f"{'tok/s':>10} {'MFU':>6}")
    lines = [header]
    for index, plan in enumerate(plans, 1):
        layout = plan.layout
        lines.append(
            f"{index:>3} {layout.tp:>3} {layout.pp:>3} {layout.vpp if layout.vpp > 1 else '-':>4} "
            f"{layout.cp:>3} {layout.dp:>4} {layout.micro_batch:>4} "
            f"{layout.num_microbatches(workload.global_batch):>5} {layout.recompute:>9} "
            f"{'fp8' if layout.fp8 else 'bf16':>5} {plan.memory.total / GIB:>8.1f} "
            f"{plan.time.total:>8.2f} {plan.tokens_per_second:>10,.0f} {plan.mfu:>6.1%}")
    return lines


def _not_runnable_lines(search: TrainingSearch) -> List[str]:
    if not search.not_runnable:
        return []
    fastest, reason = search.not_runnable[0]
    gain = search.plans[0].time.total / fastest.time.total - 1 if search.plans else 0.0
    return [f"  {len(search.not_runnable)} more layouts fit but are {reason.split(':')[0]} "
            f"(e.g. {fastest.layout.label()}, {fastest.time.total:.2f} s, {gain:.0%} faster: "
            f"{reason.split(': ', 1)[1]}); not ranked"]


def _engine_lines(engine: EngineSearch) -> List[str]:
    lines = [f"  {engine.role} ({engine.model_name}):",
             f"    {'TP':>3} {'replicas/node':>13} {'weights GiB':>11} {'KV GiB':>7} "
             f"{'KV tokens':>10} {'seqs':>5} {'decode tok/s/node':>17}"]
    for plan in engine.plans:
        lines.append(f"    {plan.tp:>3} {plan.replicas_per_node:>13} {plan.weights_gib:>11.1f} "
                     f"{plan.kv_cache_gib:>7.1f} {plan.kv_cache_tokens:>10,} "
                     f"{plan.concurrent_sequences:>5} {plan.decode_tokens_per_second_per_node:>17,.0f}")
    lines += [f"    rejected TP{r.tp}: {r.reason}" for r in engine.rejections]
    return lines


def format_report(workload: Workload, search: TrainingSearch, top: int, show_rejected: bool,
                  engines: List[EngineSearch], gpu_memory_utilization: float) -> str:
    cluster = workload.cluster
    lines = [
        f"tpo-plan: {workload.model.name} on {cluster.nodes} x {cluster.gpus_per_node} "
        f"{cluster.gpu_name} ({cluster.world_size} GPUs), seq-len {workload.seq_len}, "
        f"global batch {workload.global_batch}",
        "",
        f"Trainer: {len(search.plans)} runnable layouts fit, {len(search.rejections)} rejected; "
        f"top {min(top, len(search.plans))} by estimated step time:",
    ]
    lines += _training_table(workload, search.plans[:top])
    lines.append(f"  (estimates within {NEAR_TIE:.0%} count as a tie: less model parallelism first)")
    lines += _not_runnable_lines(search)
    best = search.plans[0]
    lines += ["", parameter_count_line(workload, best)]
    memory = best.memory.as_gib()
    capacity = cluster.gpu.memory_gib
    lines += ["", f"Memory per GPU of plan 1 (PP stage {best.memory.pipeline_stage}, "
                  f"the most loaded):"]
    for key, label in MEMORY_LABELS.items():
        lines.append(f"  {label:<58} {memory[key]:>7.2f} GiB")
    lines.append(f"  {'total':<58} {memory['total']:>7.2f} GiB of {capacity:.1f}")
    timing = best.time.as_dict()
    lines += ["", "Step time of plan 1: " + ", ".join(
        f"{key.replace('_', ' ')} {value:.3f} s" for key, value in timing.items())]
    lines += ["", "Rejected layouts by reason:"]
    for category, count, example in search.rejection_summary():
        lines.append(f"  {count:>6}  {category}  (e.g. {example})")
    if show_rejected:
        lines += ["", "All rejected layouts:"]
        lines += [f"  {r.layout.label()}: {r.reason}" for r in search.rejections]
    if engines:
        lines += ["", f"Rollout engines per node (vLLM, gpu_memory_utilization="
                      f"{gpu_memory_utilization}), highest decode throughput first:"]
        for engine in engines:
            lines += _engine_lines(engine)
    return "\n".join(lines)

