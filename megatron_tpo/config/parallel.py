"""Parallel layout of the trainer, checked against the model and the world size."""

from dataclasses import dataclass
from typing import Optional

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.model import ModelConfig


@dataclass(kw_only=True)
class ParallelConfig:
    """The trainer's megatron-core layout; data parallel is what the world size leaves."""

    tensor_model_parallel_size: int = 1
    """TP: every layer's matrices split over this many ranks (divides heads, query groups
    and the MLP width)."""
    pipeline_model_parallel_size: int = 1
    """PP: the layers split into this many consecutive stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved pipeline: model chunks per PP stage (needs PP >= 2); null: 1."""
    context_parallel_size: int = 1
    """CP: sequences split over this many ranks (the DPO trainer needs 1)."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism inside a TP group (needs TP > 1, and apex or TE)."""

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ConfigError(
                f"world size {world_size} is not a multiple of "
                f"parallel.tensor_model_parallel_size * pipeline_model_parallel_size * "
                f"context_parallel_size = {self.tensor_model_parallel_size} * "
                f"{self.pipeline_model_parallel_size} * {self.context_parallel_size}"
            )
        return world_size // self.model_parallel_size

    def validate(self, model: ModelConfig, world_size: Optional[int] = None) -> None:
        """Raise ``ConfigError`` before any process group or weight exists."""
        model.validate()
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        # None means no interleaving; 0 is a setting, refused below, not a synonym for it.
        vpp = self.virtual_pipeline_model_parallel_size
        vpp = 1 if vpp is None else vpp
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if model.num_attention_heads % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size={tp} does not divide "
                f"model.num_attention_heads={model.num_attention_heads}"
            )
        if model.num_query_groups % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size={tp} does not divide "
                f"model.num_query_groups={model.num_query_groups}"
            )
        if model.ffn_hidden_size % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size={tp} does not divide "
                f"model.ffn_hidden_size={model.ffn_hidden_size}"
            )
        if vpp < 1:
            raise ConfigError(
                f"parallel.virtual_pipeline_model_parallel_size must be >= 1, got {vpp}")
        if pp < 2 and vpp > 1:
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size needs "
                "parallel.pipeline_model_parallel_size >= 2")
        if model.num_layers % (pp * vpp):
            raise ConfigError(
                f"model.num_layers={model.num_layers} is not divisible by "
                f"parallel.pipeline_model_parallel_size={pp} * "
                f"virtual_pipeline_model_parallel_size={vpp}"
            )
        if self.sequence_parallel and tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs tensor_model_parallel_size > 1")
        if world_size is not None:
            self.data_parallel_size(world_size)
