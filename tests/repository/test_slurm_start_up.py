"""Every task of `sbatch slurm/tpo_tiny.sh` (tpo_launch, srun, tpo-run) starts with the
variables vLLM's external_launcher and megatron-core read: RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT, CUDA_DEVICE_MAX_CONNECTIONS=1; and srun is given the job's
--cpus-per-task (SRUN_CPUS_PER_TASK), which Slurm >= 22.05 no longer passes on. The ranks
stop right after start-up (tests/fixtures/start_up_probe), so the job takes seconds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from local_slurm import slurm_installed

from tpo_fixtures import tiny_run_overrides

REPOSITORY = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).parents[1] / "fixtures" / "start_up_probe"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not slurm_installed(),
                                 reason="Slurm daemons not installed (.ci/run installs them)")]


def test_each_tpo_run_task_sees_the_launch_variables_vllm_reads(slurm, tmp_path):
    overrides = [o for o in tiny_run_overrides(tmp_path, 1) if not o.startswith("run.dir")]
    record, output = tmp_path / "record", tmp_path / "job.out"
    record.mkdir()
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=2", f"--output={output}",
         f"--chdir={REPOSITORY}",
         # MASTER_ADDR: the node's name need not resolve here; the port is left to tpo-run.
         f"--export=ALL,VENV={Path(sys.prefix)},EXPERIMENT=,RUN_DIR={tmp_path / 'run'},"
         f"MASTER_ADDR=127.0.0.1,GLOO_SOCKET_IFNAME=lo,PYTHONPATH={PROBE},"
         f"TPO_START_UP_RECORD={record}",
         str(REPOSITORY / "slurm" / "tpo_tiny.sh"), "parallel=tp2_pp1", *overrides],
        env={name: value for name, value in slurm.env.items()
             if name not in ("CUDA_DEVICE_MAX_CONNECTIONS", "SRUN_CPUS_PER_TASK")},
        capture_output=True, text=True, check=True)
    job_id = int(submitted.stdout.strip().split(";")[0])
    state = slurm.wait_for_job(str(job_id), timeout=300)
    log = output.read_text() if output.exists() else ""
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log[-4000:]}"
    seen = {int(path.stem): json.loads(path.read_text()) for path in record.glob("*.json")}
    port = str(20000 + job_id % 20000)
    assert seen == {rank: {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": port, "CUDA_DEVICE_MAX_CONNECTIONS": "1",
                           "SRUN_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "2"}
                    for rank in (0, 1)}, log[-4000:]
