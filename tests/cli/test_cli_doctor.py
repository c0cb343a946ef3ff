"""tpo-doctor on a CPU host: what is there, what is missing and why, against the pins."""

import json
import re
import sys
from pathlib import Path

import pytest

from tpo_fixtures import tiny_run_overrides

from megatron_tpo.cli import doctor
from megatron_tpo.cli.doctor import Check, check_nccl, main, read_pins

REPOSITORY = Path(__file__).resolve().parents[2]


def report_lines(capsys):
    """``{what: (status, detail)}``, a detail's continuation lines joined back to it."""
    checks = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith(" " * 32):
            what = list(checks)[-1]
            checks[what] = (checks[what][0], f"{checks[what][1]} {line.strip()}")
        else:
            checks[line[6:31].strip()] = (line[:5].strip(), line[32:])
    return checks


def test_a_long_detail_is_wrapped_under_its_column():
    long = Check("FAIL", "dry run", "does not fit: " + "parity check on h100 " * 40)
    lines = long.line().splitlines()
    assert len(lines) > 3 and all(len(line) <= 110 for line in lines)
    assert all(line.startswith(" " * 32) for line in lines[1:])
    assert " ".join(line[32:] for line in lines) == long.detail.strip()


def forget_transformer_engine():
    """What TE looked like to an earlier test is no answer here: the probes' caches go,
    and so does a broken TE's block in sys.modules (a None entry)."""
    import importlib

    for module, name in (("megatron_tpo.model.llama", "transformer_engine_available"),
                         ("megatron_tpo.model.llama", "layer_spec_choice"),
                         ("megatron_tpo.parallel.te_probe", "transformer_engine_status")):
        try:
            probe = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        getattr(probe, "cache_clear", lambda: None)()
    for name in [n for n in sys.modules if n.split(".")[0] in
                 ("transformer_engine", "transformer_engine_torch")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for key in doctor.DISTRIBUTED_VARIABLES + ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(key, raising=False)
    forget_transformer_engine()
    yield
    forget_transformer_engine()


@pytest.mark.slow
def test_a_cpu_host_reports_versions_and_warns_of_what_a_gpu_run_lacks(capsys):
    import megatron.core
    import torch

    assert main([]) == 0
    lines = report_lines(capsys)
    assert lines["torch"][1].startswith(torch.__version__)
    assert lines["megatron-core"] == ("ok", f"{megatron.core.__version__} (pinned 0.16.1)")
    assert lines["cuda"][0] == "warn" and "built without CUDA" in lines["cuda"][1]
    assert lines["import vllm"] == (
        "warn", "does not import: ModuleNotFoundError: No module named 'vllm'")
    assert lines["import transformer_engine"] == (
        "warn", "does not import: ModuleNotFoundError: No module named 'transformer_engine'")
    assert lines["vllm"] == ("warn", "not installed (pinned 0.33.0)")
    assert lines["layer spec"][0] == "ok" and lines["layer spec"][1].startswith("local")
    assert lines["/dev/shm"][0] in ("ok", "warn") and "GiB free of" in lines["/dev/shm"][1]
    assert "FAIL" not in {status for status, _ in lines.values()}


def test_a_broken_transformer_engine_is_reported_with_its_message(tmp_path, monkeypatch, capsys):
    package = tmp_path / "transformer_engine"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise RuntimeError("transformer_engine_torch 2.9.0 does not match core 2.11.0")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main([])
    lines = report_lines(capsys)
    assert lines["import transformer_engine"] == (
        "warn", "does not import: RuntimeError: transformer_engine_torch 2.9.0 does not match "
                "core 2.11.0")
    # The spec choice either falls back to the local layers (saying why) or, where it
    # still lets the error through, is reported as the failure every model build would hit.
    status, detail = lines["layer spec"]
    assert "RuntimeError: transformer_engine_torch 2.9.0 does not match core 2.11.0" in detail
    if status == "FAIL":
        assert code == 1, detail
    else:
        assert (code, status) == (0, "ok") and detail.startswith("local: "), detail


def test_a_version_off_its_pin_is_reported_and_fails_where_a_gpu_is_expected(tmp_path, capsys):
    import megatron.core

    pins = tmp_path / "pins.txt"
    pins.write_text("torch==9.9.9  # not a real release\nmegatron-core==0.16.1\n")
    assert main(["--pins", str(pins)]) == 0
    lines = report_lines(capsys)
    assert lines["torch"][0] == "warn" and lines["torch"][1].endswith(
        "installed, pinned 9.9.9: off the pin")
    assert lines["megatron-core"][0] == "ok"
    assert lines["transformers"][1].endswith("installed; no pin for it")
    assert main(["--pins", str(pins), "--expect-gpu"]) == 1
    lines = report_lines(capsys)
    assert lines["torch"][0] == "FAIL" and lines["megatron-core"] == (
        "ok", f"{megatron.core.__version__} (pinned 0.16.1)")


@pytest.mark.slow
def test_expect_gpu_on_a_cpu_host_fails_on_cuda_vllm_and_te(capsys):
    assert main(["--expect-gpu"]) == 1
    lines = report_lines(capsys)
    assert lines["cuda"][0] == "FAIL"
    assert lines["import vllm"][0] == "FAIL" and lines["import transformer_engine"][0] == "FAIL"


def test_the_json_report_has_every_check_and_the_verdict(capsys):
    assert main(["--json", "--expect-gpu"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    whats = [check["what"] for check in report["checks"]]
    assert {"torch", "megatron-core", "cuda", "import vllm", "/dev/shm"} <= set(whats)
    assert {check["status"] for check in report["checks"]} <= {"ok", "warn", "FAIL"}


def test_the_environment_line_shows_the_launcher_variables(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "ok    environment               SLURM_PROCID=3 SLURM_NTASKS=8" in out
    assert re.search(r"warn  environment +CUDA_DEVICE_MAX_CONNECTIONS=8: megatron-core", out)


@pytest.mark.slow
def test_the_tiny_config_dry_run_fits(tmp_path, capsys):
    assert main(tiny_run_overrides(tmp_path)) == 0
    status, detail = report_lines(capsys)["dry run"]
    assert status == "ok" and detail.startswith("fits on 1 rank(s) (TP x PP x CP, no launcher): "), detail
    assert "not checked (run.hardware=cpu)" in detail, detail


@pytest.mark.slow
def test_a_config_that_does_not_fit_its_gpu_fails_its_dry_run_line(tmp_path, capsys):
    """The tiny config on an H100 with a vLLM engine claiming 99% of it: vLLM would
    refuse to start beside the CUDA context, and the dry run names that phase."""
    overrides = [*tiny_run_overrides(tmp_path), "run.hardware=h100-80gb", "rollout.engine=vllm",
                 "rollout.vllm.gpu_memory_utilization=0.99"]
    assert main(overrides) == 1
    status, detail = report_lines(capsys)["dry run"]
    assert status == "FAIL" and "does not fit: engine start-up on h100-80gb GPU" in detail, detail
    assert "smallest fix: rollout.vllm.gpu_memory_utilization=0.96" in detail, detail


def test_a_config_that_is_not_valid_fails_its_dry_run_line(tmp_path, capsys):
    assert main([*tiny_run_overrides(tmp_path), "train.lr=-1"]) == 1
    status, detail = report_lines(capsys)["dry run"]
    assert status == "FAIL" and "train.lr=-1.0" in detail, detail
    assert main([*tiny_run_overrides(tmp_path), "--world-size", "3", "parallel=tp2_pp2"]) == 1
    status, detail = report_lines(capsys)["dry run"]
    assert status == "FAIL" and "3" in detail, detail


def test_the_pins_file_pins_the_stack_the_engine_and_megatron_core_need():
    pins = read_pins(REPOSITORY / "requirements" / "gpu.txt")
    assert pins["vllm"] == "0.33.0" and pins["torch"] == "2.14.0"
    assert pins["megatron-core"] == "0.16.1"
    # megatron-core 0.16.1 declares transformer-engine>=2.9.0a0,<2.12.0.
    major, minor = (int(part) for part in pins["transformer-engine"].split(".")[:2])
    assert (2, 9) <= (major, minor) < (2, 12)
    assert pins["transformer-engine-torch"] == pins["transformer-engine"]
    # setup.py's gpu extra names the same vLLM.
    setup = (REPOSITORY / "setup.py").read_text()
    assert f'"vllm=={pins["vllm"]}"' in setup


def test_an_nccl_other_than_the_pinned_one_is_reported():
    assert check_nccl("2.30.7", "2.30.7").line() == (
        "ok    nccl                      2.30.7 (pinned 2.30.7)")
    other = check_nccl("2.27.3", "2.30.7")
    assert other.status == "warn" and other.detail.startswith("2.27.3 loaded, pinned 2.30.7")
    assert check_nccl("2.27.3", None).status == "ok"
    assert read_pins(REPOSITORY / "requirements" / "gpu.txt")["nvidia-nccl-cu13"] == "2.30.7"
