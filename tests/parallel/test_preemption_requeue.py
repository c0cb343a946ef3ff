"""Rank 0's `scontrol requeue` after a preemption: an operator's requeue came first."""

import os
import signal
import stat

import pytest

from megatron_tpo.parallel.preemption import PreemptionGuard


def fake_scontrol(folder, exit_code: int, message: str):
    script = folder / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {folder / 'calls'}\n"
                      f"echo '{message}' >&2\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def guard():
    previous = {number: signal.getsignal(number) for number in (signal.SIGUSR1, signal.SIGTERM)}
    yield PreemptionGuard()
    for number, handler in previous.items():
        signal.signal(number, handler)


@pytest.mark.slow
def test_a_job_requeued_already_is_no_error_but_another_failure_says_what_failed(
        guard, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    fake_scontrol(tmp_path, 0, "")
    assert guard.requeue() == "41"
    assert (tmp_path / "calls").read_text() == "requeue 41\n"
    # Slurm 22.05's answer when `scontrol requeue 41` ran before (the signal came from it).
    fake_scontrol(tmp_path, 1, "Job is pending execution for job 41")
    assert guard.requeue() == "41"
    fake_scontrol(tmp_path, 1, "Requested operation is presently disabled for job 41")
    with pytest.raises(RuntimeError, match="presently disabled.*resubmit the job"):
        guard.requeue()


def test_outside_slurm_there_is_nothing_to_requeue(guard, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert guard.requeue() is None
