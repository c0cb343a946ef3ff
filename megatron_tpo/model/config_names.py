"""What each ``ModelConfig`` field is called in the configs of other projects.

One row per ``ModelConfig`` field, one column per foreign convention: Hugging Face's
``config.json`` (``hf``), NeMo 2's ``LlamaConfig`` (``nemo2``), NeMo 1's flat
``model_config.yaml`` (``nemo1``) and megatron-core's ``TransformerConfig``
(``megatron``). A name means the value is the same under another key; ``None`` means
the convention has no such key, or the value needs code (a derived value, another
shape, a second place to look), which sits beside the reader or writer that walks the
table. Every reader and writer of those conventions goes through ``read_fields``,
``write_fields``, ``rename_fields`` or ``names_of``, so a rename is written here once.
"""

import dataclasses
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional

from megatron_tpo.config import ModelConfig

CONVENTIONS = ("hf", "nemo2", "nemo1", "megatron")


class FieldNames(NamedTuple):
    field: str
    hf: Optional[str]
    nemo2: Optional[str]
    nemo1: Optional[str]
    megatron: Optional[str]


# name: HF takes it from _name_or_path, NeMo from the config class; rope_theta in HF
# may sit in transformers 5's rope_parameters; rope_scaling is a dict in HF and the
# config class plus four fields in NeMo. megatron-core takes the vocabulary (padded),
# the context length, RoPE and tying as GPTModel arguments, not TransformerConfig fields.
FIELD_NAMES = (
    #          ModelConfig field               HF config.json             NeMo 2                                 NeMo 1                                 megatron-core
    FieldNames("name",                         None,                      None,                                  None,                                  None),
    FieldNames("num_layers",                   "num_hidden_layers",       "num_layers",                          "num_layers",                          "num_layers"),
    FieldNames("hidden_size",                  "hidden_size",             "hidden_size",                         "hidden_size",                         "hidden_size"),
    FieldNames("ffn_hidden_size",              "intermediate_size",       "ffn_hidden_size",                     "ffn_hidden_size",                     "ffn_hidden_size"),
    FieldNames("num_attention_heads",          "num_attention_heads",     "num_attention_heads",                 "num_attention_heads",                 "num_attention_heads"),
    FieldNames("num_query_groups",             "num_key_value_heads",     "num_query_groups",                    "num_query_groups",                    "num_query_groups"),
    FieldNames("vocab_size",                   "vocab_size",              "vocab_size",                          "vocab_size",                          None),
    FieldNames("max_position_embeddings",      "max_position_embeddings", "seq_length",                          "max_position_embeddings",             None),
    FieldNames("rope_theta",                   None,                      "rotary_base",                         "rotary_base",                         None),
    FieldNames("rope_scaling",                 None,                      None,                                  None,                                  None),
    FieldNames("norm_epsilon",                 "rms_norm_eps",            "layernorm_epsilon",                   "layernorm_epsilon",                   "layernorm_epsilon"),
    FieldNames("init_method_std",              "initializer_range",       "init_method_std",                     "init_method_std",                     "init_method_std"),
    FieldNames("make_vocab_size_divisible_by", None,                      "make_vocab_size_divisible_by",        "make_vocab_size_divisible_by",        None),
    FieldNames("tie_word_embeddings",          "tie_word_embeddings",     "share_embeddings_and_output_weights", "share_embeddings_and_output_weights", None),
)

# Read values are cast to the field's type (YAML and JSON write 500000 for 500000.0).
_CASTS = {field.name: field.type for field in dataclasses.fields(ModelConfig)
          if field.type in (int, float, bool)}


def foreign_names(convention: str) -> Dict[str, str]:
    """``{ModelConfig field: its name in convention}`` for the fields it names."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; known: {', '.join(CONVENTIONS)}")
    return {row.field: getattr(row, convention) for row in FIELD_NAMES
            if getattr(row, convention) is not None}


def names_of(fields: Iterable[str], convention: str) -> List[str]:
    """The names of ``fields`` in convention, in their order (for "missing ..." errors)."""
    names = foreign_names(convention)
    return [names[field] for field in fields]


def read_fields(raw: Mapping[str, Any], convention: str,
                defaults: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``ModelConfig`` keyword arguments from the keys of ``raw`` that convention names;
    a key that is absent or null takes ``defaults[field]`` when given, else it is left out
    (so ``ModelConfig``'s own default applies)."""
    values = dict(defaults or {})
    values.update({field: raw[name] for field, name in foreign_names(convention).items()
                   if raw.get(name) is not None})
    return {field: _CASTS[field](value) if field in _CASTS else value
            for field, value in values.items()}


def write_fields(model: ModelConfig, convention: str) -> Dict[str, Any]:
    """``{foreign name: value}`` of every field of ``model`` that convention names."""
    return {name: getattr(model, field) for field, name in foreign_names(convention).items()}


def rename_fields(raw: Mapping[str, Any], source: str, target: str) -> Dict[str, Any]:
    """The keys of ``raw`` named in ``source``, under their ``target`` names (for fields
    both conventions name; values as they are)."""
    targets = foreign_names(target)
    return {targets[field]: raw[name] for field, name in foreign_names(source).items()
            if field in targets and name in raw}
