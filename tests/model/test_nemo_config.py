"""NeMo's config records (model.yaml, io.json, NeMo 1 model_config.yaml) <-> ModelConfig."""

import json
from pathlib import Path

import pytest

from llama_fixtures import tiny_model_config
from megatron_tpo.config import ConfigError, RopeScalingConfig
from megatron_tpo.model.nemo import open_nemo2
from megatron_tpo.model.nemo_config import (llama_config_from_io_json, model_config_from_nemo1,
                                            model_config_from_nemo2, nemo2_io_json,
                                            nemo2_model_yaml)

FIXTURE = Path("/work/shared/fixtures/nemo2_tiny_llama/nemo")
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason="NeMo-written fixture absent")


def _objects_by_path(document):
    return {path: body for body in document["objects"].values() for path in body.get("paths", [])}


def _fn_or_cls(document, body):
    metadata = document["objects"][body["metadata"]["key"]]
    target = dict(metadata["items"])["Attr(name='fn_or_cls')"]
    return target["module"], target["name"]


@needs_fixture
def test_written_io_json_has_the_structure_nemo_wrote(tmp_path):
    written_by_nemo = json.loads((FIXTURE / "context" / "io.json").read_text())
    ours = nemo2_io_json(open_nemo2(FIXTURE).model)
    theirs_by_path, ours_by_path = _objects_by_path(written_by_nemo), _objects_by_path(ours)
    for path in ("<root>", "<root>.model", "<root>.model.config", "<root>.model.tokenizer",
                 "<root>.trainer", "<root>.trainer.strategy"):
        assert _fn_or_cls(ours, ours_by_path[path]) == \
            _fn_or_cls(written_by_nemo, theirs_by_path[path]), path
    assert ours["version"] == written_by_nemo["version"]
    assert ours["objects"][ours["root"]["key"]] is ours_by_path["<root>"]
    theirs_config = llama_config_from_io_json(FIXTURE / "context" / "io.json")
    (tmp_path / "io.json").write_text(json.dumps(ours))
    ours_config = llama_config_from_io_json(tmp_path / "io.json")
    shared = set(theirs_config) & set(ours_config) - {"_target_"}
    assert {"num_layers", "hidden_size", "num_query_groups", "kv_channels", "rotary_base",
            "seq_length", "vocab_size", "make_vocab_size_divisible_by"} <= shared
    for key in shared:
        assert ours_config[key] == theirs_config[key], key
    assert ours["refcounts"].keys() == ours["objects"].keys()


def test_llama31_config_class_carries_all_four_rope_scaling_values(tmp_path):
    model = tiny_model_config(rope_scaling={"factor": 16.0, "low_freq_factor": 2.0,
                                            "high_freq_factor": 6.0,
                                            "original_max_position_embeddings": 128})
    from_yaml = model_config_from_nemo2(nemo2_model_yaml(model)["config"], "model.yaml")
    (tmp_path / "io.json").write_text(json.dumps(nemo2_io_json(model)))
    from_io_json = model_config_from_nemo2(llama_config_from_io_json(tmp_path / "io.json"), "io")
    for parsed in (from_yaml, from_io_json):
        assert parsed.rope_scaling == RopeScalingConfig(
            factor=16.0, low_freq_factor=2.0, high_freq_factor=6.0,
            original_max_position_embeddings=128)
        assert (parsed.num_layers, parsed.num_query_groups, parsed.vocab_size,
                parsed.rope_theta) == (model.num_layers, model.num_query_groups,
                                       model.vocab_size, model.rope_theta)


def test_nemo_size_class_without_scaling_fields_gets_llama31_defaults():
    config = dict(nemo2_model_yaml(tiny_model_config())["config"],
                  _target_="nemo.collections.llm.gpt.model.llama.Llama31Config8B")
    assert model_config_from_nemo2(config, "model.yaml").rope_scaling == RopeScalingConfig()


def test_shared_embeddings_read_as_a_tied_model_and_write_back():
    config = dict(nemo2_model_yaml(tiny_model_config())["config"],
                  share_embeddings_and_output_weights=True)
    tied = model_config_from_nemo2(config, "model.yaml")
    assert tied.tie_word_embeddings is True
    assert nemo2_model_yaml(tied)["config"]["share_embeddings_and_output_weights"] is True
    untied = model_config_from_nemo2(nemo2_model_yaml(tiny_model_config())["config"], "m.yaml")
    assert untied.tie_word_embeddings is False


@pytest.mark.parametrize("key,value", [
    ("normalization", "LayerNorm"),
    ("add_bias_linear", True), ("kv_channels", 7), ("position_embedding_type", "learned_absolute"),
    ("activation_func", {"_call_": False, "_target_": "torch._C._nn.gelu"}),
])
def test_what_the_llama_builder_cannot_express_is_refused_by_name(key, value):
    config = dict(nemo2_model_yaml(tiny_model_config())["config"], **{key: value})
    with pytest.raises(ConfigError, match=f"model.yaml: {key}="):
        model_config_from_nemo2(config, "model.yaml")


def test_nemo1_model_config_maps_its_own_key_names():
    config = {"mcore_gpt": True, "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 176,
              "num_attention_heads": 4, "num_query_groups": 2, "encoder_seq_length": 512,
              "max_position_embeddings": 1024, "normalization": "rmsnorm",
              "activation": "fast-swiglu", "bias": False, "position_embedding_type": "rope",
              "rotary_percentage": 1.0, "rotary_base": 500000, "layernorm_epsilon": 1e-5,
              "scale_positional_embedding": True, "scale_factor": 32, "old_context_len": 4096}
    parsed = model_config_from_nemo1(config, "model_config.yaml", fallback_vocab_size=1001)
    assert parsed.max_position_embeddings == 1024 and parsed.vocab_size == 1001
    assert parsed.rope_scaling == RopeScalingConfig(
        factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=4096)
    with pytest.raises(ConfigError, match="mcore_gpt"):
        model_config_from_nemo1(dict(config, mcore_gpt=False), "model_config.yaml")
