"""Float64 reference for target-token log-probs: full logits, for tests only.

It materialises the whole [tokens, vocab] logit matrix on purpose, so that the fused
implementations are checked against the plainest possible formula.
"""

from typing import Optional, Tuple

import torch


def reference_target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and entropy of each token's distribution, in float64.

    ``hidden`` is [..., H], ``weight`` the full (unsharded) output weight [V, H],
    ``targets`` [...] of vocab ids. Masked tokens (``mask == 0`` or ``target ==
    ignore_index``) get 0 for both outputs. Differentiable through autograd.
    """
    logits = hidden.double() @ weight.double().T
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    target_logprobs = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=hidden.device)
    return torch.where(valid, target_logprobs, zero), torch.where(valid, entropy, zero)
