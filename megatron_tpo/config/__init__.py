"""Typed configs (Hydra structured configs) and their loaders."""

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.model import ModelConfig, RopeScalingConfig
from megatron_tpo.config.parallel import ParallelConfig
from megatron_tpo.config.loading import CONFIG_DIR, load_model_config, load_parallel_config
from megatron_tpo.config.training import DPOTrainingConfig, FP8Config, load_training_config

__all__ = [
    "CONFIG_DIR", "ConfigError", "DPOTrainingConfig", "FP8Config", "ModelConfig", "ParallelConfig",
    "RopeScalingConfig", "load_model_config", "load_parallel_config", "load_training_config",
]
