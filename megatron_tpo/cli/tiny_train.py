"""``tpo-tiny-train``: a tiny Llama trained for a few steps at TP=2, PP=2 on CPU.

The smallest end-to-end exercise of the trainer stack: a random tiny HF checkpoint is
converted to megatron shards, four gloo processes (or torchrun/srun tasks) load them,
and megatron's 1F1B schedule with DDP and Adam fits a fixed batch. Prints the loss per
step and the median step time.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatron_tpo.config import ParallelConfig, load_model_config


def _train(rank, world_size, model, parallel, shard_root, steps, micro_batches, seq_len):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_tpo.model.llama import build_llama_chunks
    from megatron_tpo.model.mcore_shards import load_model_shards
    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.train.megatron_setup import OptimizerSettings, wrap_for_training
    from megatron_tpo.train.pipeline_step import train_step

    init_megatron(parallel, model)
    chunks = build_llama_chunks(model, parallel)
    for chunk in chunks:
        load_model_shards(chunk, shard_root)
    ddp_chunks, optimizer = wrap_for_training(chunks, OptimizerSettings(lr=3e-3))

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (micro_batches, 1, seq_len + 1),
                           generator=generator)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    positions = torch.arange(seq_len).unsqueeze(0)

    def forward_step(data_iterator, gpt_model):
        inputs, targets = next(data_iterator)
        logits = gpt_model(inputs, positions, None)

        def loss_func(output):
            # megatron returns logits batch-first; its CE wants [seq, batch, vocab/tp].
            # Padding rows are pushed to -inf so they take no probability mass.
            padded = output.float().transpose(0, 1).contiguous()
            vocab_start = parallel_state.get_tensor_model_parallel_rank() * padded.shape[-1]
            padding = torch.arange(vocab_start, vocab_start + padded.shape[-1]) >= model.vocab_size
            padded = padded.masked_fill(padding, float("-inf"))
            loss = vocab_parallel_cross_entropy(padded, targets.transpose(0, 1)).mean()
            # clone: the schedule divides the returned loss by the micro-batch count in place
            return loss, {"loss": loss.detach().clone()}

        return logits, loss_func

    history = []
    for step in range(steps):
        started = time.perf_counter()
        metrics = train_step(ddp_chunks, optimizer, forward_step, batches, seq_len, 1)
        elapsed = time.perf_counter() - started
        history.append((metrics.get("loss"), metrics["grad_norm"], elapsed))
        if parallel_state.is_pipeline_last_stage() and \
                parallel_state.get_tensor_model_parallel_rank() == 0:
            print(f"step {step + 1}/{steps}  loss {metrics['loss']:.4f}  "
                  f"grad_norm {metrics['grad_norm']:.4f}  {elapsed * 1000:.0f} ms", flush=True)
    shutdown_megatron()
    return history


def run_tiny_training(model_name: str = "tiny", tp: int = 2, pp: int = 2, steps: int = 10,
                      micro_batches: int = 4, seq_len: int = 32, vpp=None):
    """Train a random ``model_name`` on a fixed batch; return ``[(loss, grad_norm, seconds)]``."""
    from transformers import LlamaForCausalLM

    from megatron_tpo.model.conversion import hf_to_mcore
    from megatron_tpo.model.hf_config import hf_config_from_model
    from megatron_tpo.parallel.local_launch import spawn_local

    model = load_model_config(model_name)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    parallel.validate(model, world_size=tp * pp)
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        LlamaForCausalLM(hf_config_from_model(model)).save_pretrained(Path(scratch) / "hf")
        shard_root = hf_to_mcore(Path(scratch) / "hf", Path(scratch) / "mcore", tp, pp,
                                 make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
                                 progress=False).destination
        print(f"training {model.name} at TP={tp} PP={pp} VPP={vpp or 1} on {tp * pp} CPU processes (gloo)",
              flush=True)
        histories = spawn_local(_train, tp * pp, model, parallel, shard_root, steps,
                                micro_batches, seq_len)
    # Only the last pipeline stage sees the loss.
    return next(h for h in histories if h[0][0] is not None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="configs/model name or YAML path")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args(argv)
    history = run_tiny_training(args.model, args.tp, args.pp, args.steps, args.micro_batches,
                                args.seq_len, args.vpp)
    times = [elapsed for _, _, elapsed in history[1:]] or [history[0][2]]
    print(f"loss {history[0][0]:.4f} -> {history[-1][0]:.4f}; median step "
          f"{statistics.median(times) * 1000:.0f} ms over {len(times)} steps after the first")


if __name__ == "__main__":
    main()
