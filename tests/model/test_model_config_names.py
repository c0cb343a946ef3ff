"""The one table of ModelConfig field names in HF, NeMo and megatron-core terms."""

import dataclasses

import pytest

from megatron_tpo.config import CONFIG_DIR, ModelConfig, load_model_config
from megatron_tpo.model.config_names import CONVENTIONS, FIELD_NAMES, foreign_names
from megatron_tpo.model.hf_config import hf_config_from_model, model_config_from_hf
from megatron_tpo.model.nemo_config import model_config_from_nemo2, nemo2_model_yaml

SHIPPED_MODELS = sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))
# Beside the shipped models: tiny with every field away from what a reader assumes when a
# key is missing, so a row that is dropped or misnamed cannot round-trip by luck.
EVERY_FIELD_SET = dict(
    num_query_groups=1, max_position_embeddings=300, rope_theta=123456.0,
    rope_scaling={"factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 6.0,
                  "original_max_position_embeddings": 128},
    norm_epsilon=1e-6, init_method_std=0.01, tie_word_embeddings=True)
MODELS = [(name, {}) for name in SHIPPED_MODELS] + [("tiny", EVERY_FIELD_SET)]
MODEL_IDS = SHIPPED_MODELS + ["tiny-every-field-set"]


def test_every_model_config_field_has_one_row_in_field_order():
    assert [row.field for row in FIELD_NAMES] == \
        [field.name for field in dataclasses.fields(ModelConfig)]


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_no_two_fields_share_a_foreign_name(convention):
    names = list(foreign_names(convention).values())
    assert len(names) == len(set(names)), names


def test_shipped_model_configs_are_found():
    assert {"tiny", "llama3_8b", "llama3.1_8b", "llama3.2_1b"} <= set(SHIPPED_MODELS)


@pytest.mark.parametrize("name,overrides", MODELS, ids=MODEL_IDS)
def test_model_config_round_trips_through_hf_config_json(name, overrides):
    model = load_model_config(name, **overrides)
    back = model_config_from_hf(hf_config_from_model(model).to_dict(), name=model.name)
    # config.json has no vocabulary padding (megatron's own setting): it reads as the default.
    assert back.make_vocab_size_divisible_by == ModelConfig.make_vocab_size_divisible_by
    assert dataclasses.replace(
        back, make_vocab_size_divisible_by=model.make_vocab_size_divisible_by) == model


@pytest.mark.parametrize("name,overrides", MODELS, ids=MODEL_IDS)
def test_model_config_round_trips_through_nemo2_fields(name, overrides):
    model = load_model_config(name, **overrides)
    config = nemo2_model_yaml(model)["config"]
    back = model_config_from_nemo2(config, "model.yaml")
    # NeMo names a model by its config class, not ours.
    assert back.name == config["_target_"].rsplit(".", 1)[-1]
    assert dataclasses.replace(back, name=model.name) == model
