"""``tpo-eval`` from the command line: M_1 of a run directory (a megatron dist checkpoint,
converted once), its run's thought prompt kept, a rule judge, the JSON summary; and the
errors that stop it with exit code 2 before any work."""

import json
import sys
from pathlib import Path

import pytest

from megatron_tpo.cli.eval import main

from tpo_fixtures import tiny_run_overrides, write_instructions, write_policy

RULE_JUDGE = ["judge=format", "judge.format.max_chars=24", "rollout.sampling.max_new_tokens=8"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tpo-run directory as the loop leaves it after one iteration: its resolved config
    (thought=direct, not tpo.yaml's generic) and M_1's training checkpoint."""
    from megatron_tpo.checkpoint.manifest import file_records, write_manifest
    from megatron_tpo.cli.run import compose_config
    from megatron_tpo.model.nemo import hf_to_dist
    from megatron_tpo.tpo_config import write_resolved_config

    root = tmp_path_factory.mktemp("run")
    overrides = tiny_run_overrides(root, iterations=1)
    write_resolved_config(compose_config(overrides), root / "run", world_size=1)
    write_policy(root / "trained", seed=7)
    step = root / "run" / "checkpoints" / "step_00000002"
    hf_to_dist(root / "trained", step / "dist", progress=False)
    (step / "state.json").write_text(json.dumps(
        {"step": 2, "loop_state": {"iteration": 1, "step_in_iteration": 0}}))
    write_manifest(step, 2, file_records(step))
    write_instructions(root / "mine.jsonl", 6, seed=4)
    return root


@pytest.mark.slow
def test_m1_of_a_run_is_converted_answered_judged_and_summarised(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["--run", str(run_dir / "run"), "--iteration", "1", "--sets",
                 f"mine={run_dir / 'mine.jsonl'}", "--out", str(out), "--chunk-size", "4",
                 "--bootstrap-rounds", "5", "--json", "--quiet", *RULE_JUDGE])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("win_rate", "standard_error", "length_controlled_winrate", "n"):
        assert key in summary
    assert summary["n"] == 6 and summary["model"] == "M_1" and summary["reference"] == "M_0"
    assert set(summary["sets"]) == {"mine"}
    # M_1's weights are the trained checkpoint's, converted into an HF directory once.
    import torch
    from safetensors.torch import load_file

    converted = load_file(out / "models" / "M_1" / "model.safetensors")
    trained = load_file(run_dir / "trained" / "model.safetensors")
    assert converted.keys() == trained.keys()
    assert all(torch.equal(converted[k], trained[k]) for k in trained)
    # The run's own thought prompt (direct), not tpo.yaml's default (generic).
    settings = json.loads((out / "answers" / "M_1" / "mine" / "settings.json").read_text())
    assert settings["template"]["name"] == "direct"
    exported = json.loads((out / "exports" / "mine" / "M_1" / "model_outputs.json").read_text())
    assert len(exported) == 6 and all(e["generator"] == "M_1" for e in exported)


def _error(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_a_set_file_that_does_not_parse_is_named_with_its_line(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"instruction": oops}\n')
    code, err = _error(capsys, ["--model", str(run_dir / "policy"), "--reference", "set",
                                "--sets", f"bad={bad}", "--out", str(tmp_path / "o"), *RULE_JUDGE])
    assert code == 2 and f"{bad}:2: not valid JSON" in err


def test_a_checkpoint_that_does_not_match_its_config_is_refused(run_dir, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from tiny_hf import tiny_llama_config, tiny_tokenizer

    wider = tmp_path / "wider"
    tokenizer = tiny_tokenizer()
    LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=64, intermediate_size=128)
                     ).save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    dist = run_dir / "run" / "checkpoints" / "step_00000002" / "dist"
    code, err = _error(capsys, ["--model", str(dist), "--reference", str(run_dir / "policy"),
                                "--sets", f"mine={run_dir / 'mine.jsonl'}", "--out",
                                str(tmp_path / "o"), "--quiet", f"run.policy={wider}", *RULE_JUDGE])
    assert code == 2
    assert "does not match its config" in err and "the config implies" in err


def test_a_missing_iteration_names_the_kept_ones(run_dir, tmp_path, capsys):
    code, err = _error(capsys, ["--run", str(run_dir / "run"), "--iteration", "3",
                                "--out", str(tmp_path / "o"), *RULE_JUDGE])
    assert code == 2 and "no complete checkpoint of M_3" in err and "kept: M_1" in err


def test_a_pairwise_judge_needs_a_model_of_its_own(run_dir, tmp_path, capsys):
    code, err = _error(capsys, ["--run", str(run_dir / "run"), "--iteration", "1",
                                "--out", str(tmp_path / "o"), "judge=pairwise"])
    assert code == 2 and "judge.pairwise.model" in err


@pytest.mark.slow
def test_a_judge_model_on_a_pool_of_its_own_judges_the_answers(run_dir, tmp_path):
    """The cluster layout in miniature: a tpo-engine --serve judge pool (HF engines, gloo)
    and tpo-eval as its client, each its own process, given the same judge settings."""
    import os
    import subprocess

    from engine_processes import start_engine_world, stop_engine_world
    from judge_fixtures import write_verdict_judge
    from megatron_tpo.parallel.launch import free_local_port

    judge_dir = write_verdict_judge(tmp_path / "judge")
    judge = tiny_run_overrides(run_dir, 1) + [
        "judge=pairwise", f"judge.pairwise.model={judge_dir}",
        "judge.pairwise.sampling.max_new_tokens=1", "judge.pairwise.placement=separate",
        f"judge.pairwise.bridge.port={free_local_port()}", "judge.pairwise.bridge.engine_ranks=1",
        "judge.pairwise.bridge.timeout_seconds=120"]
    pool = start_engine_world(["--serve", "judge", *judge], 1, tmp_path, "judge")
    try:
        evaluation = subprocess.run(
            [sys.executable, "-m", "megatron_tpo.cli.eval", "--run", str(run_dir / "run"),
             "--iteration", "1", "--sets", f"mine={run_dir / 'mine.jsonl'}", "--out",
             str(tmp_path / "eval"), "--bootstrap-rounds", "5", "--json", "--quiet",
             "rollout.sampling.max_new_tokens=8", *judge],
            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
            timeout=600)
    finally:
        exit_codes, logs = stop_engine_world(pool, tmp_path, "judge")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert exit_codes == [0], logs     # tpo-eval stopped the pool on its way out
    summary = json.loads(evaluation.stdout)
    metrics = summary["sets"]["mine"]
    assert summary["annotator"] == "pairwise:judge"
    rows = json.loads(Path(summary["files"]["mine"]["annotations"]).read_text())
    judged = [row for row in rows if row["raw_completion"]]
    assert judged and all(len(row["raw_completion"]) == 2 for row in judged)
    assert metrics["judge"]["verdicts_written"] == 2 * len(judged)
    assert metrics["judge"]["verdicts_unreadable"] < metrics["judge"]["verdicts_written"]
