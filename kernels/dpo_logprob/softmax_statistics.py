"""Per-token softmax statistics over a slice of the vocabulary, and how slices combine.

Every implementation reduces its slice of the logits z (a vocab tile, a vocab split of
a kernel, or a tensor-parallel shard) to the same four numbers per token:

  max_logit         m  = max_v z_v
  sum_exp           s  = sum_v exp(z_v - m)
  sum_exp_shifted   s2 = sum_v exp(z_v - m) * (z_v - m)   (only when entropy is wanted)
  target_logit      z_target if this slice owns the target, else 0

Slices combine exactly: with M the largest m, a = exp(m - M), s = sum a*s and
s2 = sum a*(s2 + (m - M)*s). Then log-sum-exp = M + log s and entropy = log s - s2/s.
Keeping s2 relative to the running max (rather than sum exp * z) avoids cancelling two
large numbers when entropy = lse - E[z] with large logits.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist


class SliceStatistics(NamedTuple):
    max_logit: torch.Tensor                  # [..., N] float32
    sum_exp: torch.Tensor                    # [..., N]
    sum_exp_shifted: Optional[torch.Tensor]  # [..., N], None without entropy
    target_logit: torch.Tensor               # [..., N]


def rescale(stats: SliceStatistics, new_max: torch.Tensor) -> SliceStatistics:
    """Express ``stats`` relative to ``new_max`` (>= stats.max_logit) instead of its own max."""
    shift = stats.max_logit - new_max
    scale = torch.exp(shift)
    sum_exp = stats.sum_exp * scale
    sum_exp_shifted = None
    if stats.sum_exp_shifted is not None:
        sum_exp_shifted = scale * (stats.sum_exp_shifted + shift * stats.sum_exp)
    return SliceStatistics(new_max, sum_exp, sum_exp_shifted, stats.target_logit)


def merge_slices(stats: SliceStatistics) -> SliceStatistics:
    """Combine statistics stacked along dim 0 (one row per vocab slice) into one."""
    new_max = stats.max_logit.max(dim=0).values
    scaled = rescale(stats, new_max)
    return SliceStatistics(
        new_max,
        scaled.sum_exp.sum(0),
        None if scaled.sum_exp_shifted is None else scaled.sum_exp_shifted.sum(0),
        scaled.target_logit.sum(0),
    )


def combine_shards(
    stats: SliceStatistics, target_owned: torch.Tensor, group: Optional[dist.ProcessGroup]
) -> Tuple[SliceStatistics, torch.Tensor]:
    """Combine a tensor-parallel shard's statistics with the other shards' (in place of merge).

    Two collectives: MAX of the max logits, then one SUM of the rescaled sums, the target
    logit and the number of shards that own each target (which must come out as 1).
    Returns the combined statistics and that owner count. ``group=None``: no TP.
    """
    if group is None:
        return stats, target_owned.float()
    global_max = stats.max_logit.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    scaled = rescale(stats, global_max)
    columns = [scaled.sum_exp, scaled.target_logit, target_owned.float()]
    if scaled.sum_exp_shifted is not None:
        columns.append(scaled.sum_exp_shifted)
    summed = torch.stack(columns)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    sum_exp_shifted = summed[3] if scaled.sum_exp_shifted is not None else None
    return SliceStatistics(global_max, summed[0], sum_exp_shifted, summed[1]), summed[2]


def log_sum_exp(stats: SliceStatistics) -> torch.Tensor:
    return stats.max_logit + torch.log(stats.sum_exp)


def entropy(stats: SliceStatistics) -> torch.Tensor:
    return torch.log(stats.sum_exp) - stats.sum_exp_shifted / stats.sum_exp
