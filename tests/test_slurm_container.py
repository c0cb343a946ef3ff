"""slurm/common.sh in a container: with APPTAINER_IMAGE every task and the batch host's dry
run go through `apptainer exec` (the tasks with --nv), and with CONTAINER every srun step
carries pyxis' --container-image, the dry run being a one-task step. Neither apptainer
nor pyxis is here: a stand-in `apptainer` records its arguments and runs the command, and
a stand-in `srun` records its arguments and drops the --container-* ones before the real
srun. The ranks stop right after start-up (tests/fixtures/start_up_probe)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from local_slurm import slurm, slurm_installed  # noqa: F401 (slurm is a fixture)

sys.path.insert(0, str(Path(__file__).parent))
from tpo_fixtures import tiny_run_overrides  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).parent / "fixtures" / "start_up_probe"

pytestmark = pytest.mark.skipif(not slurm_installed(),
                                reason="Slurm daemons not installed (.ci/run installs them)")

# `apptainer exec [--nv] [--bind B] [--pwd P] IMAGE COMMAND...`, as far as common.sh uses it.
FAKE_APPTAINER = """#!/bin/bash
set -eu
printf '%s\\n' "$*" >> "$TPO_CALLS/apptainer"
[ "$1" = exec ] || { echo "stand-in apptainer: only exec" >&2; exit 64; }
shift
while [ "$#" -gt 0 ]; do
    case "$1" in
        --nv) shift ;;
        --bind|--pwd) [ "$1" = --pwd ] && cd "$2"; shift 2 ;;
        -*) echo "stand-in apptainer: unknown option $1" >&2; exit 64 ;;
        *) break ;;
    esac
done
[ -f "$1" ] || { echo "stand-in apptainer: no image $1" >&2; exit 65; }
shift
exec "$@"
"""

FAKE_SRUN = """#!/bin/bash
set -eu
printf '%s\\n' "$*" >> "$TPO_CALLS/srun"
kept=()
for arg in "$@"; do
    case "$arg" in --container-*) ;; *) kept+=("$arg") ;; esac
done
exec /usr/bin/srun "${kept[@]}"
"""


def submit_tiny_job(slurm, tmp_path, **environment):
    bin_dir, calls, record = tmp_path / "bin", tmp_path / "calls", tmp_path / "record"
    for folder in (bin_dir, calls, record):
        folder.mkdir()
    for name, text in (("apptainer", FAKE_APPTAINER), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    overrides = [o for o in tiny_run_overrides(tmp_path, 1) if not o.startswith("run.dir")]
    exported = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
                "EXPERIMENT": "", "RUN_DIR": str(tmp_path / "run"), "MASTER_ADDR": "127.0.0.1",
                "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(PROBE),
                "TPO_START_UP_RECORD": str(record), "TPO_CALLS": str(calls),
                "VENV": str(tmp_path / "no_venv_here"), **environment}
    output = tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=1", f"--output={output}", f"--chdir={REPOSITORY}",
         "--export=ALL," + ",".join(f"{key}={value}" for key, value in exported.items()),
         str(REPOSITORY / "slurm" / "tpo_tiny.sh"), *overrides],
        env=slurm.env, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    state = slurm.wait_for_job(job_id, timeout=300)
    log = output.read_text() if output.exists() else ""
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log[-4000:]}"
    assert json.loads((record / "0.json").read_text())["RANK"] == "0", log[-4000:]
    return {path.name: path.read_text().splitlines() for path in calls.iterdir()}, log


def test_with_an_apptainer_image_the_dry_run_and_every_task_run_inside_it(slurm, tmp_path):
    image = tmp_path / "tpo.sif"
    image.write_text("not a real image")
    calls, log = submit_tiny_job(slurm, tmp_path, APPTAINER_IMAGE=str(image))
    bind = f"--bind {REPOSITORY} --pwd {REPOSITORY} {image}"
    dry_run, task = calls["apptainer"]
    assert dry_run.startswith(f"exec {bind} env SLURM_PROCID=0 SLURM_NTASKS=1 tpo-run --dry-run")
    assert task.startswith(f"exec --nv {bind} tpo-run run.dir={tmp_path / 'run'} "), task
    assert "--container" not in " ".join(calls["srun"])
    assert "tpo-run: config valid for 1 rank(s)" in log


def test_with_a_pyxis_image_every_step_carries_it_and_the_dry_run_is_a_one_task_step(
        slurm, tmp_path):
    calls, log = submit_tiny_job(slurm, tmp_path, CONTAINER="registry#megatron-tpo:test")
    pyxis = (f"--container-image=registry#megatron-tpo:test --container-workdir={REPOSITORY} "
             f"--container-mounts={REPOSITORY}:{REPOSITORY}")
    dry_run, task = calls["srun"]
    assert dry_run.startswith(f"--overlap --nodes=1 --ntasks=1 {pyxis} env SLURM_PROCID=0 "
                              "SLURM_NTASKS=1 tpo-run --dry-run"), dry_run
    assert task.startswith("--kill-on-bad-exit=1 ") and f" {pyxis} tpo-run " in task, task
    assert "apptainer" not in calls
    assert "tpo-run: config valid for 1 rank(s)" in log
