"""config/model.py: the policy's architecture, the vocabulary megatron pads it to, and
the first inconsistent setting named before any weight exists."""

import pytest

from megatron_tpo.config import ConfigError
from megatron_tpo.config.model import ModelConfig


def test_head_dim_is_the_width_over_the_query_heads():
    assert ModelConfig(hidden_size=4096, num_attention_heads=32).head_dim == 128
    assert ModelConfig(hidden_size=64, num_attention_heads=4).head_dim == 16


@pytest.mark.parametrize("vocab, multiple, tp, padded", [
    (1001, 128, 1, 1024),      # 8 x 128
    (1001, 128, 2, 1024),      # 4 x 256
    (1001, 128, 3, 1152),      # 3 x 384: 2 x 384 = 768 is too few
    (1001, 1, 1, 1001),        # the tiny config: no padding
    (128256, 128, 1, 128256),  # Llama 3's vocab is 1002 x 128 already
    (128256, 128, 8, 129024),  # 126 x 1024: 125 x 1024 = 128000 is too few
])
def test_the_vocab_is_padded_to_a_multiple_every_tp_shard_shares(vocab, multiple, tp, padded):
    model = ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=multiple)
    assert model.padded_vocab_size(tp) == padded


def test_the_shipped_defaults_are_consistent():
    ModelConfig().validate()


@pytest.mark.parametrize("settings, message", [
    (dict(hidden_size=66), "model.hidden_size=66 is not divisible by "
                           "model.num_attention_heads=4"),
    (dict(num_query_groups=3), "model.num_attention_heads=4 is not divisible by "
                               "model.num_query_groups=3"),
    (dict(num_layers=0), "model.num_layers must be positive, got 0"),
    (dict(ffn_hidden_size=-8), "model.ffn_hidden_size must be positive, got -8"),
    (dict(vocab_size=0), "model.vocab_size must be positive, got 0"),
    (dict(make_vocab_size_divisible_by=0),
     "model.make_vocab_size_divisible_by must be positive, got 0"),
])
def test_an_inconsistent_model_is_refused_naming_the_setting(settings, message):
    with pytest.raises(ConfigError) as refused:
        ModelConfig(**settings).validate()
    assert str(refused.value) == message
