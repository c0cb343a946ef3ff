"""Rollout settings (``configs/rollout/<name>.yaml``): the engine, the thought prompt, sampling."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.loading import load_group_config
from megatron_tpo.rollout.engine import SamplingParams

ENGINES = ("hf", "vllm")


@dataclass
class RolloutConfig:
    engine: str = "hf"
    # A built-in thought template ("generic", "specific"), configs/thought/<name>, or a path.
    thought_template: str = "generic"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    batch_size: int = 8     # prompts per generate call (the HF engine)
    device: str = "cpu"

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"rollout.engine={self.engine!r}: must be one of {ENGINES}")
        if self.batch_size < 1:
            raise ConfigError(f"rollout.batch_size={self.batch_size}: must be >= 1")
        self.sampling.validate()


def load_rollout_config(name_or_path: Union[str, Path] = "paper", **overrides) -> RolloutConfig:
    return load_group_config(RolloutConfig, "rollout", name_or_path, **overrides)
