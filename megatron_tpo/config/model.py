"""The Llama-3 family as a typed config, loaded from ``configs/model/<name>.yaml``."""

from dataclasses import dataclass
from typing import Optional


@dataclass(kw_only=True)
class RopeScalingConfig:
    """Llama 3.1's frequency-dependent RoPE scaling (``rope_type: llama3`` in HF)."""

    factor: float = 8.0
    """How much longer the scaled context is than ``original_max_position_embeddings``."""
    low_freq_factor: float = 1.0
    """Wavelengths above original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Wavelengths below original_max_position_embeddings / high_freq_factor are not scaled."""
    original_max_position_embeddings: int = 8192
    """The context length the model was pre-trained at."""


@dataclass(kw_only=True)
class ModelConfig:
    """The policy's Llama-3 architecture; must agree with ``run.policy``'s config.json."""

    name: str = "tiny"
    """A label for logs and reports (the configs/model file's name)."""
    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 64
    """The residual stream's width."""
    ffn_hidden_size: int = 176
    """The SwiGLU MLP's inner width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (grouped-query attention); equal to the heads is plain attention."""
    vocab_size: int = 1001
    """The tokenizer's vocabulary, before padding."""
    max_position_embeddings: int = 256
    """The longest sequence (prompt, thought and response) the model is run on."""
    rope_theta: float = 500000.0
    """RoPE's base period."""
    rope_scaling: Optional[RopeScalingConfig] = None
    """Llama 3.1's RoPE scaling; null: none (Llama 3)."""
    norm_epsilon: float = 1e-5
    """RMSNorm's epsilon."""
    init_method_std: float = 0.02
    """The standard deviation of freshly initialised weights (a checkpoint replaces them)."""
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the embedding table to a multiple of this times TP so every
    vocab shard has the same size; conversion strips the padding again."""
    tie_word_embeddings: bool = False
    """One matrix for the input embedding and the output layer (Llama 3.2 1B/3B, SmolLM2);
    megatron's share_embeddings_and_output_weights, stored once on the HF side."""

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
