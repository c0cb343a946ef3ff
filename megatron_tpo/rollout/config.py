"""Rollout settings (``configs/rollout/<name>.yaml``): the engine and sampling (the thought
prompt is tpo-run's ``thought`` group)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.loading import load_group_config
from megatron_tpo.rollout.engine import SamplingParams

ENGINES = ("hf", "vllm")
VLLM_SLEEP_LEVELS = (0, 1, 2)


@dataclass
class VLLMConfig:
    """The vLLM engine (GPU only), colocated with the trainer in one torch.distributed world."""

    # Every block of this many consecutive ranks is one engine (external_launcher).
    tensor_parallel_size: int = 1
    # A fraction of the device's *total* memory that vLLM may take; colocated with
    # megatron, it must fit in what the trainer leaves free, or vLLM refuses to start.
    gpu_memory_utilization: float = 0.5
    # 1: weights to host memory, KV cache dropped; 2: both dropped (a sync rewrites the
    # weights anyway); 0: pause scheduling only.
    sleep_level: int = 1
    dtype: str = "bfloat16"
    max_model_len: Optional[int] = None
    enforce_eager: bool = False   # no CUDA graphs: slower, but nothing captured to go stale
    enable_prefix_caching: bool = True

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"rollout.vllm.tensor_parallel_size={self.tensor_parallel_size}: "
                              "must be >= 1")
        if not 0 < self.gpu_memory_utilization < 1:
            raise ConfigError(f"rollout.vllm.gpu_memory_utilization={self.gpu_memory_utilization}:"
                              " must be in (0, 1), a fraction of the device's total memory")
        if self.sleep_level not in VLLM_SLEEP_LEVELS:
            raise ConfigError(f"rollout.vllm.sleep_level={self.sleep_level}: must be one of "
                              f"{VLLM_SLEEP_LEVELS}")


@dataclass
class RolloutConfig:
    engine: str = "hf"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    batch_size: int = 8     # prompts per generate call (the HF engine)
    device: str = "cpu"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"rollout.engine={self.engine!r}: must be one of {ENGINES}")
        if self.batch_size < 1:
            raise ConfigError(f"rollout.batch_size={self.batch_size}: must be >= 1")
        self.sampling.validate()
        self.vllm.validate()


def load_rollout_config(name_or_path: Union[str, Path] = "paper", **overrides) -> RolloutConfig:
    return load_group_config(RolloutConfig, "rollout", name_or_path, **overrides)
