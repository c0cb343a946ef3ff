"""Weight-stream throughput against a plain copy of the same bytes, in the same run.

Spawns a TP x PP world of local gloo processes (CPU) with a random Llama-shaped model
and times ``push_weights`` (parity check off) into an engine that copies every tensor
into its own preallocated destination, as a real engine's ``update_weights`` does. Every
rank receives every byte of the model. The baseline is ``dst.copy_(src)`` of the same
number of bytes, run on every rank at the same time (same cores, same contention).
The peak extra memory of one sync is measured on every rank (torch profiler).

The 8B/70B projection assumes every rank of an 8-GPU node receives the full bf16 model
at the per-rank stream throughput measured here (the receive rate is the bottleneck:
the sources convert one stage each, in turn). On CPU gloo that rate is far below what
NCCL over NVLink gives, so the CPU projection is an upper bound on the time; no GPU ran
this benchmark. The last line is one JSON object.

    python benchmarks/weight_sync.py [--tp 2] [--pp 2] [--hidden 512] [--layers 8]
                                     [--vocab 32000] [--bucket-mb 32] [--repeats 3]
"""

import argparse
import json
import statistics
import time

import torch

from megatron_tpo.config import ModelConfig, ParallelConfig
from megatron_tpo.parallel.local_launch import spawn_local
from megatron_tpo.rollout.engine import RolloutEngine

# Dense Llama-3 parameter counts (HF checkpoints), bf16 weights.
PROJECTED_BYTES = {"llama3_8b": 8.03e9 * 2, "llama3_70b": 70.55e9 * 2}


class CopyingEngine(RolloutEngine):
    """Copies each streamed tensor into a preallocated destination, nothing else."""

    def __init__(self):
        self.destinations = {}

    def generate(self, prompts, sampling):
        raise NotImplementedError

    def update_weights(self, stream):
        for name, tensor in stream:
            if name not in self.destinations:
                self.destinations[name] = torch.empty_like(tensor)
            self.destinations[name].copy_(tensor)


def _timed(fn) -> float:
    torch.distributed.barrier()
    started = time.perf_counter()
    fn()
    torch.distributed.barrier()
    return time.perf_counter() - started


def _worker(rank, world_size, model, parallel, bucket_bytes, repeats):
    from megatron_tpo.model.llama import build_llama_chunks
    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.rollout.memory import peak_extra_bytes
    from megatron_tpo.rollout.weight_stream import cached_plan
    from megatron_tpo.rollout.weight_sync import WeightSyncConfig, push_weights

    init_megatron(parallel, model)
    chunks = build_llama_chunks(model, parallel)
    engine, config = CopyingEngine(), WeightSyncConfig(bucket_bytes=bucket_bytes,
                                                        check_parity=False)
    push_weights(engine, chunks, model, config)   # warm-up: the plan, the destinations
    stream = [_timed(lambda: push_weights(engine, chunks, model, config))
              for _ in range(repeats)]
    plan = cached_plan(chunks, model, bucket_bytes)
    source = torch.empty(plan.total_bytes // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    copy = [_timed(lambda: target.copy_(source)) for _ in range(repeats)]
    del source, target
    _, peak = peak_extra_bytes(lambda: push_weights(engine, chunks, model, config),
                               torch.device("cpu"))
    shutdown_megatron()
    return dict(stream=statistics.median(stream), copy=statistics.median(copy), peak=peak,
                bytes=plan.total_bytes, buckets=len(plan.buckets),
                largest_bucket=plan.largest_bucket_bytes, largest_tensor=plan.largest_tensor_bytes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=float, default=32.0)
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model = ModelConfig(name="bench", num_layers=args.layers, hidden_size=args.hidden,
                        ffn_hidden_size=args.hidden * 11 // 4, num_attention_heads=8,
                        num_query_groups=4, vocab_size=args.vocab, make_vocab_size_divisible_by=64)
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp,
                              pipeline_model_parallel_size=args.pp)
    reports = spawn_local(_worker, args.tp * args.pp, model, parallel,
                          int(args.bucket_mb * 2**20), args.repeats)
    stream = max(r["stream"] for r in reports)
    copy = max(r["copy"] for r in reports)
    total = reports[0]["bytes"]
    per_rank = total / stream
    print(f"model {total / 2**20:.1f} MiB fp32 in {reports[0]['buckets']} buckets of <= "
          f"{reports[0]['largest_bucket'] / 2**20:.1f} MiB (largest tensor "
          f"{reports[0]['largest_tensor'] / 2**20:.1f} MiB), TP{args.tp} x PP{args.pp} gloo")
    print(f"stream+broadcast into every rank: {stream:.3f} s, {per_rank / 1e9:.3f} GB/s per rank")
    print(f"plain copy of the same bytes:     {copy:.3f} s, {total / copy / 1e9:.3f} GB/s")
    peaks = ", ".join(f"{r['peak'] / 2**20:.1f}" for r in reports)
    print(f"peak extra memory per rank: {peaks} MiB")
    projected = {name: nbytes / per_rank for name, nbytes in PROJECTED_BYTES.items()}
    for name, seconds in projected.items():
        print(f"projected {name} sync on an 8-GPU node at this per-rank rate: {seconds:.1f} s")
    print(json.dumps({
        "ratio": copy / stream, "stream_gb_per_s_per_rank": per_rank / 1e9,
        "memcpy_gb_per_s": total / copy / 1e9, "bytes": total, "tp": args.tp, "pp": args.pp,
        "bucket_bytes": int(args.bucket_mb * 2**20), "peak_extra_bytes": [r["peak"] for r in reports],
        "projected_seconds_8gpu_node": projected,
        "assumption": "every rank receives the full bf16 model at the measured per-rank "
                      "stream rate (CPU gloo here; no GPU ran this)"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
