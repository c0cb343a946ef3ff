"""Helper processes that end with the process that started them, however it ended.

A spawned helper (a multiprocessing Manager, say) is reparented to init when its parent
is killed, and lives on, holding the parent's stdout and stderr open: a wrapper that
reads them waits forever, and the helper stays resident. Under Slurm the step's cgroup
ends it; under torchrun, a shell or a test harness nothing does. Linux can tie a child's
life to its parent's (``prctl(PR_SET_PDEATHSIG)``); this module stays free of torch so
a helper that imports it to run ``die_with_parent`` starts in milliseconds.
"""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Run first thing in a child: SIGKILL it when ``parent_pid`` ends.

    Linux sends the signal when the *thread* that started the child ends, so start such
    helpers from a thread that lives as long as the process (the main thread). Elsewhere
    than Linux this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:   # the parent ended before the prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
