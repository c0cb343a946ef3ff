"""The whole-iteration estimate (colocated against separate pools) as data and text."""

from dataclasses import asdict
from typing import Dict, Optional

from megatron_tpo.plan.cost.iteration import (IterationAssumptions, IterationEstimate,
                                              IterationRequest)
from megatron_tpo.plan.cost.pools import PoolComparison

STAGE_ORDER = ("rollout", "judge", "reference_logprobs", "train", "weight_sync", "checkpoint",
               "engine_switches")


def estimate_dict(estimate: Optional[IterationEstimate]) -> Optional[Dict]:
    if estimate is None:
        return None
    return {"mode": estimate.mode, "trainer_gpus": estimate.trainer_gpus,
            "engine_gpus": estimate.engine_gpus,
            "trainer_layout": estimate.trainer_plan.layout.label(),
            "policy_engine": {"tp": estimate.policy_engine.tp,
                              "kv_cache_gib": estimate.policy_engine.kv_cache_gib},
            "judge_engine": {"tp": estimate.judge_engine.tp,
                             "kv_cache_gib": estimate.judge_engine.kv_cache_gib},
            "seconds": estimate.stages.as_dict()}


def iteration_report_dict(comparison: PoolComparison, request: IterationRequest,
                          assume: IterationAssumptions) -> Dict:
    recommended = comparison.recommended
    request_dict = asdict(request)
    request_dict["judge_model"] = request.judge_model.name
    return {"request": request_dict, "assumptions": asdict(assume),
            "colocated": estimate_dict(comparison.colocated),
            "separate": [estimate_dict(estimate) for estimate in comparison.separate],
            "recommended": recommended.mode if recommended else None}


def _describe(estimate: IterationEstimate) -> str:
    if estimate.mode == "colocated":
        pools = f"all {estimate.trainer_gpus} GPUs train and, in turn, generate"
    else:
        pools = f"{estimate.trainer_gpus} GPUs train, {estimate.engine_gpus} generate"
    return (f"{estimate.mode} ({pools}; trainer {estimate.trainer_plan.layout.label()}; "
            f"policy engine TP{estimate.policy_engine.tp}, judge TP{estimate.judge_engine.tp})")


def format_iteration(comparison: PoolComparison, request: IterationRequest) -> str:
    options = ([comparison.colocated] if comparison.colocated else []) + comparison.separate[:1]
    lines = [f"One TPO iteration: {request.prompts} prompts x {request.samples} samples, "
             f"means {request.prompt_tokens:.0f} prompt + {request.thought_tokens:.0f} thought "
             f"+ {request.response_tokens:.0f} response tokens, {request.dpo_pairs} pairs, "
             f"judge {request.judge_kind} ({request.judge_model.name})"]
    if not options:
        return "\n".join(lines + [
            "  no arrangement fits: colocated, the engines find no room beside the trainer's "
            "resident weights, gradients and optimizer state; separate, no split of the "
            "cluster leaves the trainer a pool it fits on and the engines one they fit on"])
    header = f"  {'stage (seconds)':<20}" + "".join(f"{o.mode:>12}" for o in options)
    lines += [header]
    for stage in STAGE_ORDER:
        lines.append(f"  {stage:<20}" + "".join(f"{getattr(o.stages, stage):>12.1f}"
                                                for o in options))
    lines.append(f"  {'total':<20}" + "".join(f"{o.stages.total:>12.1f}" for o in options))
    for option in options:
        lines.append(f"  {_describe(option)}")
    if comparison.colocated is None:
        lines.append("  colocated: the engines do not fit beside the trainer's resident "
                     "weights, gradients and optimizer state")
    best = comparison.recommended
    others = [o for o in options if o is not best]
    margin = (f"; {others[0].mode} would take {others[0].stages.total / best.stages.total - 1:.0%}"
              " longer" if others else "")
    lines.append(f"Recommended: {best.mode}: {best.stages.total / 60:.1f} min per "
                 f"iteration{margin}.")
    return "\n".join(lines)
