"""config/loading.py: a shipped config by name or any YAML path into its dataclass, with
overrides on top; an unknown name lists the known ones, a typo in a key or a wrong type
fails at load time naming the file and the key, and a model is validated as it loads."""

import dataclasses

import pytest
import yaml

from megatron_tpo.config import ConfigError, ModelConfig, RopeScalingConfig
from megatron_tpo.config.loading import CONFIG_DIR, load_model_config, load_parallel_config


def test_a_shipped_model_by_name_holds_its_yaml_file_and_defaults_for_the_rest():
    written = yaml.safe_load((CONFIG_DIR / "model" / "llama3.1_8b.yaml").read_text())
    model = load_model_config("llama3.1_8b")
    assert isinstance(model, ModelConfig)
    assert isinstance(model.rope_scaling, RopeScalingConfig)
    loaded = dataclasses.asdict(model)
    assert {key: loaded[key] for key in written} == written
    for key in set(loaded) - set(written):
        assert loaded[key] == getattr(ModelConfig(), key), key


def test_a_yaml_path_loads_too_and_overrides_go_on_top(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nnum_layers: 6\nhidden_size: 96\nnum_attention_heads: 6\n"
                    "num_query_groups: 3\n")
    model = load_model_config(path, num_layers=2)
    assert (model.name, model.num_layers, model.hidden_size, model.num_attention_heads,
            model.num_query_groups) == ("mine", 2, 96, 6, 3)
    assert load_model_config(str(path)).num_layers == 6
    parallel = load_parallel_config("tp8_pp4", virtual_pipeline_model_parallel_size=2)
    assert (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
            parallel.virtual_pipeline_model_parallel_size) == (8, 4, 2)


def test_an_unknown_name_lists_the_shipped_ones():
    known = sorted(path.stem for path in (CONFIG_DIR / "parallel").glob("*.yaml"))
    assert "tp2_pp2" in known
    with pytest.raises(ConfigError) as refused:
        load_parallel_config("tp3_pp7")
    assert str(refused.value) == f"unknown parallel config 'tp3_pp7'; known: {', '.join(known)}"


def test_a_missing_yaml_path_is_named(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as refused:
        load_model_config(missing)
    assert str(refused.value) == f"model config file not found: {missing}"


@pytest.mark.parametrize("text, key", [
    ("num_layer: 4\n", "num_layer"),          # a typo: no such field
    ("num_layers: many\n", "num_layers"),     # not an int
])
def test_a_bad_key_or_value_fails_at_load_naming_the_file_and_key(tmp_path, text, key):
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_model_config(path)
    assert str(refused.value).startswith(f"{path}: ") and key in str(refused.value)


def test_a_model_is_validated_as_it_loads_a_parallel_layout_is_not():
    """A layout can only be checked against a model and a world size (ParallelConfig.validate
    does that once both are known); a model is checked on its own."""
    with pytest.raises(ConfigError, match="model.hidden_size=64 is not divisible by "
                                          "model.num_attention_heads=3"):
        load_model_config("tiny", num_attention_heads=3)
    assert load_parallel_config("tp2_pp1", tensor_model_parallel_size=3
                                ).tensor_model_parallel_size == 3
