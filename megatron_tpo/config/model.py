"""The Llama-3 family as a typed config, loaded from ``configs/model/<name>.yaml``."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class RopeScalingConfig:
    """Llama 3.1's frequency-dependent RoPE scaling (``rope_type: llama3`` in HF)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int = 2
    vocab_size: int = 1001
    max_position_embeddings: int = 256
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    # Megatron pads the embedding table to a multiple of this times TP so every
    # vocab shard has the same size; conversion strips the padding again.
    make_vocab_size_divisible_by: int = 128
    # One matrix for the input embedding and the output layer (Llama 3.2 1B/3B, SmolLM2);
    # megatron's share_embeddings_and_output_weights, stored once on the HF side.
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_size: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first inconsistent setting."""
        from megatron_tpo.config.errors import ConfigError

        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "vocab_size",
                     "make_vocab_size_divisible_by"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
