"""The tiny CPU run's task kit: a task where thinking pays, a local tokenizer, warm starts."""

from megatron_tpo.tiny.assets import TinyAssets, TinyTaskConfig, prepare_tiny_assets
from megatron_tpo.tiny.warm_start import SFTConfig

__all__ = ["SFTConfig", "TinyAssets", "TinyTaskConfig", "prepare_tiny_assets"]
