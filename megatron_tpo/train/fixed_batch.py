"""Fit a fixed batch of random tokens: the smallest exercise of the whole trainer stack.

It runs megatron's pipeline schedule with DDP, Adam and grad clipping on any layout,
on CPU (gloo) or GPU (NCCL, bf16), and reports loss, grad norm, time and peak memory
per step. ``tpo-fit-batch`` and ``benchmarks/train_step.py`` are built on it, and a
first cluster run can use it to check a layout before spending hours on TPO.
"""

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from megatron_tpo.config import ModelConfig, ParallelConfig


@dataclass
class StepRecord:
    loss: Optional[float]  # on the one reporting rank (last stage, TP and DP rank 0)
    grad_norm: float
    seconds: float
    peak_memory_bytes: Optional[int]  # CUDA only


@dataclass
class FixedBatchRun:
    model: ModelConfig
    parallel: ParallelConfig
    steps: int = 10
    micro_batches: int = 4
    micro_batch_size: int = 1
    seq_len: int = 32
    lr: float = 3e-3
    shard_root: Optional[str] = None  # converted weights; None: megatron's own random init


def _masked_vocab_parallel_loss(logits, targets, vocab_size: int):
    """Mean token cross entropy over the true vocab, from [batch, seq, vocab/tp] logits."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    seq_first = logits.float().transpose(0, 1).contiguous()
    local_vocab = seq_first.shape[-1]
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * local_vocab
    # Megatron's padding rows must take no probability mass.
    padding = torch.arange(vocab_start, vocab_start + local_vocab,
                           device=seq_first.device) >= vocab_size
    seq_first = seq_first.masked_fill(padding, float("-inf"))
    return vocab_parallel_cross_entropy(seq_first, targets.transpose(0, 1)).mean()


def train_on_fixed_batch(rank: int, world_size: int, run: FixedBatchRun) -> List[StepRecord]:
    """One rank's part of the run; megatron must not be initialised yet."""
    from megatron.core import parallel_state

    from megatron_tpo.model.llama import build_llama_chunks
    from megatron_tpo.model.mcore_shards import load_model_shards
    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.train.megatron_setup import OptimizerSettings, wrap_for_training
    from megatron_tpo.train.pipeline_step import position_ids, train_step

    on_gpu = torch.cuda.is_available()
    init_megatron(run.parallel, run.model)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    chunks = build_llama_chunks(run.model, run.parallel,
                                params_dtype=torch.bfloat16 if on_gpu else torch.float32)
    if run.shard_root is not None:
        for chunk in chunks:
            load_model_shards(chunk, run.shard_root)
    ddp_chunks, optimizer = wrap_for_training(chunks, OptimizerSettings(lr=run.lr))

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, run.model.vocab_size,
                           (run.micro_batches, run.micro_batch_size, run.seq_len + 1),
                           generator=generator).to(device)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]

    def forward_step(data_iterator, gpt_model):
        inputs, targets = next(data_iterator)
        logits = gpt_model(inputs, position_ids(inputs), None)

        def loss_func(output):
            loss = _masked_vocab_parallel_loss(output, targets, run.model.vocab_size)
            # clone: the schedule divides the returned loss by the micro-batch count in place
            return loss, {"loss": loss.detach().clone()}

        return logits, loss_func

    records = []
    is_reporting_rank = (parallel_state.is_pipeline_last_stage()
                         and parallel_state.get_tensor_model_parallel_rank() == 0
                         and parallel_state.get_data_parallel_rank() == 0)
    for step in range(run.steps):
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        metrics = train_step(ddp_chunks, optimizer, forward_step, batches, run.seq_len,
                             run.micro_batch_size)
        if on_gpu:
            torch.cuda.synchronize()
        record = StepRecord(loss=metrics["loss"] if is_reporting_rank else None,
                            grad_norm=metrics["grad_norm"],
                            seconds=time.perf_counter() - started,
                            peak_memory_bytes=torch.cuda.max_memory_allocated() if on_gpu else None)
        records.append(record)
        if is_reporting_rank:
            memory = (f"  peak {record.peak_memory_bytes / 2**30:.1f} GiB"
                      if record.peak_memory_bytes is not None else "")
            print(f"step {step + 1}/{run.steps}  loss {record.loss:.4f}  "
                  f"grad_norm {record.grad_norm:.4f}  {record.seconds * 1000:.0f} ms{memory}",
                  flush=True)
    shutdown_megatron()
    return records


def run_locally(run: FixedBatchRun) -> List[StepRecord]:
    """Spawn ``TP*PP`` local gloo processes; without ``shard_root``, all layouts start
    from the same random HF checkpoint, converted for this layout."""
    from transformers import LlamaForCausalLM

    from megatron_tpo.model.conversion import hf_to_mcore
    from megatron_tpo.model.hf_config import hf_config_from_model
    from megatron_tpo.parallel.local_launch import spawn_local

    world_size = run.parallel.model_parallel_size
    run.parallel.validate(run.model, world_size=world_size)
    with tempfile.TemporaryDirectory() as scratch:
        if run.shard_root is None:
            torch.manual_seed(0)
            hf_dir = Path(scratch) / "hf"
            LlamaForCausalLM(hf_config_from_model(run.model)).save_pretrained(hf_dir)
            run = dataclasses.replace(run, shard_root=hf_to_mcore(
                hf_dir, Path(scratch) / "mcore", run.parallel.tensor_model_parallel_size,
                run.parallel.pipeline_model_parallel_size,
                make_vocab_size_divisible_by=run.model.make_vocab_size_divisible_by,
                progress=False,
            ).destination)
        per_rank = spawn_local(train_on_fixed_batch, world_size, run)
    return next(records for records in per_rank if records[0].loss is not None)
