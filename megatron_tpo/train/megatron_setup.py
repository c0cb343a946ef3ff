"""Wrap model chunks for training: megatron DDP, its optimizer and grad finalisation."""

from dataclasses import dataclass, field
from typing import List, Tuple

import torch


@dataclass
class OptimizerSettings:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # The distributed optimizer shards Adam state over DP. On CPU it cannot be built
    # (it checks for torch.cuda tensor types) and its resume is inexact with plain
    # torch Adam (docs/checkpoints.md), so it is the default on GPUs only.
    use_distributed_optimizer: bool = field(default_factory=torch.cuda.is_available)


def wrap_for_training(chunks: List, settings: OptimizerSettings) -> Tuple[List, object]:
    """Return ``(ddp_chunks, optimizer)`` for this rank's ``GPTModel`` chunks."""
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        # Overlap needs CUDA streams; on CPU the reduction runs after backward.
        overlap_grad_reduce=torch.cuda.is_available(),
    )
    ddp_chunks = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                # Later chunks start buckets at their own first param.
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    for chunk in ddp_chunks:
        chunk.broadcast_params()  # every DP replica starts from rank 0's weights
    config.finalize_model_grads_func = finalize_model_grads
    if torch.cuda.is_available() and ddp_config.overlap_grad_reduce:
        config.no_sync_func = [chunk.no_sync for chunk in ddp_chunks]
        if len(ddp_chunks) == 1:
            config.no_sync_func = config.no_sync_func[0]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=settings.lr, min_lr=settings.min_lr,
            weight_decay=settings.weight_decay, adam_beta1=settings.adam_beta1,
            adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
            clip_grad=settings.clip_grad, bf16=config.bf16, fp16=config.fp16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=settings.use_distributed_optimizer,
        ),
        ddp_chunks,
    )
    return ddp_chunks, optimizer
