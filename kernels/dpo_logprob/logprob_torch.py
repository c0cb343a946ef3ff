"""Chunked torch implementation of the fused target log-prob (the CPU path).

Logits exist only one [token_chunk, vocab_chunk] tile at a time, in float32, so peak
memory is bounded by the chunk sizes rather than by tokens x vocab. The backward pass
recomputes each tile instead of keeping it.

Both functions work on one vocab shard: ``local_targets`` are shard-local ids, -1 where
another shard owns the target.
"""

from typing import Iterator, Optional, Tuple

import torch

from .softmax_statistics import SliceStatistics, merge_slices

# A 16 MiB float32 tile. Long token chunks make fewer read-modify-write passes over the
# weight gradient; on 2 cores (4096 x 512 x 32000) this beat 1024 x 8192 and 256 x 4096.
TOKEN_CHUNK = 2048
VOCAB_CHUNK = 2048


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _tile_statistics(logits: torch.Tensor, targets_in_tile: torch.Tensor,
                     with_entropy: bool) -> SliceStatistics:
    """Statistics of one logit tile; overwrites ``logits`` (in-place ops save memory passes)."""
    owned = (targets_in_tile >= 0) & (targets_in_tile < logits.shape[1])
    picked = logits.gather(1, targets_in_tile.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
    max_logit = logits.max(dim=1).values
    shifted = logits.sub_(max_logit[:, None])
    exp_shifted = shifted.exp() if with_entropy else shifted.exp_()
    return SliceStatistics(
        max_logit,
        exp_shifted.sum(1),
        (exp_shifted * shifted).sum(1) if with_entropy else None,
        torch.where(owned, picked, torch.zeros_like(picked)),
    )


def slice_statistics(hidden: torch.Tensor, weight: torch.Tensor, local_targets: torch.Tensor,
                     with_entropy: bool, token_chunk: int = TOKEN_CHUNK,
                     vocab_chunk: int = VOCAB_CHUNK) -> SliceStatistics:
    """Softmax statistics of ``hidden @ weight.T`` per token (see softmax_statistics)."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return SliceStatistics(empty, empty, empty if with_entropy else None, empty)
    per_token_chunk = []
    for rows in _chunks(hidden.shape[0], token_chunk):
        hidden_chunk = hidden[rows].float()
        per_vocab_chunk = []
        for cols in _chunks(weight.shape[0], vocab_chunk):
            logits = hidden_chunk @ weight[cols].float().T
            per_vocab_chunk.append(
                _tile_statistics(logits, local_targets[rows] - cols.start, with_entropy))
        stacked = SliceStatistics(*(None if field[0] is None else torch.stack(field)
                                    for field in zip(*per_vocab_chunk)))
        per_token_chunk.append(merge_slices(stacked))
    return SliceStatistics(*(None if field[0] is None else torch.cat(field)
                             for field in zip(*per_token_chunk)))


def slice_gradients(hidden: torch.Tensor, weight: torch.Tensor, local_targets: torch.Tensor,
                    log_sum_exp: torch.Tensor, grad_logprob: torch.Tensor,
                    grad_entropy: Optional[torch.Tensor] = None,
                    mean_logit: Optional[torch.Tensor] = None,
                    token_chunk: int = TOKEN_CHUNK,
                    vocab_chunk: int = VOCAB_CHUNK,
                    deterministic: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float32 gradients of hidden (this shard's partial) and of the weight shard.

    With p = softmax(z) over the full vocabulary (``log_sum_exp`` is the combined one):
    d logprob / dz = onehot(target) - p, and d entropy / dz = p * (E[z] - z), where
    E[z] = ``mean_logit`` = lse - entropy; the entropy term is skipped without
    ``grad_entropy``. ``deterministic`` is accepted for the common signature: chunks are
    added in a fixed order with no atomics, so this path gives the same bits every run.
    """
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for rows in _chunks(hidden.shape[0], token_chunk):
        hidden_chunk = hidden[rows].float()
        lse = log_sum_exp[rows, None]
        grad_lp = grad_logprob[rows, None].float()
        for cols in _chunks(weight.shape[0], vocab_chunk):
            weight_chunk = weight[cols].float()
            logits = hidden_chunk @ weight_chunk.T
            if grad_entropy is None:
                grad_logits = logits.sub_(lse).exp_().mul_(-grad_lp)
            else:
                probs = torch.sub(logits, lse).exp_()
                # p * (grad_entropy * (E[z] - z) - grad_logprob), in place on the logits.
                grad_logits = (logits.neg_().add_(mean_logit[rows, None])
                               .mul_(grad_entropy[rows, None]).sub_(grad_lp).mul_(probs))
            targets_in_tile = local_targets[rows] - cols.start
            owned = ((targets_in_tile >= 0) & (targets_in_tile < logits.shape[1])).nonzero()[:, 0]
            grad_logits[owned, targets_in_tile[owned]] += grad_lp[owned, 0]
            # addmm_ accumulates inside the matmul: no extra pass over the gradients.
            grad_hidden[rows].addmm_(grad_logits, weight_chunk)
            grad_weight[cols].addmm_(grad_logits.T, hidden_chunk)
    return grad_hidden, grad_weight
