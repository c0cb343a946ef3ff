"""The ``weight_sync`` group: how the trainer's weights reach the engines, and how closely
the engines must then agree with the trainer."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron_tpo.config import ConfigError
from megatron_tpo.weights.transports import TRANSPORTS


@dataclass(kw_only=True)
class WeightSyncConfig:
    bucket_bytes: int = 1 << 30
    """Bytes per broadcast; the extra memory per rank is about two buckets (WeightStream)."""
    transport: str = "auto"
    """How buckets reach the ranks (weights/transports.py): ``broadcast`` over the process
    group, ``shared_memory`` for CPU ranks of one host, ``auto`` picks."""
    check_parity: bool = True
    """Score the probes on both sides after every sync, and fail beyond the tolerance."""
    parity_tolerance_float32: float = 1e-3
    """Largest allowed |engine - trainer| per-token log-prob on the probes (the run's first
    chat prompts) for a float32 trainer; engines run in its precision or finer. A corrupted
    or misplaced tensor moves log-probs by whole units, so the bounds sit well below 1.
    float32 on both sides agrees to ~1e-6 on CPU (HF against megatron) and ~1e-5 with other
    kernels' summation orders: 1e-3 leaves room for those only."""
    parity_tolerance_bfloat16: float = 0.5
    """The same for bf16 (and the finer fp16): NeMo-RL's refit verifier reports mean 0.013,
    max 0.063 between vLLM and megatron on greedy tokens, where p ~ 1 damps a logit error by
    (1 - p); prompt tokens are teacher-forced, often unlikely, and take the logit error
    whole: a few times more. Not yet measured here on a GPU."""
    parity_tolerance_fp8: float = 1.0
    """The same for FP8 training GEMMs (train.fp8) against a bf16 engine: E4M3 keeps 3
    mantissa bits, so the trainer's own forward differs from bf16 by more again."""
    parity_tolerance: Optional[float] = None
    """One value for every precision; null: the one for the trainer's precision above."""
    num_probe_sequences: int = 4
    """Probe sequences the parity check scores on both sides."""
    probe_length: int = 64
    """Tokens per probe at most; probes are cut to the shortest prompt's length."""

    def tolerance_for(self, params_dtype: torch.dtype, fp8: bool) -> Tuple[str, float]:
        """``(setting name, value)`` bounding the probe difference of a trainer with these
        parameters (its FP8 GEMMs, when on, decide)."""
        if self.parity_tolerance is not None:
            return "weight_sync.parity_tolerance", self.parity_tolerance
        name = ("parity_tolerance_fp8" if fp8 else "parity_tolerance_bfloat16"
                if params_dtype in (torch.bfloat16, torch.float16) else "parity_tolerance_float32")
        return f"weight_sync.{name}", getattr(self, name)

    def validate(self) -> None:
        if self.bucket_bytes < 1:
            raise ConfigError(f"weight_sync.bucket_bytes={self.bucket_bytes}: must be positive")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"weight_sync.transport={self.transport!r}: must be one of "
                              f"{TRANSPORTS}")
        for name in ("parity_tolerance", "parity_tolerance_float32",
                     "parity_tolerance_bfloat16", "parity_tolerance_fp8"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"weight_sync.{name}={value}: must be positive")
        if self.num_probe_sequences < 1:
            raise ConfigError(f"weight_sync.num_probe_sequences={self.num_probe_sequences}: "
                              "must be >= 1")
        if self.probe_length < 2:
            raise ConfigError(f"weight_sync.probe_length={self.probe_length}: must be >= 2 "
                              "(the first token is only context)")
