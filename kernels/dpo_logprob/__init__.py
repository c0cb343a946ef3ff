"""Fused DPO log-prob kernels, installed as ``megatron_tpo.kernels``."""

from .logprob import fused_target_logprobs
from .logprob_reference import reference_target_logprobs

__all__ = ["fused_target_logprobs", "reference_target_logprobs"]
