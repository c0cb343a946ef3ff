import json
import time
from pathlib import Path

import pytest

from megatron_tpo.config import ConfigError
from megatron_tpo.tiny.assets import TinyTaskConfig, prepare_tiny_assets
from megatron_tpo.tiny.warm_start import SFTConfig
from tiny_task_fixtures import MODEL_YAML


def quick_config(tmp_path: Path, **changes) -> TinyTaskConfig:
    model = tmp_path / "test_tiny.yaml"
    model.write_text(MODEL_YAML)
    settings = dict(seed=0, sft_size=64, train_size=12, heldout_size=8, model=str(model),
                    sft=SFTConfig(steps=2, batch_size=4, warmup_steps=1))
    settings.update(changes)
    return TinyTaskConfig(**settings)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tiny")
    config = quick_config(tmp_path)
    return tmp_path, config, prepare_tiny_assets(tmp_path / "assets", config)


@pytest.mark.slow
def test_assets_hold_one_policy_the_tokenizer_and_disjoint_prompt_files(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, assets = built
    train = [row["instruction"] for row in read_jsonl(assets.train_prompts)]
    heldout = [row["instruction"] for row in read_jsonl(assets.heldout_prompts)]
    answers = {row["instruction"]: row["answer"] for row in read_jsonl(assets.answers)}
    assert (len(set(train)), len(set(heldout))) == (12, 8) and not set(train) & set(heldout)
    assert set(answers) == set(train) | set(heldout)
    first = train[0]
    assert int(answers[first]) == sum(int(x) for x in first[len("What is "):-1].split(" + "))
    tokenizer = AutoTokenizer.from_pretrained(str(assets.tokenizer))
    model = AutoModelForCausalLM.from_pretrained(str(assets.policy))
    assert model.config.vocab_size == len(tokenizer) == assets.manifest["vocab_size"]
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert AutoTokenizer.from_pretrained(str(assets.policy)).chat_template == tokenizer.chat_template
    # One M_0 for both arms: no second policy directory.
    assert sorted(p.name for p in assets.root.iterdir() if p.name.startswith("policy")) == ["policy"]
    data = assets.manifest["warm_start"]["data"]
    # 64 problems, each once direct and once with a thought; every kind ends correctly.
    assert data["direct"]["examples"] == 64
    assert sum(v["examples"] for k, v in data.items() if k != "direct") == 64
    assert {v["correct_answer_share"] for v in data.values()} == {1.0}


@pytest.mark.slow
def test_a_second_call_with_the_same_config_reuses_the_assets(built):
    tmp_path, config, assets = built
    weights = assets.policy / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = prepare_tiny_assets(tmp_path / "assets", config)
    assert time.perf_counter() - start < 1.0
    assert again == assets and weights.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_changed_config_rebuilds_and_a_foreign_directory_is_refused(built):
    tmp_path, _, assets = built
    changed = quick_config(tmp_path, train_size=10)
    rebuilt = prepare_tiny_assets(tmp_path / "assets", changed)
    assert len(read_jsonl(rebuilt.train_prompts)) == 10
    assert rebuilt.manifest["config"]["train_size"] == 10
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        prepare_tiny_assets(foreign, changed)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_bad_task_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="tiny.num_terms=1"):
        prepare_tiny_assets(tmp_path / "a", quick_config(tmp_path, num_terms=1))
    with pytest.raises(ConfigError, match="tiny.thought_mix.musing=1"):
        quick_config(tmp_path, thought_mix={"musing": 1}).validate()
    with pytest.raises(ConfigError, match="must not all be 0"):
        quick_config(tmp_path, thought_mix={"columns": 0.0}).validate()
    with pytest.raises(ConfigError, match="sft.batch_size=0"):
        quick_config(tmp_path, sft=SFTConfig(batch_size=0)).validate()
