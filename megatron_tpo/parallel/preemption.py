"""Slurm preemption: save, requeue, and let the requeued job resume.

Slurm sends a signal shortly before it ends a job (``--signal=USR1@120``, or SIGTERM on
preemption and at the time limit). The handler only raises a flag; the loop asks
``requested()`` at step boundaries, where every rank agrees (a MAX all-reduce) because
the signal may reach the ranks at different moments, saves a checkpoint, and rank 0
asks Slurm to requeue the job, which then resumes from that checkpoint.
"""

import logging
import os
import signal
import subprocess
from typing import Optional

import torch

logger = logging.getLogger(__name__)

class Preempted(Exception):
    """The run stopped at a checkpoint because Slurm asked it to; it resumes when requeued."""


class PreemptionGuard:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self._flag = False
        for number in signals:
            signal.signal(number, self._on_signal)

    def _on_signal(self, number, _frame) -> None:
        logger.warning("received %s: saving a checkpoint at the next step boundary",
                       signal.Signals(number).name)
        self._flag = True

    def requested(self) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        flag = torch.tensor([1.0 if self._flag else 0.0])
        if torch.distributed.is_initialized():
            if torch.cuda.is_available():
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def requeue(self) -> Optional[str]:
        """Ask Slurm to requeue this job (rank 0); returns the job id, or None outside Slurm."""
        job = os.environ.get("SLURM_JOB_ID")
        if job is None:
            return None
        asked = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if asked.returncode != 0:
            # Requeued already (an operator's `scontrol requeue`, or preemption with
            # PreemptMode=REQUEUE, sent the signal): Slurm says the job is pending.
            if "Job is pending execution" in asked.stderr:
                logger.warning("job %s is requeued already", job)
                return job
            raise RuntimeError(f"scontrol requeue {job} failed ({asked.returncode}): "
                               f"{asked.stderr.strip()}; the checkpoint is saved, resubmit "
                               "the job to resume")
        return job
