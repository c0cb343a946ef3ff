"""The TPO loop on a tiny random policy: what it stores, trains on, and how it resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tpo_fixtures import tiny_run_overrides  # noqa: E402

from megatron_tpo.cli.run import compose_config, run_rank  # noqa: E402
from megatron_tpo.parallel.local_launch import spawn_local  # noqa: E402
from megatron_tpo.parallel.preemption import CRASH_AT_VARIABLE  # noqa: E402


def stage_rows(run_dir: Path, iteration: int, stage: str):
    path = run_dir / "stages" / f"iteration_{iteration:03d}" / f"{stage}.parquet"
    return pq.read_table(path).to_pylist()


def run_loop(root: Path, extra=(), iterations: int = 1, world_size: int = 1) -> dict:
    config = compose_config(tiny_run_overrides(root, iterations) + list(extra))
    config.validate(world_size)
    return spawn_local(run_rank, world_size, config)[0]


def hf_completion_logprob(policy: Path, prompt, completion) -> float:
    """Sum of log p(completion | prompt) under the HF model: an independent reference."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(policy, dtype=torch.float64).eval()
    tokens = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens).logits[0, :-1], dim=-1)
    targets = tokens[0, 1:]
    picked = logprobs[torch.arange(len(targets)), targets]
    return float(picked[len(prompt) - 1:].sum())


def check_iteration_zero(root: Path, summary: dict) -> None:
    run_dir = root / "run"
    rollouts = {(r["prompt_id"], r["sample_index"]): r for r in stage_rows(run_dir, 0, "rollouts")}
    reference = stage_rows(run_dir, 0, "reference")
    assert reference, "the fixture is built so that iteration 0 has pairs"
    for pair in reference[:3]:
        chosen = rollouts[(pair["prompt_id"], pair["chosen_index"])]
        rejected = rollouts[(pair["prompt_id"], pair["rejected_index"])]
        # DPO trains on the sampled token ids, not on re-tokenized text.
        assert pair["chosen_token_ids"] == chosen["output_token_ids"]
        assert pair["rejected_token_ids"] == rejected["output_token_ids"]
        assert pair["prompt_token_ids"] == chosen["prompt_token_ids"]
        # The reference log-probs are M_0's, as HF computes them on the same tokens.
        for side in ("chosen", "rejected"):
            expected = hf_completion_logprob(root / "policy", pair["prompt_token_ids"],
                                             pair[f"{side}_token_ids"])
            assert abs(pair[f"reference_{side}"] - expected) < 1e-3 * max(1, abs(expected))
    assert len(summary["heldout_score"]) == 2 and summary["heldout_win_rate_vs_m0"][0] == 0.5
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in records if r["kind"] == "train_step"]
    assert [r["step"] for r in steps] == [0, 1]
    iteration = next(r for r in records if r["kind"] == "iteration")
    for name in ("rollout", "judge", "reference_logprobs", "train", "weight_sync", "checkpoint"):
        assert iteration[f"timing/{name}"] >= 0
    assert (run_dir / "iterations.png").stat().st_size > 1000
    assert json.loads((run_dir / "summary.json").read_text()) == summary


def test_one_iteration_at_tp1_trains_on_the_sampled_tokens_against_m0(tmp_path):
    check_iteration_zero(tmp_path, run_loop(tmp_path))


def test_one_iteration_at_tp2_pp2(tmp_path):
    check_iteration_zero(tmp_path, run_loop(
        tmp_path, ["parallel=tp2_pp2", "run.pairs_per_step=2", "train.micro_batch_pairs=2"],
        world_size=4))


def final_weights(run_dir: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    flat = run_dir / "final.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / latest / "dist", flat)
    state = torch.load(flat, weights_only=False)  # written by this test from our own run
    # Model weights and optimizer state alike.
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def run_cli(root: Path, iterations: int, crash_at=None, expect: int = 0) -> None:
    """``tpo-run`` in a child process (``-9``: killed by SIGKILL at ``crash_at``)."""
    env = dict(os.environ)
    env.pop(CRASH_AT_VARIABLE, None)
    if crash_at:
        env[CRASH_AT_VARIABLE] = crash_at
    command = [sys.executable, "-m", "megatron_tpo.cli.run", *tiny_run_overrides(root, iterations)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, done.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One uninterrupted run, the reference every kill point's resumed run must match."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_cli(root, iterations=1)
    return root


@pytest.mark.parametrize("crash_at", ["0:rollouts", "0:judgments", "0:train:0"])
def test_resume_after_kill_gives_the_same_pairs_and_weights(tmp_path, uninterrupted, crash_at):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    run_cli(resumed, iterations=1, crash_at=crash_at, expect=-9)
    run_cli(resumed, iterations=1)
    for stage in ("rollouts", "judgments", "pairs", "reference", "heldout"):
        assert stage_rows(resumed / "run", 0, stage) == stage_rows(uninterrupted / "run", 0, stage)
    before, after = final_weights(uninterrupted / "run"), final_weights(resumed / "run")
    assert before.keys() == after.keys() and before
    for name in before:
        assert torch.equal(before[name], after[name]), name


def _stage_worker(rank, world_size, root):
    import time
    from datetime import timedelta
    from types import SimpleNamespace

    from megatron_tpo.data.storage import IterationStore
    from megatron_tpo.loop import stage

    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=30))
    parts = SimpleNamespace(store=IterationStore(Path(root)), digest="digest",
                            config=SimpleNamespace(run=SimpleNamespace(seed=0)),
                            metrics=SimpleNamespace(log=lambda *args, **kwargs: None))
    if rank == 1:
        time.sleep(3)   # rank 0 computes and writes the stage before this rank looks
    rows = stage(parts, 0, "pairs", lambda: ([{"prompt_id": 7}], {"pairs": 1}), on="rank0")
    # The next stage's first collective: every rank must reach it from the same place.
    total = torch.tensor([rank + 1])
    torch.distributed.all_reduce(total)
    return rows, int(total)  # spawn_local tears the process group down


def test_a_rank_that_looks_late_does_not_skip_a_stage_its_peers_are_finishing(tmp_path):
    # Rank 0 writes a rank-0 stage and waits in its closing barrier; a rank that only then
    # looks at the store must not take the stage for done and run ahead into the next
    # collective (which pairs its all-reduce with rank 0's barrier).
    for rows, total in spawn_local(_stage_worker, 2, str(tmp_path / "stages")):
        assert rows == [{"prompt_id": 7}] and total == 3
