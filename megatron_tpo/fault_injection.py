"""Fault injection for the resume tests: a process killed, or warned as Slurm warns, at
a chosen point of the loop.

``MEGATRON_TPO_CRASH_AT="<iteration>:<stage>[:<step>]"`` kills this process with SIGKILL
right after that stage was stored (or after that DPO step), as a node failure would;
``"<iteration>:<stage>[:<step>]@USR1"`` sends SIGUSR1 there instead, as Slurm's warning
before the time limit would. Never set in normal runs.
"""

import os
import signal
from typing import Optional

CRASH_AT_VARIABLE = "MEGATRON_TPO_CRASH_AT"


def crash_point(iteration: int, stage: str, step: Optional[int] = None) -> None:
    wanted, _, signal_name = os.environ.get(CRASH_AT_VARIABLE, "").partition("@")
    here = f"{iteration}:{stage}" + ("" if step is None else f":{step}")
    if wanted == here:
        os.kill(os.getpid(), signal.Signals[f"SIG{signal_name or 'KILL'}"])
