"""``tpo-plan``: choose, judge and check the trainer's and the engines' layout.

    # rank layouts
    tpo-plan --model llama3_70b --nodes 8 --seq-len 4096 --global-batch 256 [--judge llama3_8b]
    # judge one layout: memory, step time, every problem and the smallest fixes
    tpo-plan --model llama3_70b --nodes 8 --seq-len 4096 --global-batch 256 \
             --layout tp=4,pp=4,vpp=5,cp=2,mbs=1 [--recompute full] [--fp8]
    tpo-plan --from plans/70b/parallel.yaml ...  |  tpo-plan --from RUN_DIR/config.yaml ...
    # judge the whole run, engines and judge beside the trainer, as tpo-run --dry-run does:
    # the recipe gives the model, sequence length, batch and GPU; tpo-run's overrides follow
    tpo-plan --experiment llama3_70b --nodes 8 [--layout ...] run.policy=... \
             judge.pairwise.model=... prompts.path=... evaluation.path=...
    # add one whole TPO iteration, colocated against separate engine pools
    ... --prompts 5000 --samples 8 --prompt-tokens 300 --thought-tokens 400 \
        --response-tokens 300 --judge-kind reward_model --judge llama3_8b
    # learn from a run
    tpo-plan --check RUN_DIR          # estimate against measurement, per figure
    tpo-plan --calibrate RUN_DIR      # fit MFU and decode efficiency -> calibration.yaml
    tpo-plan ... --calibration RUN_DIR/calibration.yaml
"""

import argparse
import os
import sys
from typing import List, Optional

from megatron_tpo.config import ConfigError
from megatron_tpo.plan import modes
from megatron_tpo.plan.search.training import PlanError
from megatron_tpo.plan.workload import RECOMPUTE_CHOICES, Assumptions


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Assumptions()
    parser.add_argument("--experiment", help="a tpo-run experiment (configs/experiment): judge "
                        "every layout by the whole run's memory ledger, engines and judge "
                        "beside the trainer, as tpo-run --dry-run does; it gives --model, "
                        "--seq-len, --global-batch, --gpu and --nodes defaults")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="with --experiment: tpo-run overrides (the same paths its dry run "
                             "reads: run.policy, prompts.path, evaluation.path, judge models)")
    parser.add_argument("--model", help="name in configs/model or a YAML path "
                        "(with --from RUN_DIR/config.yaml: the run's model)")
    parser.add_argument("--nodes", type=int, help="nodes (with a run config: its world size)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", help="name in the GPU table (default h100-80gb; with a run "
                        "config or --check: the run's run.hardware)")
    parser.add_argument("--gpu-table", help="your own GPU table YAML (configs/hardware/gpus.yaml schema)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence the memory must hold")
    parser.add_argument("--global-batch", type=int,
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


def _add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", help="judge this layout: tp=4,pp=4,vpp=5,cp=2,mbs=1")
    parser.add_argument("--from", dest="from_file", metavar="FILE",
                        help="judge the layout of a parallel YAML (configs/parallel schema) or "
                             "of a run's config.yaml")
    parser.add_argument("--recompute", choices=RECOMPUTE_CHOICES,
                        help="with --layout/--from: activation recomputation (default none, or "
                             "the run config's)")
    parser.add_argument("--fp8", action="store_true", help="with --layout/--from: FP8 GEMMs")
    parser.add_argument("--micro-batch", type=int,
                        help="with --from a parallel YAML: sequences per micro-batch (default 1)")


def _add_iteration_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("whole TPO iteration (given --prompts or --response-tokens)")
    group.add_argument("--prompts", type=int, help="prompts per iteration")
    group.add_argument("--samples", type=int, help="K samples per prompt (default 8)")
    group.add_argument("--prompt-tokens", type=float, help="mean prompt length")
    group.add_argument("--thought-tokens", type=float, help="mean thought length")
    group.add_argument("--response-tokens", type=float, help="mean response length")
    group.add_argument("--judge-kind", choices=("reward_model", "pairwise"),
                       help="reward-model forward, or pairwise verdicts in both orders")
    group.add_argument("--verdict-tokens", type=float, default=256.0,
                       help="pairwise: mean generated tokens per verdict (default 256)")
    group.add_argument("--comparisons-per-prompt", type=int,
                       help="pairwise: comparisons per prompt (default all K(K-1)/2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpo-plan",
        description="Rank or judge parallel layouts (TP, PP, VPP, CP, DP, micro-batch, "
                    "recompute, FP8) for the TPO trainer and the vLLM engines, estimate a "
                    "whole TPO iteration, and check estimates against a recorded run.")
    _add_cluster_arguments(parser)
    _add_layout_arguments(parser)
    _add_iteration_arguments(parser)
    parser.add_argument("--check", metavar="RUN_DIR", help="estimate against measurement")
    parser.add_argument("--calibrate", metavar="RUN_DIR",
                        help="fit MFU and decode efficiency to a run; write a calibration YAML")
    parser.add_argument("--calibration-out", metavar="FILE",
                        help="where --calibrate writes (default RUN_DIR/calibration.yaml)")
    parser.add_argument("--calibration", metavar="FILE", help="use a --calibrate result")
    parser.add_argument("--top", type=int, default=5, help="how many trainer plans to show")
    parser.add_argument("--show-rejected", action="store_true", help="list every rejected layout")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--emit", metavar="DIR", help="write the best plan's configs and #SBATCH header")
    return parser


def whole_run(args: argparse.Namespace) -> Optional[modes.WholeRun]:
    """``--experiment``: the composed run config and its dry run (None without it)."""
    if not args.experiment:
        return None
    from megatron_tpo.cli.run import compose_config
    from megatron_tpo.dry_run import dry_run

    config = compose_config([f"experiment={args.experiment}", *args.overrides])
    recorded = config.run.world_size or config.parallel.model_parallel_size
    config.validate(recorded)
    return modes.WholeRun(config, dry_run(config, recorded))


def run(args: argparse.Namespace) -> str:
    """The report ``tpo-plan`` prints for ``args``; ConfigError/PlanError for bad input."""
    if args.check and args.calibrate:
        raise ConfigError("--check and --calibrate: give one")
    if args.check or args.calibrate:
        return modes.run_dir_report(args)
    request = modes.resolve_request(args, whole_run(args))
    if request.layout is not None:
        return modes.layout_report(args, request)
    return modes.search_report(args, request)


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
