"""One training step of megatron-tpo's trainer against HF transformers, in the same run.

Both fit the same fixed batch with Adam: megatron-core through its pipeline schedule
(DDP, grad clipping) and ``LlamaForCausalLM`` in eager PyTorch with gradient
accumulation over the same micro-batches, both in this process. CPU default: the tiny model, megatron at
TP1/PP1 (the ratio) and at TP2/PP2 on four gloo processes (reported). On a GPU:
``llama3_1b_bench`` in bf16 at TP1/PP1 on one GPU, with peak memory. The last line is
one JSON object.

    python benchmarks/train_step.py [--model NAME] [--seq-len N] [--steps N]
"""

import argparse
import json
import statistics
import time

import torch

from megatron_tpo.config import ParallelConfig, load_model_config
from megatron_tpo.train.fixed_batch import FixedBatchRun, run_locally, train_on_fixed_batch


def hf_step_seconds(model_config, micro_batches, micro_batch_size, seq_len, steps):
    """Median step time (and CUDA peak bytes) of HF eager training on the same batch shape."""
    from transformers import LlamaForCausalLM

    from megatron_tpo.model.hf_config import hf_config_from_model

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config_from_model(model_config)).to(device=device, dtype=dtype)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, model_config.vocab_size,
                           (micro_batches, micro_batch_size, seq_len + 1), device=device)
    times, peak = [], None
    for _ in range(steps):
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for micro in tokens:
            logits = model(micro[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten())
            (loss / micro_batches).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if on_gpu:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]), peak


def megatron_step_seconds(model_config, tp, pp, micro_batches, micro_batch_size, seq_len, steps):
    run = FixedBatchRun(model=model_config,
                        parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                pipeline_model_parallel_size=pp),
                        steps=steps, micro_batches=micro_batches,
                        micro_batch_size=micro_batch_size, seq_len=seq_len)
    if tp * pp == 1:  # in this process, like the HF baseline; megatron's own random init
        records = train_on_fixed_batch(0, 1, run)
    else:
        records = run_locally(run)
    return statistics.median(r.seconds for r in records[1:]), records[-1].peak_memory_bytes


def main() -> None:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3_1b_bench" if on_gpu else "tiny")
    parser.add_argument("--seq-len", type=int, default=2048 if on_gpu else 64)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads of this process (both single-process runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model_config(args.model)
    shape = (args.micro_batches, args.micro_batch_size, args.seq_len, args.steps)

    megatron_seconds, megatron_peak = megatron_step_seconds(model, 1, 1, *shape)
    hf_seconds, hf_peak = hf_step_seconds(model, *shape)
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "model": model.name, "dtype": "bf16" if on_gpu else "fp32",
        "tokens_per_step": args.micro_batches * args.micro_batch_size * args.seq_len,
        "megatron_tp1_pp1_step_s": round(megatron_seconds, 4),
        "hf_eager_step_s": round(hf_seconds, 4),
        "step_time_ratio_megatron_over_hf": round(megatron_seconds / hf_seconds, 3),
    }
    if on_gpu:
        result["megatron_peak_gib"] = round(megatron_peak / 2**30, 2)
        result["hf_peak_gib"] = round(hf_peak / 2**30, 2)
        result["peak_memory_ratio_megatron_over_hf"] = round(megatron_peak / hf_peak, 3)
    else:
        tp2_pp2_seconds, _ = megatron_step_seconds(model, 2, 2, *shape)
        result["megatron_tp2_pp2_step_s"] = round(tp2_pp2_seconds, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
