"""`sbatch slurm/fit_batch.sh` on a real (local) Slurm: four srun tasks form TP2/PP2."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from local_slurm import slurm_installed

REPOSITORY = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not slurm_installed(),
                                 reason="Slurm daemons not installed (.ci/run installs them)")]


def test_sbatch_fit_batch_runs_tp2_pp2_from_slurm_environment(slurm, tmp_path):
    output = tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--output={output}", f"--chdir={REPOSITORY}",
         # The node name need not resolve: rank 0's address and gloo's interface are local.
         f"--export=ALL,VENV={Path(sys.prefix)},STEPS=3,MASTER_ADDR=127.0.0.1,"
         "GLOO_SOCKET_IFNAME=lo",
         str(REPOSITORY / "slurm" / "fit_batch.sh")],
        env=slurm.env, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    state = slurm.wait_for_job(job_id, timeout=300)
    log = output.read_text() if output.exists() else ""
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log[-3000:]}"
    steps = re.findall(r"step (\d)/3  loss ([\d.]+)", log)
    assert [int(step) for step, _ in steps] == [1, 2, 3], log[-3000:]
    losses = [float(loss) for _, loss in steps]
    assert losses[2] < losses[0], losses
