"""`make setup` gets the CPU build of torch on an ordinary Linux machine, takes a CPU wheel
pip already sees without asking an index it cannot reach, and installs only the pinned
GPU torch on a GPU node.

The Makefile's own torch command (`make -n`) runs against stand-in package indexes made
here: a "PyPI" whose torch 2.13.0 is a CUDA build (it requires an nvidia-* package, as the
real one does) and a "PyTorch CPU index" with torch 2.13.0+cpu. pip runs isolated from
this machine's configuration (PIP_CONFIG_FILE=/dev/null, no PIP_* variables), resolving
with --dry-run --report, so nothing is installed and no network is used.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent  # the Makefile runs $(VENV)/bin/python
UNREACHABLE = "no_such_cpu_index"   # an index pip cannot read; it says so when it asks


def fake_wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A pure-Python wheel that carries only its metadata (enough for pip's resolver)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}"  # a wheel's file name spells - as _
    dist_info = f"{stem}.dist-info"
    path = folder / f"{stem}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {requirement}\n" for requirement in requires)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name.replace('-', '_')}/__init__.py", "")
        wheel.writestr(f"{dist_info}/METADATA", metadata)
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                             "Root-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist_info}/RECORD", "")
    return path


def simple_index(root: Path, wheels) -> str:
    """A PEP 503 index of ``wheels`` under ``root``; its URL."""
    by_name = {}
    for wheel in wheels:
        by_name.setdefault(wheel.name.split("-")[0].replace("_", "-"), []).append(wheel)
    for name, files in by_name.items():
        page = root / "simple" / name
        page.mkdir(parents=True)
        links = "".join(f'<a href="{wheel.as_uri()}">{wheel.name}</a>\n' for wheel in files)
        (page / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    return (root / "simple").as_uri()


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    wheels = root / "wheels"
    pypi = simple_index(root / "pypi", [
        fake_wheel(wheels / "pypi", "torch", "2.13.0", ["nvidia-cuda-runtime-cu12"]),
        fake_wheel(wheels / "pypi", "torch", "2.14.0", ["nvidia-cuda-runtime-cu13"]),
        fake_wheel(wheels / "pypi", "torch", "2.15.0", ["nvidia-cuda-runtime-cu13"]),
        fake_wheel(wheels / "pypi", "nvidia-cuda-runtime-cu12", "12.8.0"),
        fake_wheel(wheels / "pypi", "nvidia-cuda-runtime-cu13", "13.0.0"),
        fake_wheel(wheels / "pypi", "triton", "3.8.0"),
        fake_wheel(wheels / "pypi", "triton", "3.9.0"),
    ])
    cpu = simple_index(root / "cpu", [fake_wheel(wheels / "cpu", "torch", "2.13.0+cpu")])
    local = root / "local_wheels"
    fake_wheel(local, "torch", "2.13.0+cpu")
    return {"pypi": pypi, "cpu": cpu, "local": local}


def torch_command(gpu_node: bool, cpu_index: str) -> str:
    """The Makefile's torch line, as `make setup` would run it."""
    printed = subprocess.run(
        ["make", "-n", "-B", "setup", f"VENV={VENV}", f"GPU_NODE={'yes' if gpu_node else ''}",
         f"TORCH_CPU_INDEX={cpu_index}"], cwd=REPOSITORY, capture_output=True, text=True,
        check=True).stdout
    lines = [line for line in printed.splitlines() if re.search(r"pip install .*\btorch\b", line)]
    assert len(lines) == 1, printed
    return lines[0]


def resolve(command: str, tmp_path: Path, **pip_environment) -> dict:
    """``{name: version}`` pip would install for ``command``, isolated from this machine's
    pip configuration; each `pip install` of it resolves only (--dry-run)."""
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    dry = command.replace("pip install -q", f"pip install -q --dry-run --ignore-installed "
                                            f"--report {shlex.quote(str(report))}")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    environment.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
                       PIP_RETRIES="0", **pip_environment)
    done = subprocess.run(["sh", "-c", dry], cwd=REPOSITORY, env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert UNREACHABLE not in done.stderr, done.stderr  # never asked the unreachable index
    installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in installs}


def test_an_ordinary_linux_machine_gets_the_cpu_build_from_pytorchs_cpu_index(indexes, tmp_path):
    command = torch_command(gpu_node=False, cpu_index=indexes["cpu"])
    assert resolve(command, tmp_path, PIP_INDEX_URL=indexes["pypi"]) == {"torch": "2.13.0+cpu"}
    # What the Makefile installed before: the same version number, PyPI's CUDA build.
    assert resolve(f"{VENV}/bin/python -m pip install -q torch==2.13.0", tmp_path,
                   PIP_INDEX_URL=indexes["pypi"]) == {
        "torch": "2.13.0", "nvidia-cuda-runtime-cu12": "12.8.0"}


def test_a_cpu_wheel_pip_already_sees_is_taken_without_asking_the_cpu_index(indexes, tmp_path):
    command = torch_command(gpu_node=False, cpu_index=(tmp_path / UNREACHABLE).as_uri())
    assert resolve(command, tmp_path, PIP_INDEX_URL=indexes["pypi"],
                   PIP_FIND_LINKS=str(indexes["local"])) == {"torch": "2.13.0+cpu"}


def test_a_gpu_node_gets_only_the_pinned_torch_and_triton(indexes, tmp_path):
    command = torch_command(gpu_node=True, cpu_index=indexes["cpu"])
    assert "-c requirements/gpu.txt" in command
    assert resolve(command, tmp_path, PIP_INDEX_URL=indexes["pypi"]) == {
        "torch": "2.14.0", "triton": "3.8.0", "nvidia-cuda-runtime-cu13": "13.0.0"}
    # Every later install into that venv keeps the pins too.
    printed = subprocess.run(["make", "-n", "-B", "setup", f"VENV={VENV}", "GPU_NODE=yes"],
                             cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout
    project = [line for line in printed.splitlines() if '-e ".[test]"' in line]
    assert project and all("-c requirements/gpu.txt" in line for line in project)
