"""A TPO run whose M_0 comes from ``tpo-convert hf-to-dist`` output (``run.initial_checkpoint``)
instead of the per-rank conversion of ``run.policy``."""

from pathlib import Path

import pytest
import torch

from tpo_fixtures import final_weights, stage_rows, tiny_run_overrides

from megatron_tpo.cli.run import compose_config, main, run_rank
from megatron_tpo.model.nemo import hf_to_dist
from megatron_tpo.parallel.local_launch import spawn_local

STAGES = ("rollouts", "judgments", "pairs", "reference")


def overrides(root: Path, run_dir: Path, extra=()):
    """The tiny loop at TP=2 without the held-out evaluation (it adds time, not coverage)."""
    plain = [o for o in tiny_run_overrides(root, iterations=1) if not o.startswith("run.dir=")]
    return plain + [f"run.dir={run_dir}", "parallel=tp2_pp1", "evaluation.num_prompts=0",
                    *extra]


def run_tp2(root: Path, run_dir: Path, extra=()):
    config = compose_config(overrides(root, run_dir, extra))
    config.validate(2)
    return spawn_local(run_rank, 2, config)[0]


@pytest.mark.slow
def test_an_iteration_from_the_dist_checkpoint_equals_the_one_from_the_hf_policy(tmp_path):
    tiny_run_overrides(tmp_path)  # writes the policy and prompt files
    hf_to_dist(tmp_path / "policy", tmp_path / "dist", progress=False)
    from_hf, from_dist = tmp_path / "from_hf", tmp_path / "from_dist"
    run_tp2(tmp_path, from_hf)
    run_tp2(tmp_path, from_dist, [f"run.initial_checkpoint={tmp_path / 'dist'}"])
    assert not (from_dist / "initial_weights").exists()  # nothing converted for the layout
    assert (from_hf / "initial_weights" / "tp2_pp1").is_dir()
    assert stage_rows(from_dist, 0, "reference"), "the fixture is built to have pairs"
    for stage in STAGES:
        assert stage_rows(from_dist, 0, stage) == stage_rows(from_hf, 0, stage), stage
    # Both paths put the same float32 values of the HF file into the same TP=2 slices,
    # and everything after is the same deterministic computation: equal bit for bit.
    before, after = final_weights(from_hf), final_weights(from_dist)
    assert before.keys() == after.keys() and before
    for name in before:
        assert torch.equal(before[name], after[name]), name


def write_dist_of_another_shape(root: Path) -> Path:
    from transformers import LlamaForCausalLM

    from tiny_hf import tiny_llama_config, tiny_tokenizer

    wider = root / "wider_policy"
    LlamaForCausalLM(tiny_llama_config(tiny_tokenizer(), intermediate_size=96)).save_pretrained(
        wider)
    hf_to_dist(wider, root / "wider_dist", progress=False)
    return root / "wider_dist"


def test_a_checkpoint_of_another_shape_or_none_is_refused_naming_the_key(tmp_path, capsys):
    tiny_run_overrides(tmp_path)
    wider = write_dist_of_another_shape(tmp_path)
    run_dir = tmp_path / "never_created"
    cases = [(wider, [f"run.initial_checkpoint={wider}: {wider}: decoder.layers.mlp."
                      "linear_fc1.weight has shape (2, 192, 32), the config implies (2, 128, 32)"]),
             (tmp_path / "absent", [f"run.initial_checkpoint={tmp_path / 'absent'}: no such "
                                    "directory"])]
    for checkpoint, named in cases:
        assert main(overrides(tmp_path, run_dir, [f"run.initial_checkpoint={checkpoint}"])) == 2
        error = capsys.readouterr().err
        assert "tpo-run: error:" in error and all(text in error for text in named), error
        assert not run_dir.exists()


def test_a_nemo2_directory_is_taken_as_the_initial_checkpoint(tmp_path):
    from megatron_tpo.checkpoint.initial import weights_directory
    from megatron_tpo.model.nemo import hf_to_nemo

    tiny_run_overrides(tmp_path)
    hf_to_nemo(tmp_path / "policy", tmp_path / "nemo", progress=False)
    config = compose_config(overrides(tmp_path, tmp_path / "run",
                                      [f"run.initial_checkpoint={tmp_path / 'nemo'}"]))
    config.validate(2)  # its weights/ (keys prefixed module.) has the model's shapes
    assert weights_directory(str(tmp_path / "nemo")) == tmp_path / "nemo" / "weights"
    assert weights_directory(str(tmp_path / "dist")) == tmp_path / "dist"
