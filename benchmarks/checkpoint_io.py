"""Save and load time and bytes of a training checkpoint (model + Adam state), on this CPU.

One process at TP1/PP1 with the ordinary optimizer: ``TrainingCheckpointer.save`` (the
megatron torch_dist files, RNG, state, the sha256 manifest, the renames) and
``load_latest`` (manifest verification, shape check, the megatron load, copying into
the model and the optimizer). Adam's moments exist because one optimizer step is taken
on zero gradients first; DDP's gradient buffer is then released (nothing here reads
it). The first save of a process also starts megatron's writer queue (a spawned
manager process), so it is reported apart from the later ones.

The 70B projection scales the bytes by the parameter count and by what a GPU run stores
per parameter (bf16 weights + fp32 main weights + two fp32 moments = 14 bytes), and the
time by the measured single-process rate, for one writer and for many writers that each
reach that rate (megatron's fully parallel save splits the files over every rank; the
shared file system's aggregate bandwidth caps this in practice). The last line is JSON.

    python benchmarks/checkpoint_io.py [--model tiny|llama3_1b_bench] [--layers N] [--saves N]
"""

import argparse
import json
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from megatron_tpo.config import ParallelConfig, load_model_config

GPU_BYTES_PER_PARAM = 2 + 4 + 4 + 4
CPU_BYTES_PER_PARAM = 4 + 4 + 4  # fp32 weights are the optimizer's main weights


def _built(model):
    from megatron_tpo.model.llama import build_llama_chunks
    from megatron_tpo.train.megatron_setup import OptimizerSettings, wrap_for_training

    parallel = ParallelConfig()
    chunks = build_llama_chunks(model, parallel)
    ddp_chunks, optimizer = wrap_for_training(chunks, OptimizerSettings(lr=1e-5))
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.step()  # on zero gradients: Adam allocates its moments and step count
    for chunk in ddp_chunks:
        # Checkpoint I/O never reads gradients; releasing DDP's fp32 gradient buffer
        # (4 B/param) lets the 8-layer 1B-class model fit in a 24 GiB machine.
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            buffer.grad_data.untyped_storage().resize_(0)
    return ddp_chunks, optimizer


def _scheduler(optimizer):
    from megatron_tpo.train.config import DPOTrainingConfig
    from megatron_tpo.train.lr_schedule import warmup_decay_scheduler

    return warmup_decay_scheduler(optimizer, DPOTrainingConfig())


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def measure(rank, world_size, model, saves, root):
    """Worker (one gloo process): timings of ``saves`` saves and one verified load."""
    from megatron_tpo.checkpoint import CheckpointConfig, TrainingCheckpointer
    from megatron_tpo.checkpoint.manifest import read_manifest, verify_files
    from megatron_tpo.parallel import init_megatron, shutdown_megatron

    init_megatron(ParallelConfig(), model)
    chunks, optimizer = _built(model)
    scheduler = _scheduler(optimizer)
    params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    checkpointer = TrainingCheckpointer(root, CheckpointConfig(keep_last=1))
    save_seconds = []
    for step in range(1, saves + 1):
        started = time.perf_counter()
        directory = checkpointer.save(step, chunks, optimizer, scheduler, {"step": step})
        save_seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    verify_files(directory, read_manifest(directory))
    verify_seconds = time.perf_counter() - started
    started = time.perf_counter()
    checkpointer.load_latest(chunks, optimizer, scheduler)
    load_seconds = time.perf_counter() - started
    shutdown_megatron()
    return {"params": params, "save_seconds": save_seconds, "verify_seconds": verify_seconds,
            "load_seconds": load_seconds, "bytes": _directory_bytes(directory),
            "dist_bytes": _directory_bytes(directory / "dist"),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def projected_70b(measured: dict, rate_save: float, rate_load: float) -> dict:
    from megatron_tpo.plan.cost.parameters import total_parameters

    params = total_parameters(load_model_config("llama3_70b"))
    total = params * GPU_BYTES_PER_PARAM
    return {"params": params, "bytes": total,
            "save_seconds_one_writer": total / rate_save,
            "load_seconds_one_reader": total / rate_load,
            "save_seconds_64_writers": total / (64 * rate_save),
            "load_seconds_64_readers": total / (64 * rate_load)}


def main() -> None:
    from megatron_tpo.parallel.local_launch import spawn_local

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override num_layers")
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    overrides = {"num_layers": args.layers} if args.layers else {}
    model = load_model_config(args.model, **overrides)
    root = Path(tempfile.mkdtemp(prefix="checkpoint_io_"))
    try:
        result = spawn_local(measure, 1, model, args.saves, root)[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    later_saves = result["save_seconds"][1:] or result["save_seconds"]
    save_seconds = statistics.median(later_saves)
    result.update(model=args.model, num_layers=model.num_layers, layout="TP1/PP1, 1 process",
                  first_save_seconds=result["save_seconds"][0],
                  median_later_save_seconds=save_seconds,
                  save_bytes_per_second=result["bytes"] / save_seconds,
                  load_bytes_per_second=result["bytes"] / result["load_seconds"],
                  bytes_per_param=result["bytes"] / result["params"])
    result["projected_70b"] = projected_70b(result, result["save_bytes_per_second"],
                                            result["load_bytes_per_second"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
