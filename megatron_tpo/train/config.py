"""DPO training settings as a typed config, loaded from ``configs/train/<name>.yaml``.

Only what can be checked without a model or a machine is checked here; whether FP8
fits the model's shapes and the hardware is decided in ``megatron_tpo.train.fp8``.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.loading import load_group_config

LOSS_TYPES = ("sigmoid", "ipo")
RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = (None, "uniform", "block")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
# Names as megatron-core 0.16's TransformerConfig spells them. Its "custom" recipe needs
# a quantizer factory import path and is not offered here.
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_AMAX_COMPUTE_ALGOS = ("most_recent", "max")


@dataclass(kw_only=True)
class FP8Config:
    """FP8 GEMMs through Transformer Engine (``megatron_tpo.train.fp8`` checks the shapes)."""

    enabled: bool = False
    """Off: every GEMM runs in the model's dtype and the other fields are not read."""
    format: str = "hybrid"
    """"hybrid": E4M3 forward, E5M2 for gradients (wider range); "e4m3": E4M3 throughout."""
    recipe: str = "delayed"
    """How scales are found: delayed, tensorwise, blockwise or mxfp8 (megatron-core's names)."""
    margin: int = 0
    """Delayed scaling only: scale = (fp8_max / amax) / 2**margin, amax over a history."""
    amax_history_len: int = 1024
    """Delayed scaling only: how many steps' amax values the history keeps."""
    amax_compute_algo: str = "max"
    """Delayed scaling only: the amax of the history taken as "max" or "most_recent"."""
    wgrad: bool = True
    """False keeps the weight-gradient GEMM in bf16."""

    def validate(self) -> None:
        if not self.enabled:
            return
        if self.format not in FP8_FORMATS:
            raise ConfigError(f"train.fp8.format={self.format!r}: must be one of {FP8_FORMATS}")
        if self.recipe not in FP8_RECIPES:
            raise ConfigError(f"train.fp8.recipe={self.recipe!r}: must be one of {FP8_RECIPES}")
        if self.amax_compute_algo not in FP8_AMAX_COMPUTE_ALGOS:
            raise ConfigError(f"train.fp8.amax_compute_algo={self.amax_compute_algo!r}: "
                              f"must be one of {FP8_AMAX_COMPUTE_ALGOS}")
        if self.amax_history_len < 1:
            raise ConfigError(
                f"train.fp8.amax_history_len={self.amax_history_len}: must be >= 1")
        if self.margin < 0:
            raise ConfigError(f"train.fp8.margin={self.margin}: must be >= 0")


@dataclass(kw_only=True)
class DPOTrainingConfig:
    """One iteration's DPO on megatron-core: the loss, Adam's schedule, batching,
    activation recomputation and FP8."""

    beta: float = 0.1
    """The preference loss's beta (see megatron_tpo.train.losses)."""
    loss_type: str = "sigmoid"
    """The preference loss: sigmoid (DPO) or ipo."""
    label_smoothing: float = 0.0
    """The sigmoid loss's label smoothing (conservative DPO), in [0, 0.5)."""
    lr: float = 5e-7
    """Adam's peak learning rate, after a linear warm-up, then decayed to min_lr at train_steps."""
    min_lr: float = 0.0
    """The learning rate the decay ends at."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up to lr."""
    train_steps: int = 100
    """Optimizer steps per iteration; the decay reaches min_lr at the last."""
    lr_decay_style: str = "cosine"
    """The decay after warm-up: cosine, linear or constant."""
    weight_decay: float = 0.0
    """Adam's decoupled weight decay."""
    clip_grad: float = 1.0
    """The global gradient norm is clipped to this; 0 turns clipping off."""
    micro_batch_pairs: int = 1
    """One micro-batch holds this many pairs: 2 * micro_batch_pairs sequences."""
    pad_to_multiple_of: int = 16
    """Every micro-batch of a step is padded to one length, a multiple of this, so the
    pipeline's fixed activation shape fits all of them (and FP8 GEMMs stay aligned)."""
    pad_token_id: int = 0
    """The token id that fills the padding of a micro-batch's sequences."""
    recompute_granularity: Optional[str] = None
    """Activation recomputation: "selective" reruns core attention in backward, "full"
    reruns whole layers; null: none."""
    recompute_method: Optional[str] = None
    """With "full": "uniform" splits each pipeline stage's layers into units of
    recompute_num_layers (only unit inputs are kept) and "block" reruns the first
    recompute_num_layers layers of each stage and keeps the rest; unset with
    recompute_num_layers, they mean uniform units of one layer."""
    recompute_num_layers: Optional[int] = None
    """The layers of one recomputed unit (uniform) or recomputed per stage (block)."""
    logprob_kernel_deterministic: bool = True
    """The fused log-prob kernel's Triton backward reduces in a fixed order, so a rerun
    (or a resume) gives the same gradient bits; false adds with float32 atomics:
    faster, but the rounding follows the GPU's schedule. The CPU path is fixed anyway."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 GEMMs (Transformer Engine only)."""

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first setting that cannot work."""
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"train.loss_type={self.loss_type!r}: must be one of {LOSS_TYPES}")
        if self.beta <= 0:
            raise ConfigError(f"train.beta={self.beta}: must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"train.label_smoothing={self.label_smoothing}: must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"train.label_smoothing={self.label_smoothing}: applies to "
                              f"loss_type='sigmoid' only, not {self.loss_type!r}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.lr={self.lr}, train.min_lr={self.min_lr}: "
                              "need 0 <= min_lr <= lr and lr > 0")
        if self.train_steps < 1 or not 0 <= self.warmup_steps < self.train_steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps}, train.train_steps="
                              f"{self.train_steps}: need 0 <= warmup_steps < train_steps")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"train.lr_decay_style={self.lr_decay_style!r}: must be one of "
                              f"{LR_DECAY_STYLES}")
        if self.clip_grad < 0:
            raise ConfigError(f"train.clip_grad={self.clip_grad}: must be >= 0")
        for name in ("micro_batch_pairs", "pad_to_multiple_of"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name}={getattr(self, name)}: must be >= 1")
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(f"train.recompute_granularity={self.recompute_granularity!r}: "
                              f"must be one of {RECOMPUTE_GRANULARITIES}")
        self._validate_recompute_units()
        self.fp8.validate()

    def _validate_recompute_units(self) -> None:
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise ConfigError(f"train.recompute_method={self.recompute_method!r}: must be one "
                              f"of {RECOMPUTE_METHODS}")
        if self.recompute_num_layers is not None and self.recompute_num_layers < 1:
            raise ConfigError(
                f"train.recompute_num_layers={self.recompute_num_layers}: must be >= 1")
        chosen = {name: getattr(self, name) for name in ("recompute_method", "recompute_num_layers")
                  if getattr(self, name) is not None}
        if chosen and self.recompute_granularity != "full":
            settings = ", ".join(f"train.{name}={value!r}" for name, value in chosen.items())
            raise ConfigError(f"{settings}: apply to recompute_granularity='full' only, not "
                              f"{self.recompute_granularity!r}")


def load_training_config(name_or_path: Union[str, Path] = "dpo", **overrides) -> DPOTrainingConfig:
    """``configs/train/<name>.yaml`` or a YAML path, with ``overrides`` on top, validated."""
    return load_group_config(DPOTrainingConfig, "train", name_or_path, **overrides)
