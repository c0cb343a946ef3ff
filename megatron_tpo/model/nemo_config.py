"""NeMo's record of a Llama config, read into a ``ModelConfig`` and written back.

NeMo 2 keeps the config twice in ``<ckpt>/context``: ``model.yaml`` (every field of
the ``LlamaConfig`` dataclass, defaults included; what NeMo's exporters read) and
``io.json`` (fiddle's serialisation of the ``TrainerContext``, only the arguments set
explicitly; what NeMo's own loader reads). Llama-3.1 RoPE scaling has no flag: it is the
config class (``Llama31Config`` and its subclasses, with ``scale_factor``,
``low_freq_factor``, ``high_freq_factor``, ``old_context_len``). NeMo 1 keeps a flat
``model_config.yaml`` with its own key names. See ``/work/shared/notes/nemo.md``.
"""

import json
from pathlib import Path
from typing import Any, Dict, Optional

from megatron_tpo.config import ConfigError, ModelConfig, RopeScalingConfig
from megatron_tpo.model.config_names import (
    names_of, read_fields, rename_fields, write_fields,
)

LLAMA_MODEL = ("nemo.collections.llm.gpt.model.llama", "LlamaModel")
LLAMA_CONFIG = ("nemo.collections.llm.gpt.model.llama", "LlamaConfig")
LLAMA31_CONFIG = ("nemo.collections.llm.gpt.model.llama", "Llama31Config")
AUTO_TOKENIZER = ("nemo.collections.common.tokenizers.huggingface.auto_tokenizer",
                  "AutoTokenizer")
TOKENIZER_DIR = "nemo_tokenizer"  # where NeMo's HF importer puts the tokenizer artifact
# Llama31Config's defaults, for checkpoints (io.json) that record only what was set.
LLAMA31_DEFAULTS = {"scale_factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "old_context_len": 8192}


def _require(config: Dict[str, Any], source: str, key: str, expected) -> None:
    value = config.get(key, expected)
    if isinstance(value, dict):  # {_target_: torch.nn.functional.silu, _call_: false}
        value = value.get("_target_", "").rsplit(".", 1)[-1]
    if value != expected:
        raise ConfigError(f"{source}: {key}={value!r} is not supported (Llama needs {expected!r})")


def _is_llama31(config: Dict[str, Any]) -> bool:
    target = str(config.get("_target_", ""))
    return "scale_factor" in config or any(f"Llama3{minor}Config" in target for minor in "123")


def model_config_from_nemo2(config: Dict[str, Any], source: str,
                            fallback_vocab_size: Optional[int] = None) -> ModelConfig:
    """A ``ModelConfig`` from the ``config`` section of NeMo 2's ``model.yaml``."""
    required = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
    missing = [key for key in names_of(required, "nemo2") if config.get(key) is None]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)}")
    for key, expected in (("normalization", "RMSNorm"), ("gated_linear_unit", True),
                          ("add_bias_linear", False), ("add_qkv_bias", False),
                          ("position_embedding_type", "rope"), ("rotary_percent", 1.0),
                          ("activation_func", "silu"),
                          ("rotary_interleaved", False), ("qk_layernorm", False)):
        _require(config, source, key, expected)
    # What an io.json may leave out (fiddle records only what was set) is read as these.
    fields = read_fields(config, "nemo2",
                         defaults={"max_position_embeddings": 4096, "rope_theta": 10000.0})
    heads, hidden = fields["num_attention_heads"], fields["hidden_size"]
    if config.get("kv_channels") not in (None, hidden // heads):
        raise ConfigError(f"{source}: kv_channels={config['kv_channels']} differs from "
                          f"hidden_size / num_attention_heads = {hidden // heads}")
    fields.setdefault("num_query_groups", heads)   # null: multi-head attention
    vocab_size = fields.get("vocab_size") or fallback_vocab_size
    if not vocab_size:
        raise ConfigError(f"{source}: no vocab_size, and no tokenizer or embedding to count it")
    fields["vocab_size"] = int(vocab_size)
    scaling = None
    if _is_llama31(config):
        values = {key: config.get(key, default) for key, default in LLAMA31_DEFAULTS.items()}
        scaling = RopeScalingConfig(
            factor=float(values["scale_factor"]), low_freq_factor=float(values["low_freq_factor"]),
            high_freq_factor=float(values["high_freq_factor"]),
            original_max_position_embeddings=int(values["old_context_len"]))
    return ModelConfig(name=config.get("_target_", "nemo").rsplit(".", 1)[-1],
                       rope_scaling=scaling, **fields)


def model_config_from_nemo1(config: Dict[str, Any], source: str,
                            fallback_vocab_size: Optional[int] = None) -> ModelConfig:
    """A ``ModelConfig`` from NeMo 1's flat ``model_config.yaml`` (megatron_gpt)."""
    if not config.get("mcore_gpt", False):
        raise ConfigError(f"{source}: mcore_gpt is not true; only megatron-core GPT models "
                          "(not the legacy language_model layout) are read")
    renamed = rename_fields(config, "nemo1", "nemo2")
    if "seq_length" not in renamed and "encoder_seq_length" in config:
        renamed["seq_length"] = config["encoder_seq_length"]
    swiglu = config.get("activation") in ("fast-swiglu", "swiglu")
    renamed.update({
        "_target_": "Llama31Config" if config.get("scale_positional_embedding") else "LlamaConfig",
        "normalization": {"rmsnorm": "RMSNorm"}.get(config.get("normalization"),
                                                     config.get("normalization")),
        "gated_linear_unit": swiglu,
        "activation_func": "silu" if swiglu else config.get("activation"),
        "add_bias_linear": config.get("bias", False),
        "rotary_percent": config.get("rotary_percentage", 1.0),
    })
    # Not ModelConfig fields, but checked by the NeMo 2 reader under the same names.
    for key in ("kv_channels", "position_embedding_type"):
        if key in config:
            renamed[key] = config[key]
    if config.get("scale_positional_embedding"):
        renamed.update({key: config.get(key, default) for key, default in LLAMA31_DEFAULTS.items()})
    return model_config_from_nemo2(renamed, source, fallback_vocab_size)


def read_yaml(path: Path) -> Dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"{path}: missing")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def llama_config_from_io_json(path: Path) -> Dict[str, Any]:
    """The ``model.config`` arguments recorded in fiddle's ``io.json``, as a flat dict
    with ``_target_`` (only explicitly set arguments: fiddle stores no defaults)."""
    try:
        objects = json.loads(Path(path).read_text())["objects"]
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise ConfigError(f"{path}: not a fiddle io.json ({error})") from error
    config = next((o for o in objects.values() if "<root>.model.config" in o.get("paths", [])), None)
    if config is None:
        raise ConfigError(f"{path}: no <root>.model.config object")
    metadata = objects[config["metadata"]["key"]]
    target = dict(metadata["items"])["Attr(name='fn_or_cls')"]
    values = {"_target_": f"{target['module']}.{target['name']}"}
    for attribute, value in config["items"]:
        name = attribute[len("Attr(name='"):-len("')")]
        if value.get("type") == "leaf":
            values[name] = value["value"]
        elif value.get("type") == "pyref":
            values[name] = {"_target_": f"{value['module']}.{value['name']}"}
    return values


def nemo2_config_fields(model: ModelConfig, dtype: str = "float32") -> Dict[str, Any]:
    """The ``LlamaConfig``/``Llama31Config`` arguments that describe ``model``."""
    fields = {
        **write_fields(model, "nemo2"), "kv_channels": model.head_dim,
        "normalization": "RMSNorm",
        "gated_linear_unit": True, "add_bias_linear": False, "position_embedding_type": "rope",
        "rotary_percent": 1.0, "bf16": dtype == "bfloat16", "fp16": dtype == "float16",
    }
    if model.rope_scaling is not None:
        fields.update(scale_factor=model.rope_scaling.factor,
                      low_freq_factor=model.rope_scaling.low_freq_factor,
                      high_freq_factor=model.rope_scaling.high_freq_factor,
                      old_context_len=model.rope_scaling.original_max_position_embeddings)
    return fields


def nemo2_model_yaml(model: ModelConfig, dtype: str = "float32") -> Dict[str, Any]:
    """``context/model.yaml`` content, in NeMo's ``_target_`` convention."""
    config_class = LLAMA31_CONFIG if model.rope_scaling is not None else LLAMA_CONFIG
    config = {"_target_": ".".join(config_class), **nemo2_config_fields(model, dtype),
              "activation_func": {"_call_": False, "_target_": "torch.nn.functional.silu"},
              "params_dtype": {"_call_": False, "_target_": f"torch.{dtype}"}}
    return {
        "_target_": ".".join(LLAMA_MODEL),
        "config": dict(sorted(config.items())),
        "tokenizer": {"_target_": ".".join(AUTO_TOKENIZER),
                      "pretrained_model_name": TOKENIZER_DIR, "use_fast": True},
    }


def _pyref(module: str, name: str) -> Dict[str, Any]:
    return {"type": "pyref", "module": module, "name": name}


class _FiddleJson:
    """Builds fiddle's ``serialization.dump_json`` layout for nested ``fdl.Config``s.

    Objects are keyed ``<snake name>_<n>``, children before parents, each with the
    ``paths`` from the root it is reachable by; every object is referenced once.
    """

    def __init__(self):
        self.objects: Dict[str, Any] = {}
        self.counts: Dict[str, int] = {}

    def _key(self, name: str) -> str:
        self.counts[name] = self.counts.get(name, 0) + 1
        return f"{name}_{self.counts[name]}"

    def _empty_dict(self) -> Dict[str, Any]:
        key = self._key("dict")
        self.objects[key] = {"type": _pyref("builtins", "dict"), "items": [],
                             "metadata": {"type": _pyref("builtins", "tuple"), "items": [],
                                          "metadata": None}}
        return {"type": "ref", "key": key}

    def config(self, fn_or_cls, arguments: Dict[str, Any], path: str) -> Dict[str, Any]:
        """``arguments`` values: plain leaves, ``("pyref", module, name)`` or a nested
        ``("config", fn_or_cls, arguments)``."""
        items = []
        for name, value in arguments.items():
            child_path = f"{path}.{name}"
            if isinstance(value, tuple) and value[0] == "config":
                items.append([f"Attr(name='{name}')", self.config(value[1], value[2], child_path)])
            elif isinstance(value, tuple) and value[0] == "pyref":
                items.append([f"Attr(name='{name}')", {**_pyref(value[1], value[2]),
                                                        "paths": [child_path]}])
            else:
                items.append([f"Attr(name='{name}')",
                              {"type": "leaf", "value": value, "paths": [child_path]}])
        names_key = self._key("tuple")
        self.objects[names_key] = {
            "type": _pyref("builtins", "tuple"), "metadata": None,
            "items": [[f"Index(index={i})", name] for i, name in enumerate(arguments)]}
        tags, history = self._empty_dict(), self._empty_dict()
        metadata_key = self._key("buildable_traverser_metadata")
        traverser = _pyref("fiddle._src.config", "BuildableTraverserMetadata")
        self.objects[metadata_key] = {"type": traverser, "metadata": traverser, "items": [
            ["Attr(name='fn_or_cls')", _pyref(*fn_or_cls)],
            ["Attr(name='argument_names')", {"type": "ref", "key": names_key}],
            ["Attr(name='argument_tags')", tags], ["Attr(name='argument_history')", history]]}
        snake = "".join("_" + c.lower() if c.isupper() else c for c in fn_or_cls[1]).lstrip("_")
        key = self._key(snake)
        self.objects[key] = {"type": _pyref("fiddle._src.config", "Config"), "items": items,
                             "metadata": {"type": "ref", "key": metadata_key}, "paths": [path]}
        return {"type": "ref", "key": key}

    def document(self, root: Dict[str, Any]) -> Dict[str, Any]:
        return {"root": root, "objects": self.objects,
                "refcounts": {key: 1 for key in self.objects}, "version": "0.0.1"}


def nemo2_io_json(model: ModelConfig, dtype: str = "float32") -> Dict[str, Any]:
    """``context/io.json``: the ``TrainerContext`` NeMo's ``io.load_context`` rebuilds.

    Its shape follows the io.json NeMo 2.5's importer wrote for the fixture in
    ``/work/shared/fixtures/nemo2_tiny_llama``: a ``LlamaModel`` with its config and an
    ``AutoTokenizer`` whose directory artifact is ``nemo_tokenizer`` (relative to
    ``context/``), and a CPU trainer with a ``MegatronStrategy`` that saves no optimizer.
    """
    config_class = LLAMA31_CONFIG if model.rope_scaling is not None else LLAMA_CONFIG
    config_arguments = {**nemo2_config_fields(model, dtype), "params_dtype": ("pyref", "torch", dtype),
                        "activation_func": ("pyref", "torch.nn.functional", "silu")}
    writer = _FiddleJson()
    model_arguments = {
        "config": ("config", config_class, config_arguments),
        "tokenizer": ("config", AUTO_TOKENIZER, {"pretrained_model_name": TOKENIZER_DIR}),
    }
    trainer_arguments = {
        "accelerator": "cpu", "devices": 1,
        "strategy": ("config", ("nemo.lightning.pytorch.strategies.megatron_strategy",
                                "MegatronStrategy"), {"ckpt_save_optimizer": False}),
    }
    root = writer.config(("nemo.lightning.io.pl", "TrainerContext"), {
        "model": ("config", LLAMA_MODEL, model_arguments),
        "trainer": ("config", ("nemo.lightning.pytorch.trainer", "Trainer"), trainer_arguments),
    }, "<root>")
    return writer.document(root)
