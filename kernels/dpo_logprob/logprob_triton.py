"""Triton implementation of the fused target log-prob (the GPU path).

Forward: a grid of (token block, vocab split) programs; each walks its vocab tiles,
computes a [BLOCK_T, BLOCK_V] logit tile with tl.dot over hidden chunks (float32
accumulation), and folds it into a running max / sum (online log-sum-exp). The splits
give the GPU enough programs when tokens are few; their statistics are merged in torch.

Backward, deterministic (the default): two kernels, one per gradient. Each program owns
a block of the gradient it writes (token rows of the hidden gradient, vocab rows of the
weight gradient) and walks its share of the other axis in a fixed order, recomputing
each logit tile and adding its product into the block it owns; when that leaves too
few programs, the other axis is split and each split's partial block goes into its own
workspace slot, summed in slot order by torch. Nothing depends on which program runs or
finishes first, so every run gives the same bits. The price: the logits are recomputed
twice in the backward instead of once, and a workspace of at most
DETERMINISTIC_WORKSPACE_BYTES per gradient.

Backward with atomics (deterministic=False): a grid of (token block, vocab tile)
programs; each recomputes its logit tile once and adds its contributions to both
gradients with float32 atomics, whose order (hence rounding) varies from run to run.
Neither backward ever holds a [tokens, vocab] tensor.

Under TRITON_INTERPRET=1 (set before triton is imported) the same kernels run on CPU
tensors; the tests use that. Block sizes there are kept small so the interpreter is fast.
"""

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .softmax_statistics import SliceStatistics, merge_slices

# GPU launch settings, chosen without a GPU: the largest tiles whose bf16 kernels compile
# for sm_90 without register spills (checked offline with triton.compile, see the tests);
# timing may favour others. The backward tile is taller to halve the weight-gradient
# atomics, with a shorter hidden chunk to make room for them.
GPU_FORWARD = dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=64, num_warps=8)
GPU_BACKWARD = dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=32, num_warps=8)
# The deterministic weight-gradient kernel (the hidden side uses GPU_BACKWARD): with
# 128-token tiles it spills 296 bytes for sm_90, with 64 it does not.
GPU_WEIGHT_BACKWARD = dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=32, num_warps=8)
INTERPRETER_BLOCKS = dict(BLOCK_T=16, BLOCK_V=16, BLOCK_H=16)
# Aim for at least this many programs, splitting the reduced axis when the other is short.
TARGET_PROGRAMS = 512
# Deterministic backward: most bytes of float32 partial sums (split workspace) per
# gradient. Past it the splits shrink, down to none (each program then owns a whole
# reduction and there is no workspace), trading parallelism for memory.
DETERMINISTIC_WORKSPACE_BYTES = 512 * 2 ** 20


@triton.jit
def _operand_slices(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, k, hidden_size,
                    stride_ht, stride_wv, DOT_IN_FP32: tl.constexpr, BLOCK_H: tl.constexpr):
    """Columns [k, k + BLOCK_H) of hidden[rows] and weight[cols], zero outside the tensors."""
    ks = k + tl.arange(0, BLOCK_H)
    k_ok = ks < hidden_size
    h = tl.load(hidden_ptr + rows[:, None] * stride_ht + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    w = tl.load(weight_ptr + cols[:, None] * stride_wv + ks[None, :],
                mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    if DOT_IN_FP32:
        h, w = h.to(tl.float32), w.to(tl.float32)
    return h, w, ks, k_ok


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, hidden_size,
                stride_ht, stride_wv, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """hidden[rows] @ weight[cols].T as a float32 [BLOCK_T, BLOCK_V] tile."""
    logits = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for k in range(0, hidden_size, BLOCK_H):
        h, w, ks, k_ok = _operand_slices(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, k,
                                         hidden_size, stride_ht, stride_wv, DOT_IN_FP32,
                                         BLOCK_H)
        logits = tl.dot(h, tl.trans(w), acc=logits, input_precision=DOT_PRECISION)
    return logits


@triton.jit
def _statistics_kernel(hidden_ptr, weight_ptr, targets_ptr,
                       max_ptr, sum_exp_ptr, sum_exp_shifted_ptr, target_logit_ptr,
                       num_tokens, vocab_size, hidden_size, tiles_per_split,
                       stride_ht, stride_wv,
                       WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       DOT_IN_FP32: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    token_block = tl.program_id(0)
    split = tl.program_id(1)
    # 64-bit offsets: a vocab shard of 128256 x 8192 and more overflows int32 indexing.
    rows = (token_block * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < num_tokens
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)

    running_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros([BLOCK_T], dtype=tl.float32)
    sum_exp_shifted = tl.zeros([BLOCK_T], dtype=tl.float32)
    target_logit = tl.zeros([BLOCK_T], dtype=tl.float32)
    for tile in range(0, tiles_per_split):
        cols = ((split * tiles_per_split + tile) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < vocab_size
        logits = _logit_tile(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, hidden_size,
                             stride_ht, stride_wv, DOT_PRECISION, DOT_IN_FP32,
                             BLOCK_T, BLOCK_V, BLOCK_H)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        # The host makes every split's first tile hold real columns, so new_max is finite.
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        scale = tl.exp(running_max - new_max)
        shifted = logits - new_max[:, None]
        exp_shifted = tl.exp(shifted)
        if WITH_ENTROPY:
            # Rebase the old sum onto the new max; where nothing was summed yet (sum 0,
            # max -inf) the shift is meaningless, so use 0 rather than produce -inf * 0.
            old_shift = tl.where(sum_exp > 0, running_max - new_max, 0.0)
            tile_term = exp_shifted * tl.where(col_ok[None, :], shifted, 0.0)
            sum_exp_shifted = scale * (sum_exp_shifted + old_shift * sum_exp) \
                + tl.sum(tile_term, axis=1)
        sum_exp = scale * sum_exp + tl.sum(exp_shifted, axis=1)
        running_max = new_max
        is_target = cols[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)

    out = split * num_tokens + rows
    tl.store(max_ptr + out, running_max, mask=row_ok)
    tl.store(sum_exp_ptr + out, sum_exp, mask=row_ok)
    tl.store(target_logit_ptr + out, target_logit, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(sum_exp_shifted_ptr + out, sum_exp_shifted, mask=row_ok)


@triton.jit
def _grad_logits_tile(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, grad_logprob_ptr,
                      grad_entropy_ptr, mean_logit_ptr, rows, cols, row_ok, col_ok,
                      hidden_size, stride_ht, stride_wv,
                      WITH_ENTROPY_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      DOT_IN_FP32: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """d loss / d logits for the [BLOCK_T, BLOCK_V] tile (rows, cols), zero outside."""
    logits = _logit_tile(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, hidden_size,
                         stride_ht, stride_wv, DOT_PRECISION, DOT_IN_FP32,
                         BLOCK_T, BLOCK_V, BLOCK_H)

    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    grad_logprob = tl.load(grad_logprob_ptr + rows, mask=row_ok, other=0.0)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    probs = tl.where(tile_ok, tl.exp(logits - lse[:, None]), 0.0)
    is_target = (cols[None, :] == targets[:, None]).to(tl.float32)
    grad_logits = grad_logprob[:, None] * (is_target - probs)
    if WITH_ENTROPY_GRAD:
        grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)
        mean_logit = tl.load(mean_logit_ptr + rows, mask=row_ok, other=0.0)
        grad_logits += grad_entropy[:, None] * probs * (mean_logit[:, None] - logits)
    # Same rounding as a bf16 matmul of the logit gradient would see.
    grad_logits = grad_logits.to(hidden_ptr.dtype.element_ty)
    if DOT_IN_FP32:
        grad_logits = grad_logits.to(tl.float32)
    return grad_logits


@triton.jit
def _gradients_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, grad_logprob_ptr,
                      grad_entropy_ptr, mean_logit_ptr, grad_hidden_ptr, grad_weight_ptr,
                      num_tokens, vocab_size, hidden_size, stride_ht, stride_wv,
                      WITH_ENTROPY_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      DOT_IN_FP32: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Both gradients of one (token block, vocab tile), added in with atomics."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_ok = rows < num_tokens
    col_ok = cols < vocab_size
    grad_logits = _grad_logits_tile(hidden_ptr, weight_ptr, targets_ptr, lse_ptr,
                                    grad_logprob_ptr, grad_entropy_ptr, mean_logit_ptr,
                                    rows, cols, row_ok, col_ok, hidden_size, stride_ht,
                                    stride_wv, WITH_ENTROPY_GRAD, DOT_PRECISION, DOT_IN_FP32,
                                    BLOCK_T, BLOCK_V, BLOCK_H)

    for k in range(0, hidden_size, BLOCK_H):
        h, w, ks, k_ok = _operand_slices(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, k,
                                         hidden_size, stride_ht, stride_wv, DOT_IN_FP32,
                                         BLOCK_H)
        grad_h = tl.dot(grad_logits, w, input_precision=DOT_PRECISION)
        # Relaxed: the adds only accumulate; nothing reads them before the kernel ends.
        tl.atomic_add(grad_hidden_ptr + rows[:, None] * hidden_size + ks[None, :], grad_h,
                      mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
        grad_w = tl.dot(tl.trans(grad_logits), h, input_precision=DOT_PRECISION)
        tl.atomic_add(grad_weight_ptr + cols[:, None] * hidden_size + ks[None, :], grad_w,
                      mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


@triton.jit
def _owned_gradient_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, grad_logprob_ptr,
                           grad_entropy_ptr, mean_logit_ptr, out_ptr,
                           num_tokens, vocab_size, hidden_size, stride_ht, stride_wv,
                           tiles_per_split, split_stride,
                           WEIGHT_SIDE: tl.constexpr, WITH_ENTROPY_GRAD: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """One gradient, deterministically: program (block, split) owns a block of it.

    WEIGHT_SIDE: the block is BLOCK_V vocab rows of the weight gradient, summed over the
    split's token blocks; otherwise BLOCK_T token rows of the hidden gradient, summed
    over the split's vocab tiles. Tiles are added in index order into the split's slot
    of ``out`` (a read-modify-write of memory no other program touches).
    """
    block = tl.program_id(0)
    split = tl.program_id(1)
    out_ptr += split.to(tl.int64) * split_stride
    if WEIGHT_SIDE:
        cols = (block * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < vocab_size
    else:
        rows = (block * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        row_ok = rows < num_tokens
    for tile in range(0, tiles_per_split):
        other = split * tiles_per_split + tile
        if WEIGHT_SIDE:
            rows = (other * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            row_ok = rows < num_tokens
        else:
            cols = (other * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_ok = cols < vocab_size
        grad_logits = _grad_logits_tile(hidden_ptr, weight_ptr, targets_ptr, lse_ptr,
                                        grad_logprob_ptr, grad_entropy_ptr, mean_logit_ptr,
                                        rows, cols, row_ok, col_ok, hidden_size, stride_ht,
                                        stride_wv, WITH_ENTROPY_GRAD, DOT_PRECISION,
                                        DOT_IN_FP32, BLOCK_T, BLOCK_V, BLOCK_H)
        for k in range(0, hidden_size, BLOCK_H):
            h, w, ks, k_ok = _operand_slices(hidden_ptr, weight_ptr, rows, cols, row_ok,
                                             col_ok, k, hidden_size, stride_ht, stride_wv,
                                             DOT_IN_FP32, BLOCK_H)
            if WEIGHT_SIDE:
                slot = out_ptr + cols[:, None] * hidden_size + ks[None, :]
                ok = col_ok[:, None] & k_ok[None, :]
                # The first tile writes the slot, so it need not be zeroed beforehand.
                total = tl.load(slot, mask=ok & (tile > 0), other=0.0)
                total = tl.dot(tl.trans(grad_logits), h, acc=total,
                               input_precision=DOT_PRECISION)
            else:
                slot = out_ptr + rows[:, None] * hidden_size + ks[None, :]
                ok = row_ok[:, None] & k_ok[None, :]
                total = tl.load(slot, mask=ok & (tile > 0), other=0.0)
                total = tl.dot(grad_logits, w, acc=total, input_precision=DOT_PRECISION)
            tl.store(slot, total, mask=ok)
        # The next tile reads what this one stored, possibly in other threads of the
        # program: a block-wide barrier makes the stores visible first.
        tl.debug_barrier()


def _launch_settings(hidden: torch.Tensor, weight: torch.Tensor, gpu_settings: dict) -> dict:
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    if hidden.is_cuda:
        # float32 inputs would otherwise be rounded to TF32 on tensor cores; for bf16
        # operands the setting has no effect.
        precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
        return dict(gpu_settings, DOT_PRECISION=precision, DOT_IN_FP32=False)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         "triton is first imported (to run the kernels on CPU)")
    # The interpreter's tl.dot gives garbage for bfloat16 operands (triton 3.9), so CPU
    # runs upcast the (already rounded) operands; products and sums match the GPU's.
    return dict(INTERPRETER_BLOCKS, DOT_PRECISION="ieee", DOT_IN_FP32=True)


def slice_statistics(hidden: torch.Tensor, weight: torch.Tensor, local_targets: torch.Tensor,
                     with_entropy: bool) -> SliceStatistics:
    """Softmax statistics of ``hidden @ weight.T`` per token (see softmax_statistics)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    settings = _launch_settings(hidden, weight, GPU_FORWARD)
    num_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    token_blocks = triton.cdiv(max(num_tokens, 1), settings["BLOCK_T"])
    vocab_tiles = triton.cdiv(vocab_size, settings["BLOCK_V"])
    wanted_splits = max(1, min(vocab_tiles, TARGET_PROGRAMS // token_blocks))
    tiles_per_split = triton.cdiv(vocab_tiles, wanted_splits)
    # Recount so that no split starts past the last tile (it would see only -inf).
    splits = triton.cdiv(vocab_tiles, tiles_per_split)

    partial = torch.empty((4, splits, num_tokens), dtype=torch.float32, device=hidden.device)
    _statistics_kernel[(token_blocks, splits)](
        hidden, weight, local_targets.contiguous(), partial[0], partial[1], partial[2],
        partial[3], num_tokens, vocab_size, hidden_size, tiles_per_split,
        hidden.stride(0), weight.stride(0),
        WITH_ENTROPY=with_entropy, **settings)
    per_split = SliceStatistics(partial[0], partial[1],
                                partial[2] if with_entropy else None, partial[3])
    return merge_slices(per_split)


def _reduction_splits(owned_blocks: int, reduced_tiles: int, slot_bytes: int) -> Tuple[int, int]:
    """``(splits, tiles_per_split)`` of the reduced axis for the deterministic backward.

    Enough splits to give the GPU TARGET_PROGRAMS programs, but no more than
    DETERMINISTIC_WORKSPACE_BYTES of slots; one split needs no workspace at all.
    """
    wanted = max(1, min(reduced_tiles, TARGET_PROGRAMS // owned_blocks))
    affordable = DETERMINISTIC_WORKSPACE_BYTES // max(slot_bytes, 1)
    splits = min(wanted, affordable) if affordable >= 2 else 1
    tiles_per_split = triton.cdiv(reduced_tiles, splits)
    # Recount so that no split starts past the last tile.
    return triton.cdiv(reduced_tiles, tiles_per_split), tiles_per_split


def _owned_gradient(out: torch.Tensor, weight_side: bool, kernel_args: tuple,
                    sizes: Tuple[int, int, int], with_entropy_grad: bool) -> None:
    """Fill ``out`` (one gradient) with _owned_gradient_kernel, splitting if it pays."""
    hidden, weight = kernel_args[:2]
    settings = _launch_settings(hidden, weight,
                                GPU_WEIGHT_BACKWARD if weight_side else GPU_BACKWARD)
    num_tokens, vocab_size, hidden_size = sizes
    token_blocks = triton.cdiv(num_tokens, settings["BLOCK_T"])
    vocab_tiles = triton.cdiv(vocab_size, settings["BLOCK_V"])
    owned, reduced = (vocab_tiles, token_blocks) if weight_side else (token_blocks, vocab_tiles)
    splits, tiles_per_split = _reduction_splits(owned, reduced, out.numel() * 4)
    # Each split's partial gradient has a slot of its own, summed in slot order below.
    slots = out if splits == 1 else out.new_empty((splits, *out.shape))
    _owned_gradient_kernel[(owned, splits)](
        *kernel_args, slots, num_tokens, vocab_size, hidden_size,
        hidden.stride(0), weight.stride(0), tiles_per_split, out.numel(),
        WEIGHT_SIDE=weight_side, WITH_ENTROPY_GRAD=with_entropy_grad, **settings)
    if splits > 1:
        torch.sum(slots, dim=0, out=out)


def slice_gradients(hidden: torch.Tensor, weight: torch.Tensor, local_targets: torch.Tensor,
                    log_sum_exp: torch.Tensor, grad_logprob: torch.Tensor,
                    grad_entropy: Optional[torch.Tensor] = None,
                    mean_logit: Optional[torch.Tensor] = None,
                    deterministic: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float32 gradients of hidden (this shard's partial) and of the weight shard.

    Same formulas as logprob_torch.slice_gradients. ``deterministic``: the two
    owner-computes kernels (same bits every run); False: one kernel with float32
    atomics (one logit recomputation fewer, rounding varies between runs).
    """
    hidden, weight = hidden.contiguous(), weight.contiguous()
    settings = _launch_settings(hidden, weight, GPU_BACKWARD)  # refuses bad inputs early
    num_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    # The deterministic kernels write every element (the atomic one only adds).
    allocate = torch.empty if deterministic else torch.zeros
    grad_hidden = allocate((num_tokens, hidden_size), dtype=torch.float32, device=hidden.device)
    grad_weight = allocate((vocab_size, hidden_size), dtype=torch.float32, device=weight.device)
    if num_tokens == 0:
        return grad_hidden, grad_weight.zero_()
    with_entropy_grad = grad_entropy is not None
    kernel_args = (hidden, weight, local_targets.contiguous(), log_sum_exp.contiguous(),
                   grad_logprob.contiguous(),
                   grad_entropy.contiguous() if with_entropy_grad else grad_logprob,
                   mean_logit.contiguous() if with_entropy_grad else grad_logprob)
    sizes = (num_tokens, vocab_size, hidden_size)
    if deterministic:
        _owned_gradient(grad_hidden, False, kernel_args, sizes, with_entropy_grad)
        _owned_gradient(grad_weight, True, kernel_args, sizes, with_entropy_grad)
        return grad_hidden, grad_weight
    grid = (triton.cdiv(num_tokens, settings["BLOCK_T"]),
            triton.cdiv(vocab_size, settings["BLOCK_V"]))
    _gradients_kernel[grid](
        *kernel_args, grad_hidden, grad_weight, num_tokens, vocab_size, hidden_size,
        hidden.stride(0), weight.stride(0),
        WITH_ENTROPY_GRAD=with_entropy_grad, **settings)
    return grad_hidden, grad_weight
