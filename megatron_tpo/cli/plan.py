"""``tpo-plan``: choose the trainer's and the engines' parallel layout before a run.

    tpo-plan --model llama3_70b --nodes 8 --gpus-per-node 8 --gpu h100-80gb \
             --seq-len 4096 --global-batch 256 [--judge llama3_70b] [--json] [--emit DIR]
"""

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from megatron_tpo.config import ConfigError, load_model_config
from megatron_tpo.plan.emit import emit_plan
from megatron_tpo.plan.hardware import find_gpu
from megatron_tpo.plan.report import format_report, plan_report_dict
from megatron_tpo.plan.rollout import plan_engines
from megatron_tpo.plan.training_search import PlanError, search_training
from megatron_tpo.plan.workload import Assumptions, Cluster, Workload


def build_parser() -> argparse.ArgumentParser:
    defaults = Assumptions()
    parser = argparse.ArgumentParser(
        prog="tpo-plan",
        description="Rank parallel layouts (TP, PP, VPP, CP, DP, micro-batch, recompute, FP8) "
                    "for the TPO trainer and TP/replicas for the vLLM engines.")
    parser.add_argument("--model", required=True, help="name in configs/model or a YAML path")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", default="h100-80gb", help="name in the GPU table")
    parser.add_argument("--gpu-table", help="your own GPU table YAML (configs/hardware/gpus.yaml schema)")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--global-batch", type=int, required=True,
                        help="sequences per optimizer step (a DPO pair is two sequences)")
    parser.add_argument("--judge", help="judge model served by vLLM (name or YAML path)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="vLLM's share of each GPU for the engines (default 0.9)")
    parser.add_argument("--no-fp8", action="store_true", help="consider BF16 layouts only")
    parser.add_argument("--attention", choices=("flash", "unfused"), default=defaults.attention)
    parser.add_argument("--logprobs", choices=("fused", "naive"), default=defaults.logprobs,
                        help="fused DPO log-prob kernel or full fp32 logits")
    parser.add_argument("--mfu-bf16", type=float, default=defaults.mfu_bf16)
    parser.add_argument("--mfu-fp8", type=float, default=defaults.mfu_fp8)
    parser.add_argument("--top", type=int, default=5, help="how many trainer plans to show")
    parser.add_argument("--show-rejected", action="store_true", help="list every rejected layout")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--emit", metavar="DIR", help="write the best plan's configs and #SBATCH header")
    return parser


def _check_request(args: argparse.Namespace) -> None:
    for name in ("nodes", "gpus_per_node", "seq_len", "global_batch", "top"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
    for name in ("mfu_bf16", "mfu_fp8"):
        if not 0 < getattr(args, name) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1]")


def run(args: argparse.Namespace) -> str:
    _check_request(args)
    model = load_model_config(args.model)
    if args.seq_len > model.max_position_embeddings:
        raise ConfigError(f"--seq-len {args.seq_len} exceeds {model.name}'s "
                          f"max_position_embeddings={model.max_position_embeddings}")
    gpu = find_gpu(args.gpu, args.gpu_table)
    assumptions = replace(Assumptions(), attention=args.attention, logprobs=args.logprobs,
                          mfu_bf16=args.mfu_bf16, mfu_fp8=args.mfu_fp8,
                          allow_fp8=not args.no_fp8)
    cluster = Cluster(args.gpu, gpu, args.nodes, args.gpus_per_node)
    workload = Workload(model, cluster, args.seq_len, args.global_batch, assumptions)

    search = search_training(workload)
    if not search.plans:
        reasons = "; ".join(f"{count} x {category} (e.g. {example})"
                            for category, count, example in search.rejection_summary()[:3])
        raise PlanError(f"no layout of {model.name} fits {cluster.nodes} x "
                        f"{cluster.gpus_per_node} {args.gpu}: {reasons}")

    engines = [plan_engines("policy", model, cluster, args.seq_len, args.gpu_memory_utilization)]
    if args.judge:
        judge = load_model_config(args.judge)
        engines.append(plan_engines("judge", judge, cluster, args.seq_len,
                                    args.gpu_memory_utilization))

    emitted: List[Path] = []
    if args.emit:
        emitted = emit_plan(Path(args.emit), workload, search.plans[0], engines,
                            job_name=f"tpo-{model.name}")
    if args.json:
        report = plan_report_dict(workload, search, args.top, args.show_rejected, engines)
        report["emitted"] = [str(path) for path in emitted]
        return json.dumps(report, indent=2)
    text = format_report(workload, search, args.top, args.show_rejected, engines,
                         args.gpu_memory_utilization)
    if emitted:
        text += "\n\nWrote " + ", ".join(str(path) for path in emitted)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except (ConfigError, PlanError) as error:
        print(f"tpo-plan: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `tpo-plan ... | head` closed the pipe early; nothing is wrong with the plan.
        sys.stdout = open(os.devnull, "w")
    return 0


if __name__ == "__main__":
    sys.exit(main())
