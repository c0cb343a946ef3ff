"""lifetime.die_with_parent: a helper that calls it dies when its parent is SIGKILLed; one
that does not call it outlives the parent (so the test sees the difference it makes)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_tpo.lifetime import die_with_parent

HELPER_IMPORT = f"from {die_with_parent.__module__} import die_with_parent"

# The parent starts two helpers (one tied to it, one not), prints their pids, then waits.
PARENT = textwrap.dedent("""
    import os, subprocess, sys
    helper = ("import os, sys, time\\n"
              "HELPER_IMPORT\\n"
              "if sys.argv[1] == 'tied': die_with_parent(int(sys.argv[2]))\\n"
              "print('ready', flush=True)\\n"
              "time.sleep(60)\\n")
    children = [subprocess.Popen([sys.executable, "-c", helper, kind, str(os.getpid())],
                                 stdout=subprocess.PIPE, text=True) for kind in ("tied", "free")]
    for child in children:
        assert child.stdout.readline() == "ready\\n"
    print(*(child.pid for child in children), flush=True)
    sys.stdin.read()
""").replace("HELPER_IMPORT", HELPER_IMPORT)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"   # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_helper_tied_to_its_parent_dies_with_it_and_an_untied_one_lives_on():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    tied, free = (int(pid) for pid in parent.stdout.readline().split())
    try:
        assert _alive(tied) and _alive(free)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(tied) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(tied)
        assert _alive(free)
    finally:
        for pid in (tied, free):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_parent_that_ended_before_the_call_ends_the_helper_at_once():
    """Asked to die with a parent that is not its parent any more, the helper kills itself."""
    helper = (f"{HELPER_IMPORT}\n"
              "die_with_parent(1 << 22)\n"     # above pid_max: never this process's parent
              "print('survived')\n")
    done = subprocess.run([sys.executable, "-c", helper], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == -signal.SIGKILL and done.stdout == ""
