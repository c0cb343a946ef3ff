"""`sbatch slurm/tpo_tiny.sh` on a real (local) Slurm, requeued mid-run: it resumes and
the run directory holds every iteration's stages exactly once."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from local_slurm import slurm_installed

from tpo_fixtures import tiny_run_overrides

REPOSITORY = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not slurm_installed(),
                                 reason="Slurm daemons not installed (.ci/run installs them)")]


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout} s")
        time.sleep(0.5)


def test_requeued_tiny_job_resumes_and_keeps_every_iteration_once(slurm, tmp_path):
    iterations = 2
    overrides = [o for o in tiny_run_overrides(tmp_path, iterations) if not o.startswith("run.dir")]
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", f"--output={output}", f"--chdir={REPOSITORY}",
         f"--export=ALL,VENV={Path(sys.prefix)},EXPERIMENT=,RUN_DIR={run_dir},"
         "MASTER_ADDR=127.0.0.1,GLOO_SOCKET_IFNAME=lo",
         str(REPOSITORY / "slurm" / "tpo_tiny.sh"), "parallel=tp2_pp1", *overrides],
        env=slurm.env, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    # Mid-run: iteration 0's pairs are stored, its training has not finished.
    wait_for(run_dir / "stages" / "iteration_000" / "pairs.manifest.json", timeout=400)
    subprocess.run(["scontrol", "requeue", job_id], env=slurm.env, check=True)
    slurm.start_requeued_job_now(job_id, timeout=120)
    state = slurm.wait_for_job(job_id, timeout=600)
    log = output.read_text() if output.exists() else ""
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log[-4000:]}"
    assert "restart 1" in log, log[-4000:]
    # When rank 0 asks for the requeue the test already made, Slurm's "pending" is no error.
    assert "CalledProcessError" not in log, log[-4000:]
    for t in range(iterations):
        rollouts = pq.read_table(run_dir / "stages" / f"iteration_{t:03d}" / "rollouts.parquet")
        keys = [(r["prompt_id"], r["sample_index"]) for r in rollouts.to_pylist()]
        assert len(keys) == len(set(keys)) == 8 * 4
        manifest = json.loads((run_dir / "stages" / f"iteration_{t:03d}" /
                               "pairs.manifest.json").read_text())
        assert manifest["rows"] == len(pq.read_table(
            run_dir / "stages" / f"iteration_{t:03d}" / "pairs.parquet"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["heldout_score"]) == iterations + 1
    assert [r["iteration"] for r in summary["iterations"]] == list(range(iterations))


def test_tiny_job_with_a_separate_engine_pool_runs_both_steps_to_the_end(slurm, tmp_path):
    """`sbatch slurm/tpo_tiny_separate.sh`: a tpo-engine step (one HF engine) beside a
    two-rank trainer step in one allocation, weights and rollouts over the bridge."""
    overrides = [o for o in tiny_run_overrides(tmp_path, 1) if not o.startswith("run.dir")]
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=3", f"--output={output}", f"--chdir={REPOSITORY}",
         f"--export=ALL,VENV={Path(sys.prefix)},EXPERIMENT=,RUN_DIR={run_dir},"
         "ENGINE_TASKS=1,MASTER_ADDR=127.0.0.1,GLOO_SOCKET_IFNAME=lo",
         str(REPOSITORY / "slurm" / "tpo_tiny_separate.sh"), "parallel=tp2_pp1",
         "rollout.bridge.timeout_seconds=120", *overrides],
        env=slurm.env, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    state = slurm.wait_for_job(job_id, timeout=600)
    log = output.read_text() if output.exists() else ""
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log[-4000:]}"
    assert "engine pool of 1 tasks" in log and "2 trainer tasks" in log, log[-4000:]
    rollouts = pq.read_table(run_dir / "stages" / "iteration_000" / "rollouts.parquet")
    keys = [(r["prompt_id"], r["sample_index"]) for r in rollouts.to_pylist()]
    assert len(keys) == len(set(keys)) == 8 * 4
    config = json.loads((run_dir / "config_digest.json").read_text())["fields"]
    assert config["parallel"]["tensor_model_parallel_size"] == 2
    resolved = (run_dir / "config.yaml").read_text()
    assert "placement: separate" in resolved and "engine_ranks: 1" in resolved
