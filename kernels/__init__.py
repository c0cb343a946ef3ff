"""Fused DPO log-prob kernels, installed as ``megatron_tpo.kernels``."""
