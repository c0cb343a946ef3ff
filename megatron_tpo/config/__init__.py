"""The settings every layer shares (model, parallel), their error and the group loader."""

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.model import ModelConfig, RopeScalingConfig
from megatron_tpo.config.parallel import ParallelConfig
from megatron_tpo.config.loading import CONFIG_DIR, load_model_config, load_parallel_config

__all__ = [
    "CONFIG_DIR", "ConfigError", "ModelConfig", "ParallelConfig", "RopeScalingConfig",
    "load_model_config", "load_parallel_config",
]
