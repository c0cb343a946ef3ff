"""Weight-stream throughput against a plain copy of the same bytes, in the same run.

Spawns a TP x PP world of local gloo processes (CPU) with a random Llama-shaped model
and times ``push_weights`` (parity check off) into an engine that copies every tensor
into its own preallocated destination, as a real engine's ``update_weights`` does. Every
rank receives every byte of the model. The baseline is ``dst.copy_(src)`` of the same
number of bytes, run on every rank at the same time (same cores, same contention); the
stream and the copy alternate, so both see the same background load, and the medians
are compared. Both transports are timed (``--transport``): the process group's gather +
broadcast, and shared memory (what ``auto`` picks for CPU ranks of one host). The peak
extra memory of one sync is measured on every rank (torch profiler; shared-memory slots
are mapped once per plan, outside the allocator, and printed separately).

The 8B/70B projection assumes every rank of an 8-GPU node receives the full bf16 model
at the per-rank stream throughput measured here. On CPU that rate says nothing about
NCCL over NVLink; no GPU ran this benchmark. The last line is one JSON object.

    python benchmarks/weight_sync.py [--tp 2] [--pp 2] [--hidden 512] [--layers 8]
                                     [--vocab 32000] [--bucket-mb 32] [--repeats 5]
                                     [--transport shared_memory broadcast]
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


def _worker(rank, world_size, model, parallel, bucket_bytes, repeats, transports):
    from megatron_tpo.model.llama import build_llama_chunks
    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.rollout.memory import peak_extra_bytes
    from megatron_tpo.weights import WeightSyncConfig, push_weights
    from megatron_tpo.weights.stream import cached_plan
    from megatron_tpo.weights.transports import cached_transport

    init_megatron(parallel, model)
    chunks = build_llama_chunks(model, parallel)
    plan = cached_plan(chunks, model, bucket_bytes)
    source = torch.empty(plan.total_bytes // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    report = dict(bytes=plan.total_bytes, buckets=len(plan.buckets),
                  largest_bucket=plan.largest_bucket_bytes,
                  largest_tensor=plan.largest_tensor_bytes, transports={})
    for transport in transports:
        engine = CopyingEngine()
        config = WeightSyncConfig(bucket_bytes=bucket_bytes, check_parity=False,
                                  transport=transport)
        push_weights(engine, chunks, model, config)   # warm-up: the plan, the destinations
        stream, copy = [], []
        for _ in range(repeats):
            stream.append(_timed(lambda: push_weights(engine, chunks, model, config)))
            copy.append(_timed(lambda: target.copy_(source)))
        _, peak = peak_extra_bytes(lambda: push_weights(engine, chunks, model, config),
                                   torch.device("cpu"))
        picked = type(cached_transport(transport, plan, torch.device("cpu"))).__name__
        report["transports"][transport] = dict(stream=statistics.median(stream),
                                               copy=statistics.median(copy), peak=peak,
                                               kind=picked)
    shutdown_megatron()
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=float, default=32.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transport", nargs="+", default=["shared_memory", "broadcast"],
                        choices=["auto", "shared_memory", "broadcast"],
                        help="transports to time; the first is the headline ratio")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model = ModelConfig(name="bench", num_layers=args.layers, hidden_size=args.hidden,
                        ffn_hidden_size=args.hidden * 11 // 4, num_attention_heads=8,
                        num_query_groups=4, vocab_size=args.vocab, make_vocab_size_divisible_by=64)
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp,
                              pipeline_model_parallel_size=args.pp)
    reports = spawn_local(_worker, args.tp * args.pp, model, parallel,
                          int(args.bucket_mb * 2**20), args.repeats, args.transport)
    first = reports[0]
    total = first["bytes"]
    print(f"model {total / 2**20:.1f} MiB fp32 in {first['buckets']} buckets of <= "
          f"{first['largest_bucket'] / 2**20:.1f} MiB (largest tensor "
          f"{first['largest_tensor'] / 2**20:.1f} MiB), TP{args.tp} x PP{args.pp}, "
          f"{args.tp * args.pp} CPU processes")
    results = {}
    for transport in args.transport:
        stream = max(r["transports"][transport]["stream"] for r in reports)
        copy = max(r["transports"][transport]["copy"] for r in reports)
        per_rank = total / stream
        peaks = [r["transports"][transport]["peak"] for r in reports]
        kind = first["transports"][transport]["kind"]
        print(f"{transport} ({kind}): stream into every rank {stream:.3f} s, "
              f"{per_rank / 1e9:.3f} GB/s per rank; plain copy {copy:.3f} s, "
              f"{total / copy / 1e9:.3f} GB/s; ratio {copy / stream:.3f}")
        print(f"  peak extra allocator memory per rank: "
              f"{', '.join(f'{p / 2**20:.1f}' for p in peaks)} MiB"
              + (f"; plus two shared slots of {first['largest_bucket'] / 2**20:.1f} MiB per "
                 "host" if kind == "SharedMemoryTransport" else ""))
        results[transport] = dict(ratio=copy / stream, stream_s=stream, copy_s=copy,
                                  stream_gb_per_s_per_rank=per_rank / 1e9, kind=kind,
                                  peak_extra_bytes=peaks)
    headline = results[args.transport[0]]
    projected = {name: nbytes / (headline["stream_gb_per_s_per_rank"] * 1e9)
                 for name, nbytes in PROJECTED_BYTES.items()}
    for name, seconds in projected.items():
        print(f"projected {name} sync on an 8-GPU node at the {args.transport[0]} per-rank "
              f"rate: {seconds:.1f} s")
    print(json.dumps({
        "ratio": headline["ratio"], "transport": args.transport[0], "transports": results,
        "bytes": total, "tp": args.tp, "pp": args.pp,
        "bucket_bytes": int(args.bucket_mb * 2**20),
        "projected_seconds_8gpu_node": projected,
        "assumption": "every rank receives the full bf16 model at the measured per-rank "
                      "stream rate (CPU here; no GPU ran this)"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
