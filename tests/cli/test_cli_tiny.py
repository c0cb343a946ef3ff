"""cli/tiny.py: ``tpo-tiny``'s overrides split between the tiny task (``tiny.*``, set on
its TinyTaskConfig, typed like the value they replace) and the two runs, which are one
setting apart; a bad setting is refused before any asset is built (minutes)."""

import dataclasses
from pathlib import Path

import pytest

from megatron_tpo.cli.tiny import apply_tiny_overrides, main, run_configs, split_overrides, \
    task_config
from megatron_tpo.config import ConfigError
from megatron_tpo.tiny.assets import TinyAssets, TinyTaskConfig


def test_tiny_overrides_are_split_from_the_runs_keeping_their_order():
    overrides = ["tiny.seed=2", "run.iterations=1", "tiny.sft.lr=0.1", "parallel=tp2_pp2"]
    assert split_overrides(overrides) == (["tiny.seed=2", "tiny.sft.lr=0.1"],
                                          ["run.iterations=1", "parallel=tp2_pp2"])


def test_an_override_takes_the_type_of_the_value_it_replaces():
    config = apply_tiny_overrides(TinyTaskConfig(), [
        "tiny.num_terms=3", "tiny.sft.lr=0.5", "tiny.sft.warmup_steps=4", "tiny.model=other",
        "tiny.thought_mix.columns=2"])
    assert (config.num_terms, config.sft.lr, config.sft.warmup_steps, config.model) == \
        (3, 0.5, 4, "other")
    assert type(config.num_terms) is int and type(config.sft.lr) is float
    assert config.thought_mix["columns"] == 2.0 and type(config.thought_mix["columns"]) is float
    assert config.thought_mix["restate"] == TinyTaskConfig().thought_mix["restate"]


@pytest.mark.parametrize("override, message", [
    ("tiny.sft.steps", "tiny.sft.steps: a tiny override is tiny.<key>=<value>"),
    ("tiny.sfx.steps=3", "tiny.sfx.steps: no such setting"),
    ("tiny.sft.stepz=3", "tiny.sft.stepz: no such setting"),
    ("tiny.thought_mix=3", "tiny.thought_mix: no such setting"),   # a table, not a value
    ("tiny.num_terms=2.5", "tiny.num_terms=2.5: must be a int"),
    ("tiny.sft.lr=fast", "tiny.sft.lr=fast: must be a float"),
])
def test_a_bad_tiny_override_is_refused_naming_it(override, message):
    with pytest.raises(ConfigError) as refused:
        apply_tiny_overrides(TinyTaskConfig(), [override])
    assert str(refused.value) == message


def test_the_task_has_as_many_instructions_as_the_run_takes():
    task = task_config(5, ["run.iterations=2", "prompts.prompts_per_iteration=6",
                           "evaluation.num_prompts=7"], ["tiny.sft.steps=9"])
    assert (task.seed, task.train_size, task.heldout_size, task.sft.steps) == (5, 12, 7, 9)


def test_the_two_runs_are_one_setting_apart_from_the_same_m0(tmp_path):
    assets = TinyAssets(root=tmp_path / "assets", tokenizer=tmp_path / "assets" / "tokenizer",
                        policy=tmp_path / "assets" / "policy",
                        train_prompts=tmp_path / "train.jsonl",
                        heldout_prompts=tmp_path / "heldout.jsonl",
                        answers=tmp_path / "answers.jsonl", manifest={"vocab_size": 300})
    runs = run_configs(tmp_path, 4, assets, ["run.iterations=1"])
    assert sorted(runs) == ["baseline", "tpo"]
    tpo, baseline = runs["tpo"], runs["baseline"]
    assert (tpo.thought.name, baseline.thought.name) == ("generic", "direct")
    assert (Path(tpo.run.dir), Path(baseline.run.dir)) == (tmp_path / "tpo", tmp_path / "baseline")
    for config in (tpo, baseline):
        assert (config.run.policy, config.run.seed, config.run.iterations,
                config.model.vocab_size) == (str(assets.policy), 4, 1, 300)
        assert config.judge.exact_answer.answers_path == str(assets.answers)
    assert dataclasses.replace(baseline, thought=tpo.thought,
                               run=dataclasses.replace(baseline.run, dir=tpo.run.dir)) == tpo


@pytest.mark.parametrize("override, message", [
    ("tiny.thought_mix.mystery=1", "tiny.thought_mix.mystery=1.0: no such thought kind"),
    ("tiny.num_terms=9", "tiny.num_terms=9: must be in [2, 6]"),
])
def test_a_bad_setting_exits_2_before_any_asset_is_built(tmp_path, capsys, override, message):
    assert main(["--root", str(tmp_path / "runs"), override]) == 2
    captured = capsys.readouterr()
    assert f"tpo-tiny: error: {message}" in captured.err and captured.out == ""
    assert not (tmp_path / "runs").exists()
