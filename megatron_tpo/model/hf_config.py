"""Read a Hugging Face Llama ``config.json`` into a ``ModelConfig`` and write one back.

Checkpoints made with transformers 4 carry top-level ``rope_theta``/``rope_scaling``;
transformers 5 writes one ``rope_parameters`` dict. Both are read; writing goes through
the installed ``LlamaConfig`` so the installed transformers can read the result back.
"""

import json
from pathlib import Path
from typing import Any, Dict, Optional

from megatron_tpo.config import ConfigError, ModelConfig, RopeScalingConfig

_REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "vocab_size")


def read_hf_config_dict(hf_dir: Path) -> Dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json; is {hf_dir} a Hugging Face model directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from error


def _rope_settings(raw: Dict[str, Any], path: str):
    parameters = raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta", parameters.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling") or (parameters if parameters.get("rope_type") else None)
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ConfigError(f"{path}: rope scaling type {kind!r} is not supported (only llama3)")
    return float(theta), RopeScalingConfig(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def model_config_from_hf(raw: Dict[str, Any], source: str = "config.json",
                         name: Optional[str] = None) -> ModelConfig:
    """A ``ModelConfig`` from an HF Llama config dict; refuses what is not Llama-shaped."""
    if raw.get("model_type", "llama") != "llama":
        raise ConfigError(f"{source}: model_type={raw['model_type']!r}, expected 'llama'")
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)}")
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if raw.get(key, expected) != expected:
            raise ConfigError(f"{source}: {key}={raw[key]!r} is not supported (expected {expected!r})")
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    if head_dim * heads != raw["hidden_size"]:
        raise ConfigError(f"{source}: head_dim={head_dim} * num_attention_heads={heads} "
                          f"!= hidden_size={raw['hidden_size']}")
    theta, scaling = _rope_settings(raw, source)
    config = ModelConfig(
        name=name or raw.get("_name_or_path") or "hf",
        num_layers=raw["num_hidden_layers"],
        hidden_size=raw["hidden_size"],
        ffn_hidden_size=raw["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=raw.get("num_key_value_heads") or heads,
        vocab_size=raw["vocab_size"],
        max_position_embeddings=raw.get("max_position_embeddings", 8192),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_epsilon=raw.get("rms_norm_eps", 1e-5),
        init_method_std=raw.get("initializer_range", 0.02),
        # LlamaConfig's default: a config.json without the key is untied.
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    try:
        config.validate()
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error
    return config


def hf_config_from_model(model: ModelConfig, base: Optional[Dict[str, Any]] = None,
                         torch_dtype: str = "float32"):
    """An installed-transformers ``LlamaConfig`` for ``model``.

    ``base`` (the original HF config, when known) keeps what megatron does not model,
    such as the special token ids.
    """
    from transformers import LlamaConfig

    settings = {key: value for key, value in (base or {}).items()
                if key not in ("rope_parameters", "rope_scaling", "rope_theta",
                               "transformers_version", "architectures", "head_dim")}
    settings.update(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon,
        initializer_range=model.init_method_std,
        hidden_act="silu",
        tie_word_embeddings=model.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        rope_theta=model.rope_theta,
        torch_dtype=torch_dtype,
    )
    if model.rope_scaling is not None:
        settings["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": model.rope_scaling.factor,
            "low_freq_factor": model.rope_scaling.low_freq_factor,
            "high_freq_factor": model.rope_scaling.high_freq_factor,
            "original_max_position_embeddings":
                model.rope_scaling.original_max_position_embeddings,
        }
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    return config
