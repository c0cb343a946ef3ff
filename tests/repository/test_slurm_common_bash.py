"""slurm/*.sh on the bash of older clusters. Before bash 4.4, `"${a[@]}"` of an empty
array under `set -u` is an "unbound variable" error (bash-4.4-rc2's CHANGES: "Using
${a[@]} or ${a[*]} with an array without any assigned elements when the nounset option
is enabled no longer throws an unbound variable error"), and `shopt -s compat42` does not
bring that back: bash 4.2 (CentOS/RHEL 7) is needed to see it. common.sh's arrays are
empty where no container or placement is set, so every array expansion in slurm/*.sh takes
the guarded form `${a[@]+"${a[@]}"}` (nothing where `a` has no element).

Without a Slurm: common.sh's launchers run with stand-in srun, scontrol, tpo-run and
tpo-engine that record their arguments, under this machine's bash and, where TPO_OLD_BASH
names one, a bash before 4.4 (bash 4.2 builds from the bash-4.2 tag of GNU bash's git
repository: CFLAGS="-std=gnu89 -w" ./configure --without-bash-malloc && make, gcc 12)."""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPOSITORY / "slurm").glob("*.sh"))

GUARDED = re.compile(r'\$\{(\w+)\[@\]\+"\$\{\1\[@\]\}"\}')
ARRAY_EXPANSION = re.compile(r"\$\{\w+\[[@*]\]")  # not ${#a[@]}, a count


def test_every_array_expansion_in_the_slurm_scripts_is_guarded_for_bash_before_4_4():
    unguarded = [f"{script.name}:{number}: {line.strip()}"
                 for script in SCRIPTS
                 for number, line in enumerate(script.read_text().splitlines(), 1)
                 if not line.lstrip().startswith("#")
                 and ARRAY_EXPANSION.search(GUARDED.sub("", line))]
    assert unguarded == []


# Each stand-in appends its arguments, one call a line, to $TPO_CALLS/<its name>.
RECORDER = """#!/bin/sh
printf '%s\\n' "$*" >> "$TPO_CALLS/$(basename "$0")"
"""
SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] || exit 64
printf '%s\\n' $TPO_NODES
"""

SHELLS = ["bash"] + ([os.environ["TPO_OLD_BASH"]] if os.environ.get("TPO_OLD_BASH") else [])


def run_launcher(shell, tmp_path, launcher, *arguments, **environment):
    bin_dir, calls, venv = tmp_path / "bin", tmp_path / "calls", tmp_path / "venv"
    for folder in (bin_dir, calls, venv / "bin"):
        folder.mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    for name in ("srun", "tpo-run", "tpo-engine", "apptainer", "scontrol"):
        (bin_dir / name).write_text(SCONTROL if name == "scontrol" else RECORDER)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TPO_CALLS": str(calls), "VENV": str(venv),
           "SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]",
           "TPO_NODES": "n1 n2", **environment}
    # As the sbatch scripts run it: set -euo pipefail, then common.sh's function.
    done = subprocess.run(
        [shell, "-c", 'set -euo pipefail; source slurm/common.sh; "$@"', "sbatch-script",
         launcher, *arguments],
        cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The pool's step runs in the background: the order of srun's lines is not fixed.
    return {path.name: sorted(path.read_text().splitlines()) for path in calls.iterdir()}


@pytest.fixture(params=SHELLS)
def shell(request):
    version = subprocess.run([request.param, "-c", "echo $BASH_VERSION"], capture_output=True,
                             text=True, check=True).stdout.strip()
    if request.param != "bash":
        assert tuple(map(int, version.split(".")[:2])) < (4, 4), \
            f"TPO_OLD_BASH is bash {version}: the error is gone from 4.4 on"
    return request.param


@pytest.mark.slow
def test_a_plain_launch_with_a_venv_has_no_container_and_no_placement(shell, tmp_path):
    calls = run_launcher(shell, tmp_path, "tpo_launch", "a=1")
    assert calls == {"tpo-run": ["--dry-run a=1"],
                     "srun": ["--kill-on-bad-exit=1 tpo-run a=1"]}


@pytest.mark.slow
def test_a_pyxis_launch_has_a_container_and_no_placement(shell, tmp_path):
    calls = run_launcher(shell, tmp_path, "tpo_launch", "a=1", CONTAINER="img")
    pyxis = (f"--container-image=img --container-workdir={REPOSITORY} "
             f"--container-mounts={REPOSITORY}:{REPOSITORY}")
    assert calls == {"srun": [f"--kill-on-bad-exit=1 {pyxis} tpo-run a=1",
                              f"--overlap --nodes=1 --ntasks=1 {pyxis} env SLURM_PROCID=0 "
                              "SLURM_NTASKS=4 tpo-run --dry-run a=1"]}


@pytest.mark.slow
def test_a_separate_engine_pool_with_a_venv_places_both_steps(shell, tmp_path):
    calls = run_launcher(shell, tmp_path, "tpo_launch_separate", "a=1", ENGINE_TASKS="1",
                         ENGINE_NODES="1")
    settings = ("a=1 rollout.placement=separate rollout.bridge.address=n1 "
                "rollout.bridge.port=20008 rollout.bridge.engine_ranks=1")
    assert calls == {
        "tpo-run": [f"--dry-run {settings}"],
        "srun": [f"--kill-on-bad-exit=1 --ntasks=1 --nodes=1 --relative=1 tpo-engine {settings}",
                 f"--kill-on-bad-exit=1 --ntasks=3 --nodes=1 --relative=0 tpo-run {settings}"]}


@pytest.mark.slow
def test_a_judge_pool_with_an_apptainer_image_wraps_both_steps(shell, tmp_path):
    image = tmp_path / "tpo.sif"
    calls = run_launcher(shell, tmp_path, "tpo_launch_judge_pool", "a=1", JUDGE_TASKS="1",
                         APPTAINER_IMAGE=str(image))
    settings = ("a=1 judge.pairwise.placement=separate judge.pairwise.bridge.address=n1 "
                "judge.pairwise.bridge.port=20010 judge.pairwise.bridge.engine_ranks=1")
    wrap = f"apptainer exec --nv --bind {REPOSITORY} --pwd {REPOSITORY} {image}"
    assert calls == {
        "apptainer": [f"exec --bind {REPOSITORY} --pwd {REPOSITORY} {image} env SLURM_PROCID=0 "
                      f"SLURM_NTASKS=3 tpo-run --dry-run {settings}"],
        "srun": [f"--kill-on-bad-exit=1 --ntasks=1 --exact {wrap} tpo-engine --serve judge "
                 f"{settings}",
                 f"--kill-on-bad-exit=1 --ntasks=3 --exact {wrap} tpo-run {settings}"]}


def run_script(shell, tmp_path, script, **environment):
    """A whole sbatch script with a stand-in srun: what each srun step would run."""
    bin_dir, calls, venv = tmp_path / "bin", tmp_path / "calls", tmp_path / "venv"
    for folder in (bin_dir, calls, venv / "bin"):
        folder.mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    (bin_dir / "srun").write_text(RECORDER)
    (bin_dir / "srun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TPO_CALLS": str(calls), "VENV": str(venv),
           "SLURM_SUBMIT_DIR": str(REPOSITORY), "SLURM_JOB_ID": "7", **environment}
    done = subprocess.run([shell, str(REPOSITORY / "slurm" / script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return (calls / "srun").read_text().splitlines()


TRAINER_CHECK = "tpo-fit-batch --model llama3_70b --tp 8 --pp 4 --steps 5 --seq-len 4096 " \
                "--micro-batches 8"


@pytest.mark.slow
@pytest.mark.parametrize("image, wrap", [
    ({}, ""),
    ({"APPTAINER_IMAGE": "/img/tpo.sif"},
     f"apptainer exec --nv --bind {REPOSITORY} --pwd {REPOSITORY} /img/tpo.sif "),
    ({"CONTAINER": "/img/tpo.sqsh"},
     f"--container-image=/img/tpo.sqsh --container-workdir={REPOSITORY} "
     f"--container-mounts={REPOSITORY}:{REPOSITORY} "),
])
def test_the_gpu_trainer_check_runs_in_the_same_environment_as_the_tpo_jobs(shell, tmp_path,
                                                                           image, wrap):
    calls = run_script(shell, tmp_path, "trainer_check_gpu.sh", MODEL="llama3_70b", TP="8",
                       PP="4", **image)
    assert calls == [f"--kill-on-bad-exit=1 {wrap}{TRAINER_CHECK}"]
