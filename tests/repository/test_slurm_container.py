"""slurm/common.sh in a container: with APPTAINER_IMAGE every task and the batch host's dry
run go through `apptainer exec` (the tasks with --nv), and with CONTAINER every srun step
carries pyxis' --container-image, the dry run being a one-task step. Neither apptainer
nor pyxis is here: a stand-in `apptainer` records its arguments and runs the command, and
a stand-in `srun` records its arguments and drops the --container-* ones before the real
srun. The ranks stop right after start-up (tests/fixtures/start_up_probe).

docker/Dockerfile, which builds such an image, cannot be built here (no Docker, no access
to nvcr.io): its RUN steps are read and, where they can run on this machine, run."""

import json
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from local_slurm import slurm_installed

from tpo_fixtures import tiny_run_overrides

REPOSITORY = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).parents[1] / "fixtures" / "start_up_probe"

needs_slurm = pytest.mark.skipif(not slurm_installed(),
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


@pytest.mark.slow
@needs_slurm
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


@pytest.mark.slow
@needs_slurm
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


DOCKERFILE = REPOSITORY / "docker" / "Dockerfile"


def dockerfile_runs():
    """The Dockerfile's RUN commands as Docker reads them: comment lines dropped, lines
    ending in a backslash joined to the next."""
    lines = [line for line in DOCKERFILE.read_text().splitlines()
             if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", "")
    return [line[len("RUN "):] for line in joined.splitlines() if line.startswith("RUN ")]


def pip_install_requirements(run):
    """What a `pip install` in one RUN step names (`-e .` is megatron-tpo itself)."""
    words = shlex.split(run.split("&&")[0])
    if "pip" not in words or words[words.index("pip") + 1] != "install":
        return set()
    return {"megatron-tpo" if word == "." else word
            for word in words[words.index("pip") + 2:] if not word.startswith("-")}


@pytest.mark.slow
def test_the_first_steps_check_the_bases_python_and_cuda_toolkit_not_its_torch(tmp_path):
    """The recipe replaces the base's torch, so its version is no reason to refuse a base;
    Python 3.12 (the pins') and a CUDA 13 toolkit (TE's compile) are."""
    runs = dockerfile_runs()
    checks = runs[:next(i for i, run in enumerate(runs) if "pip uninstall" in run)]
    assert checks and not [run for run in checks if "torch" in run]
    python_check = [run for run in checks if run.startswith("python ")]
    assert len(python_check) == 1
    wrong_python = subprocess.run(["sh", "-c", python_check[0]], capture_output=True, text=True,
                                  env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert wrong_python.returncode != 0 and "3.12" in wrong_python.stderr
    nvcc_check = [run for run in checks if "nvcc --version" in run]
    assert len(nvcc_check) == 1
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for release, passes in (("13.0, V13.0.88", True), ("13.1, V13.1.80", True),
                            ("12.9, V12.9.86", False), (None, False)):
        nvcc = bin_dir / "nvcc"
        nvcc.unlink(missing_ok=True)
        if release:  # the line of a real `nvcc --version` that names the release
            nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                            f"echo 'Cuda compilation tools, release {release}'\n")
            nvcc.chmod(0o755)
        done = subprocess.run(["sh", "-c", nvcc_check[0]], capture_output=True, text=True,
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
        assert (done.returncode == 0) == passes, (release, done.stderr)


def test_transformer_engine_compiles_against_the_installed_torch_not_a_prebuilt_wheel():
    """transformer-engine-torch's setup.py (TE v2.11, transformer_engine/pytorch/setup.py
    lines 25, 76-108, 111-147) first downloads a wheel from TE's GitHub release, named after
    the torch it finds, or in an NGC container (NVIDIA_PRODUCT_NAME=PyTorch) after
    NVIDIA_PYTORCH_VERSION, NVIDIA's torch; only NVTE_PYTORCH_FORCE_BUILD=TRUE skips that."""
    te = [run for run in dockerfile_runs() if "--dry-run" not in run
          and any(word.startswith("transformer-engine") for word in pip_install_requirements(run))]
    assert len(te) == 1
    words = shlex.split(te[0])
    settings = words[:words.index("pip")]
    assert "NVTE_PYTORCH_FORCE_BUILD=TRUE" in settings and "--no-build-isolation" in words


def fake_environment(root, distributions):
    """A venv without pip whose installed distributions are metadata only:
    {name: (version, [Requires-Dist, ...])}."""
    venv.create(root, with_pip=False)
    site_packages = next(root.glob("lib/python*/site-packages"))
    for name, (version, requires) in distributions.items():
        info = site_packages / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        extras = sorted({r.split('extra == "')[1].rstrip('"') for r in requires if "extra ==" in r})
        (info / "METADATA").write_text("".join(
            [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
            + [f"Provides-Extra: {extra}\n" for extra in extras]
            + [f"Requires-Dist: {requirement}\n" for requirement in requires]))
    return root / "bin" / "python"


# What the recipe installs, at the pins, with (some of) their requirements; and a package
# of the base image that wants NVIDIA's torch, which the recipe replaced.
STACK = {
    "torch": ("2.14.0", ["triton==3.8.0", "nvidia-nccl-cu13==2.30.7"]),
    "triton": ("3.8.0", []),
    "nvidia-nccl-cu13": ("2.30.7", []),
    "vllm": ("0.33.0", ["torch==2.14.0", "transformers<5.21,>=5.16.1", "torchvision==0.29.0",
                        "torchaudio==2.11.0", "flashinfer-python==0.7.2.post1"]),
    "torchvision": ("0.29.0", ["torch==2.14.0"]),
    "torchaudio": ("2.11.0", ["torch==2.14.0"]),
    "flashinfer-python": ("0.7.2.post1", ["torch"]),
    "transformers": ("5.20.2", []),
    "megatron-core": ("0.16.1", ["torch>=2.6.0"]),
    "megatron-tpo": ("0.1.0", ["torch>=2.4", "megatron-core<0.17,>=0.16", "transformers>=4.54",
                               "hydra-core>=1.3"]),
    "hydra-core": ("1.3.2", []),
    "transformer-engine": ("2.11.0", ['transformer-engine-torch==2.11.0; extra == "pytorch"',
                                      'transformer-engine-cu13==2.11.0; extra == "core_cu13"']),
    "transformer-engine-cu13": ("2.11.0", []),
    "transformer-engine-torch": ("2.11.0", ["torch", "transformer-engine-cu13==2.11.0"]),
    "nvidia-base-image-tool": ("26.10", ["torch==2.14.0a0"]),
}
BROKEN = {
    "NVIDIA's torch left in place": {"torch": ("2.14.0a0+git1234567", ["triton==3.8.0"])},
    "TE's extension not installed": {"transformer-engine-torch": None},
    "a requirement of megatron-tpo missing": {"hydra-core": None},
}


@pytest.mark.slow
@pytest.mark.parametrize("broken", [None, *BROKEN])
def test_the_final_check_covers_what_the_recipe_installs_not_the_base_image(tmp_path, broken):
    """The last step's check, run on an environment of metadata only: it passes where the
    base image's own packages conflict with the recipe's torch (`pip check` fails there),
    and fails where anything the recipe installed or needs is missing or off its pin."""
    runs = dockerfile_runs()
    check = shlex.split(runs[-1].split("&&")[0])
    assert check[0] == "pip", check
    distributions = {**STACK, **BROKEN.get(broken, {})}
    python = fake_environment(tmp_path / "env", {name: value for name, value in
                                                 distributions.items() if value})
    # pip's own config here points at local wheel folders; the image's only setting is
    # the Dockerfile's PIP_CONSTRAINT.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), *check[1:]],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": os.devnull,
             "PIP_DISABLE_PIP_VERSION_CHECK": "1",
             "PIP_CONSTRAINT": str(REPOSITORY / "requirements" / "gpu.txt")})
    assert (done.returncode == 0) == (broken is None), done.stdout + done.stderr
    assert pip_install_requirements(runs[-1]) == set().union(
        *map(pip_install_requirements, runs[:-1])), check
