"""Read a Hugging Face Llama ``config.json`` into a ``ModelConfig`` and write one back.

Checkpoints made with transformers 4 carry top-level ``rope_theta``/``rope_scaling``;
transformers 5 writes one ``rope_parameters`` dict. Both are read; writing goes through
the installed ``LlamaConfig`` so the installed transformers can read the result back.
"""

import json
from pathlib import Path
from typing import Any, Dict, Optional

from megatron_tpo.config import ConfigError, ModelConfig, RopeScalingConfig
from megatron_tpo.model.config_names import names_of, read_fields, write_fields

_REQUIRED_FIELDS = ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                    "vocab_size")


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
    missing = [key for key in names_of(_REQUIRED_FIELDS, "hf") if key not in raw]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)}")
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if raw.get(key, expected) != expected:
            raise ConfigError(f"{source}: {key}={raw[key]!r} is not supported (expected {expected!r})")
    # Keys config.json may leave out: no num_key_value_heads is multi-head attention and
    # no tie_word_embeddings is untied (LlamaConfig's rules; the latter ModelConfig's
    # default too); the context is then taken as 8192 positions.
    fields = read_fields(raw, "hf", defaults={"max_position_embeddings": 8192})
    heads, hidden = fields["num_attention_heads"], fields["hidden_size"]
    fields.setdefault("num_query_groups", heads)
    head_dim = raw.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConfigError(f"{source}: head_dim={head_dim} * num_attention_heads={heads} "
                          f"!= hidden_size={hidden}")
    theta, scaling = _rope_settings(raw, source)
    config = ModelConfig(name=name or raw.get("_name_or_path") or "hf", rope_theta=theta,
                         rope_scaling=scaling, **fields)
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
    settings.update(write_fields(model, "hf"), hidden_act="silu", attention_bias=False,
                    mlp_bias=False, rope_theta=model.rope_theta, torch_dtype=torch_dtype)
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
