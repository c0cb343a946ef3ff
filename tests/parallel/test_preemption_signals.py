"""Slurm signals every process of a job step: the checkpoint writer's helper must live on
so that the save the ranks make after the signal can finish."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

PROBE = textwrap.dedent("""
    import os, signal, time
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron_tpo.checkpoint.training import shield_writer_queue_from_slurm_signals
    from megatron_tpo.parallel.preemption import PreemptionGuard

    guard = PreemptionGuard()
    for mode in ("bare", "shielded"):
        filesystem_async._results_queue = None  # megatron makes it once per process
        if mode == "shielded":
            shield_writer_queue_from_slurm_signals()
        queue = filesystem_async._get_write_results_queue()
        manager = queue._manager._process  # the Manager's server process
        # What slurmstepd does at a requeue: the signals reach every process of the step.
        for number in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(manager.pid, number)
            os.kill(os.getpid(), number)
        time.sleep(1.0)
        assert guard.requested()
        try:
            queue.put("written")
            print(mode, "queue:", queue.get(timeout=5))
        except (EOFError, ConnectionError, BrokenPipeError) as error:
            print(mode, "queue gone:", type(error).__name__)
""")


def test_the_checkpoint_writers_queue_outlives_the_signals_slurm_sends_to_the_step():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # Started plainly (as megatron does), the Manager dies of the signals; shielded, not.
    assert "bare queue gone" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "shielded queue: written" in done.stdout, done.stdout + done.stderr[-3000:]
