"""``.ci/run``: on CI a machine where Slurm cannot be installed fails instead of skipping
the real-Slurm test; elsewhere it runs the suite and says the test will be skipped.

The script runs against stand-ins on PATH: ``id`` (root), ``apt-get`` (fails, or
"installs" the Slurm programs) and ``make`` (records which targets ran).
"""

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[2]
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch")
TOOLS = ("dirname", "mktemp", "tail", "rm", "chmod")


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def machine(tmp_path):
    """Run .ci/run on a copy of the repository's script with stand-in programs."""
    repository = tmp_path / "repository"
    (repository / ".ci").mkdir(parents=True)
    shutil.copy(REPOSITORY / ".ci" / "run", repository / ".ci" / "run")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    # Only the tools the script and the stand-ins use are on PATH, so Slurm programs
    # installed on this machine (sbatch in /usr/bin) stay hidden.
    for tool in TOOLS:
        (stubs / tool).symlink_to(shutil.which(tool))
    _stub(stubs, "id", 'echo 0')
    _stub(stubs, "make", f'echo "$@" >> {tmp_path}/make.log; '
                         '[ "$1" = test-vllm ] && exit "${VLLM_STATUS:-0}"; exit "${MAKE_STATUS:-0}"')
    installed = tmp_path / "installed"
    installed.mkdir()

    def run(apt_succeeds: bool, ci: str = None, make_status: int = 0, vllm_status: int = 0):
        # A successful apt-get puts the four programs where the script looks for them.
        install = "".join(f"printf '#!/bin/sh\\n' > {installed}/{name}; "
                          f"chmod +x {installed}/{name}; " for name in SLURM_PROGRAMS)
        failure = "echo 'E: no network'; exit 100"
        _stub(stubs, "apt-get", install + "exit 0" if apt_succeeds else failure)
        environment = {"PATH": str(stubs), "SLURM_SBIN_DIR": str(installed),
                       "MAKE_STATUS": str(make_status), "VLLM_STATUS": str(vllm_status)}
        if ci is not None:
            environment["CI"] = ci
        result = subprocess.run([shutil.which("bash"), str(repository / ".ci" / "run")],
                                env=environment, capture_output=True, text=True, timeout=60)
        log = tmp_path / "make.log"
        made = log.read_text().split("\n")[:-1] if log.exists() else []
        if log.exists():
            log.unlink()
        return result, made

    return run


def test_on_ci_slurm_that_cannot_be_installed_fails_before_the_suite(machine):
    result, made = machine(apt_succeeds=False, ci="true")
    assert result.returncode == 1
    assert "could not be installed" in result.stderr and "E: no network" in result.stderr
    assert made == []


def test_off_ci_slurm_that_cannot_be_installed_runs_the_suite_and_says_it_skips(machine):
    for ci in (None, "false"):
        result, made = machine(apt_succeeds=False, ci=ci)
        assert result.returncode == 0, result.stderr
        assert "the Slurm test will be skipped" in result.stderr
        assert made == ["test", "test-vllm"]


def test_on_ci_installed_slurm_runs_the_suite_and_keeps_its_exit_status(machine):
    result, made = machine(apt_succeeds=True, ci="true")
    assert (result.returncode, made) == (0, ["test", "test-vllm"]), result.stderr
    assert "Slurm" not in result.stderr
    result, made = machine(apt_succeeds=True, ci="true", make_status=2)
    assert (result.returncode, made) == (2, ["test", "test-vllm"])
    result, _ = machine(apt_succeeds=True, ci="true", make_status=5)  # no tests collected
    assert result.returncode == 1 and "collected no tests" in result.stderr


def test_the_real_vllm_tests_run_after_the_suite_and_their_failure_fails_ci(machine):
    result, made = machine(apt_succeeds=True, ci="true", vllm_status=1)
    assert (result.returncode, made) == (1, ["test", "test-vllm"])
    # vllm not importable in its venv: the file skips, pytest collects nothing.
    result, _ = machine(apt_succeeds=True, ci="true", vllm_status=5)
    assert result.returncode == 1 and "the vllm tests collected nothing" in result.stderr
