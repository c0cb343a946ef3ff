"""Fused, vocab-parallel log-probs of target tokens: the autograd function and its dispatch.

``fused_target_logprobs`` computes log softmax(hidden @ weight.T)[target] per token (and
optionally the entropy of that softmax) without materialising the [tokens, vocab]
logits, for a weight that may be one tensor-parallel shard of the output layer.
"""

import importlib.util
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import logprob_torch
from .softmax_statistics import combine_shards, entropy, log_sum_exp

IMPLEMENTATIONS = ("auto", "torch", "triton")


def _implementation(name: str, hidden: torch.Tensor):
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {name!r}")
    if name == "auto":
        use_triton = hidden.is_cuda and importlib.util.find_spec("triton") is not None
        name = "triton" if use_triton else "torch"
    if name == "triton":
        # Imported only when chosen: triton reads TRITON_INTERPRET when it is first imported.
        from . import logprob_triton
        return logprob_triton
    return logprob_torch


class _FusedTargetLogprobs(torch.autograd.Function):
    """Works on flat [N, H] hidden and [N] targets; the public wrapper reshapes."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, valid, tp_group, vocab_start, return_entropy,
                implementation, deterministic):
        ctx.set_materialize_grads(False)
        # Masked tokens are dropped before any work, so they cost nothing.
        rows = valid.nonzero()[:, 0]
        hidden_rows = hidden.index_select(0, rows)
        local_targets = targets.index_select(0, rows) - vocab_start
        owned = (local_targets >= 0) & (local_targets < weight.shape[0])
        local_targets = torch.where(owned, local_targets, torch.full_like(local_targets, -1))

        shard = implementation.slice_statistics(hidden_rows, weight, local_targets,
                                                with_entropy=return_entropy)
        stats, owners = combine_shards(shard, owned, tp_group)
        if bool((owners != 1).any()):
            bad = targets.index_select(0, rows)[owners != 1][:5].tolist()
            raise ValueError(f"target ids {bad} are owned by no vocab shard (vocab_start="
                             f"{vocab_start}, shard size {weight.shape[0]}): out of range")
        lse = log_sum_exp(stats)
        logprobs = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        logprobs[rows] = stats.target_logit - lse
        token_entropy = None
        if return_entropy:
            token_entropy = entropy(stats)
            entropies = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
            entropies[rows] = token_entropy
        ctx.save_for_backward(hidden_rows, weight, local_targets, rows, lse, token_entropy)
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        ctx.tp_group, ctx.implementation = tp_group, implementation
        ctx.deterministic = deterministic
        if return_entropy:
            return logprobs, entropies
        return logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropies=None):
        hidden_rows, weight, local_targets, rows, lse, token_entropy = ctx.saved_tensors
        grad_lp = (torch.zeros_like(lse) if grad_logprobs is None
                   else grad_logprobs.index_select(0, rows).float())
        grad_ent = mean_logit = None
        if grad_entropies is not None:
            grad_ent = grad_entropies.index_select(0, rows).float()
            mean_logit = lse - token_entropy
        grad_hidden_rows, grad_weight = ctx.implementation.slice_gradients(
            hidden_rows, weight, local_targets, lse, grad_lp, grad_ent, mean_logit,
            deterministic=ctx.deterministic)
        if ctx.tp_group is not None:
            # Each shard saw only its vocab slice: the hidden gradient is their sum.
            dist.all_reduce(grad_hidden_rows, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        grad_hidden = grad_hidden_rows.new_zeros(ctx.hidden_shape)
        grad_hidden.index_copy_(0, rows, grad_hidden_rows)
        return (grad_hidden.to(ctx.hidden_dtype), grad_weight.to(weight.dtype),
                None, None, None, None, None, None, None)


def fused_target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_start: int = 0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
    deterministic: bool = True,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probability of each target token under softmax(hidden @ weight.T), fused.

    Args:
        hidden: [..., H] last hidden states (after the final norm), any float dtype.
        weight: [V_local, H] output weight, or this rank's vocab shard of it.
        targets: [...] global vocab ids (``ignore_index`` allowed), same leading shape.
        mask: optional [...]; tokens where it is 0 are skipped (output 0, zero grad).
        tp_group: tensor-parallel group whose ranks hold the other vocab shards; every
            rank passes the same hidden and targets. None: ``weight`` is the full vocab.
        vocab_start: first global vocab id of this shard (rank * V_local in megatron).
        return_entropy: also return each token's entropy of the full distribution.
        impl: "auto" (Triton for CUDA tensors when triton imports, else torch),
            "torch" (chunked, any device), or "triton".
        deterministic: the same gradient bits on every run (the Triton backward then
            reduces in a fixed order: one more logit recomputation, and a bounded
            workspace). False lets the Triton backward add with float32 atomics: faster,
            but rounding follows the GPU's program schedule. The torch path is
            deterministic either way.

    Returns:
        float32 log-probs [...] (and float32 entropies [...] when ``return_entropy``),
        0 at masked tokens. Gradients flow to ``hidden`` (summed over the TP group, so
        do not all-reduce it again) and to ``weight``, through log-probs and entropy.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} "
                         "must share their leading dimensions")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V_local, {hidden.shape[-1]}]")
    valid = targets != ignore_index
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match targets {tuple(targets.shape)}")
        valid = valid & mask.bool()
    implementation = _implementation(impl, hidden)
    outputs = _FusedTargetLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(),
        valid.reshape(-1), tp_group, vocab_start, return_entropy, implementation,
        deterministic)
    if return_entropy:
        return tuple(out.view(targets.shape) for out in outputs)
    return outputs.view(targets.shape)
