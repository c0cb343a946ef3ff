"""The TPO loop on a tiny random policy: what it stores, trains on, and how it resumes."""

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_tpo.parallel.local_launch import spawn_local
from tpo_fixtures import ITERATIONS, TRAIN_STEPS, final_weights, run_cli, run_loop, stage_rows

pytestmark = pytest.mark.slow


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


def check_iteration_zero(root: Path, summary: dict, iterations: int = 1,
                         train_steps: int = 2) -> None:
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
    assert len(summary["heldout_score"]) == iterations + 1
    assert summary["heldout_win_rate_vs_m0"][0] == 0.5
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r["step"] for r in records if r["kind"] == "train_step" and r["iteration"] == 0]
    assert steps == list(range(train_steps))
    iteration = next(r for r in records if r["kind"] == "iteration")
    for name in ("rollout", "judge", "reference_logprobs", "train", "weight_sync", "checkpoint"):
        assert iteration[f"timing/{name}"] >= 0
    assert (run_dir / "iterations.png").stat().st_size > 1000
    assert json.loads((run_dir / "summary.json").read_text()) == summary


def test_one_iteration_at_tp2_pp2(tmp_path):
    check_iteration_zero(tmp_path, run_loop(
        tmp_path, ["parallel=tp2_pp2", "run.pairs_per_step=2", "train.micro_batch_pairs=2"],
        world_size=4))


def train_steps(run_dir: Path) -> dict:
    """(iteration, step) -> the last logged record of that DPO step (a redone step logs twice)."""
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {(r["iteration"], r["step"]): r for r in records if r["kind"] == "train_step"}


def test_the_log_says_what_the_run_is_doing_and_the_expected_warnings_once(uninterrupted):
    log = (uninterrupted / "tpo-run.whole.log").read_text()
    for t in range(ITERATIONS):
        for phase in ("held-out answers", "rollout", "judging", "pairs", "reference", "train",
                      "checkpoint", "weight sync", "parity check"):
            assert f"iteration {t}: {phase} done in" in log, (t, phase)
        assert f"iteration {t}: stored 32 rollouts rows" in log
        assert f"iteration {t} of {ITERATIONS} done; about" in log
    assert "DPO step 2: loss" in log
    assert "Transformer Engine and Apex are not installed" not in log
    assert log.count("Transformer Engine is not installed") == 1


def test_iteration_zero_at_tp1_trains_on_the_sampled_tokens_against_m0(uninterrupted):
    summary = json.loads((uninterrupted / "run" / "summary.json").read_text())
    check_iteration_zero(uninterrupted, summary, ITERATIONS, TRAIN_STEPS)


def test_every_iteration_restarts_the_lr_schedule_and_scores_against_m0(uninterrupted):
    from megatron_tpo.evaluation.heldout import lc_win_rate_vs_first

    run_dir = uninterrupted / "run"
    steps = train_steps(run_dir)
    assert sorted(steps) == [(t, s) for t in range(ITERATIONS) for s in range(TRAIN_STEPS)]
    # One warm-up step to train.lr, then cosine decay to train.min_lr at the last step:
    # each iteration is a DPO run of its own.
    expected = [1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * s / (TRAIN_STEPS - 1)))
                for s in range(TRAIN_STEPS)]
    for t in range(ITERATIONS):
        assert [steps[t, s]["lr"] for s in range(TRAIN_STEPS)] == pytest.approx(expected)
    # Held-out answers of every M_t are judged against M_0's, not against M_{t-1}'s.
    first = {row["prompt_id"]: row["score"] for row in stage_rows(run_dir, 0, "heldout")}
    summary = json.loads((run_dir / "summary.json").read_text())
    for t in range(ITERATIONS + 1):
        rows = stage_rows(run_dir, t, "heldout")
        assert {row["prompt_id"]: row["first_score"] for row in rows} == first
        outcomes = [1.0 if r["score"] > r["first_score"] else 0.5 if r["score"] == r["first_score"]
                    else 0.0 for r in rows]
        assert [r["win_against_first"] for r in rows] == outcomes
        assert summary["heldout_win_rate_vs_m0"][t] == pytest.approx(sum(outcomes) / len(rows))
        # And its length-controlled rate, from the same outcomes and M_0's rows.
        assert summary["heldout_lc_win_rate_vs_m0"][t] == pytest.approx(
            lc_win_rate_vs_first(rows, stage_rows(run_dir, 0, "heldout")))
    # Were M_1's scores M_0's, a comparison with M_{t-1} or with itself would pass too.
    assert [row["score"] for row in stage_rows(run_dir, 1, "heldout")] != list(first.values()), \
        "the fixture is built so that DPO moves M_1's held-out scores"


# Each chain kills (-9) or signals (USR1: Slurm's warning, so a checkpoint is saved and the
# run stops with exit 0) one run after another in the same run directory, then lets the
# last run finish. Together they cut at every boundary of the loop: a stored stage (in
# iteration 0, and in iteration 1 after a resume), a DPO step before any checkpoint, a
# DPO step whose preemption saves a mid-iteration checkpoint (the run resumed from it
# starts iteration 0 at step 1 and iteration 1 at step 0 again), an end-of-iteration
# checkpoint before and after the weight sync (the resumed engine must sample and answer
# from M_t, not M_0).
CHAINS = {
    "stages_then_checkpoint": [("0:rollouts", -9), ("0:checkpoint", -9), ("1:judgments", -9)],
    "train_then_preempted_then_sync": [("0:train:1", -9), ("0:train:0@USR1", 0),
                                       ("1:weight_sync", -9)],
}


@pytest.mark.parametrize("chain", CHAINS)
def test_a_run_cut_at_every_boundary_resumes_to_the_uninterrupted_run(tmp_path, uninterrupted,
                                                                        chain):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for crash_at, expect in CHAINS[chain]:
        run_cli(resumed, crash_at=crash_at, expect=expect)
    run_cli(resumed)
    for t in range(ITERATIONS):
        for stage in ("rollouts", "judgments", "pairs", "reference", "heldout"):
            assert (stage_rows(resumed / "run", t, stage)
                    == stage_rows(uninterrupted / "run", t, stage)), (t, stage)
    assert (stage_rows(resumed / "run", ITERATIONS, "heldout")
            == stage_rows(uninterrupted / "run", ITERATIONS, "heldout"))
    # Every DPO step ran exactly as uninterrupted: same lr, same loss, same gradient.
    ours, theirs = train_steps(resumed / "run"), train_steps(uninterrupted / "run")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        for metric in ("lr", "loss", "grad_norm"):
            assert ours[key][metric] == theirs[key][metric], (key, metric)
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
                            config=SimpleNamespace(run=SimpleNamespace(
                                seed=0, rank_zero_timeout_seconds=60)),
                            metrics=SimpleNamespace(log=lambda *args, **kwargs: None))
    if rank == 1:
        time.sleep(3)   # rank 0 computes and writes the stage before this rank looks
    rows = stage(parts, 0, "pairs", lambda: ([{"prompt_id": 7}], {"pairs": 1}), on="rank0")
    # The next stage's first collective: every rank must reach it from the same place.
    total = torch.tensor([rank + 1])
    torch.distributed.all_reduce(total)
    return rows, int(total)  # spawn_local tears the process group down


def test_a_rank_that_looks_late_does_not_skip_a_stage_its_peers_are_finishing(tmp_path):
    # Rank 0 writes a rank-0 stage and waits in its closing broadcast; a rank that only then
    # looks at the store must not take the stage for done and run ahead into the next
    # collective (which pairs its all-reduce with rank 0's broadcast).
    for rows, total in spawn_local(_stage_worker, 2, str(tmp_path / "stages")):
        assert rows == [{"prompt_id": 7}] and total == 3
