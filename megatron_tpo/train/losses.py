"""Preference losses for TPO's training step: sigmoid DPO (optionally label-smoothed) and IPO.

Every loss reads four per-sequence log-probabilities of the thought+response tokens
(prompt and padding masked): policy and frozen reference, each for the chosen and the
rejected output of a pair. With h = (policy_chosen - policy_rejected)
- (reference_chosen - reference_rejected):

  sigmoid DPO   -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
                (eps = label_smoothing: conservative DPO, labels flipped with prob. eps)
  IPO           (h - 1 / (2 * beta)) ** 2

The implicit reward of an output is beta * (policy - reference) log-prob.
"""

from typing import Dict, NamedTuple

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


def completion_mask(prompt_lengths: torch.Tensor, sequence_lengths: torch.Tensor,
                    target_length: int) -> torch.Tensor:
    """[B, target_length] mask of the target positions that hold thought or response tokens.

    Targets are the inputs shifted by one (position i predicts token i + 1), so target i
    counts when prompt_length <= i + 1 < sequence_length: the prompt and the padding
    after each sequence are masked.
    """
    predicted = torch.arange(1, target_length + 1, device=prompt_lengths.device)
    return ((predicted[None, :] >= prompt_lengths[:, None])
            & (predicted[None, :] < sequence_lengths[:, None])).long()


def sequence_logprobs(token_logprobs: torch.Tensor, loss_mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """Sum (or, with ``average``, mean) of [B, S] token log-probs where ``loss_mask`` is 1."""
    mask = loss_mask.to(torch.float32)
    total = (token_logprobs.float() * mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


class DPOLoss(NamedTuple):
    loss: torch.Tensor                # scalar, mean over pairs
    per_pair: torch.Tensor            # [P]
    metrics: Dict[str, torch.Tensor]  # detached scalars, means over pairs


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLoss:
    """DPO / IPO loss of P pairs from per-sequence log-probs, each a [P] tensor.

    Computed in float32. Metrics: ``loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margin`` (chosen - rejected), ``rewards/accuracy`` (fraction of pairs whose
    chosen reward is strictly higher), ``logps/chosen`` and ``logps/rejected`` (policy).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError("label_smoothing applies to the sigmoid DPO loss only")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, reference_chosen,
                                       reference_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must have one shape, got {sorted(shapes)}")

    policy_chosen, policy_rejected = policy_chosen.float(), policy_rejected.float()
    chosen_ratio = policy_chosen - reference_chosen.float()
    rejected_ratio = policy_rejected - reference_rejected.float()
    preference = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        per_pair = (-(1 - label_smoothing) * F.logsigmoid(beta * preference)
                    - label_smoothing * F.logsigmoid(-beta * preference))
    else:
        per_pair = (preference - 1 / (2 * beta)) ** 2
    loss = per_pair.mean()

    chosen_reward = beta * chosen_ratio.detach()
    rejected_reward = beta * rejected_ratio.detach()
    metrics = {
        "loss": loss.detach(),
        "rewards/chosen": chosen_reward.mean(),
        "rewards/rejected": rejected_reward.mean(),
        "rewards/margin": (chosen_reward - rejected_reward).mean(),
        "rewards/accuracy": (chosen_reward > rejected_reward).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return DPOLoss(loss, per_pair, metrics)
