"""``tpo-fit-batch``: fit a fixed batch with the full trainer stack (default: tiny, TP2/PP2, CPU).

Run as is, it spawns TP*PP local gloo processes. Under torchrun or srun it runs as one
rank of the job instead (NCCL and bf16 on GPUs), e.g. to check a layout on a cluster:

    srun --ntasks-per-node=8 tpo-fit-batch --model llama3_8b --tp 8 --pp 1 --seq-len 4096
"""

import argparse
import statistics

from megatron_tpo.config import ParallelConfig, load_model_config
from megatron_tpo.parallel import detect_distributed_env
from megatron_tpo.train.fixed_batch import FixedBatchRun, run_locally, train_on_fixed_batch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpo-fit-batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="configs/model name or YAML path")
    parser.add_argument("--tp", type=int, default=2, help="tensor parallel size")
    parser.add_argument("--pp", type=int, default=2, help="pipeline parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--mcore", default=None,
                        help="weights converted by `tpo-convert hf-to-mcore` (default: random)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run = FixedBatchRun(
        model=load_model_config(args.model),
        parallel=ParallelConfig(tensor_model_parallel_size=args.tp,
                                pipeline_model_parallel_size=args.pp,
                                virtual_pipeline_model_parallel_size=args.vpp),
        steps=args.steps, micro_batches=args.micro_batches,
        micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, shard_root=args.mcore,
    )
    env = detect_distributed_env()
    if env.launcher == "single":
        print(f"training {run.model.name} at TP={args.tp} PP={args.pp} VPP={args.vpp or 1} on "
              f"{run.parallel.model_parallel_size} local CPU processes (gloo)", flush=True)
        records = run_locally(run)
    else:
        records = train_on_fixed_batch(env.rank, env.world_size, run)
        if records[0].loss is None:
            return
    times = [r.seconds for r in records[1:]] or [records[0].seconds]
    print(f"loss {records[0].loss:.4f} -> {records[-1].loss:.4f}; median step "
          f"{statistics.median(times) * 1000:.0f} ms over {len(times)} steps after the first")


if __name__ == "__main__":
    main()
