"""spawn_local: ranks forked from a fork server that preloaded torch and megatron-core
behave as spawned ranks do: the caller's environment at the call, its atexit handlers run
when the rank ends, a failing rank's error raised in the caller."""

import atexit
import os
import sys

import pytest

from megatron_tpo.parallel.local_launch import spawn_local

pytestmark = pytest.mark.slow


def _rank_view(rank, world_size, marker_dir):
    atexit.register(lambda: open(os.path.join(marker_dir, f"atexit_{rank}"), "w").close())
    return {"variable": os.environ.get("LOCAL_LAUNCH_TEST"), "rank": os.environ["RANK"],
            "world": os.environ["WORLD_SIZE"], "cwd": os.getcwd(),
            "megatron_loaded": "megatron.core" in sys.modules}


def _failing_rank(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")


def test_ranks_see_the_callers_environment_of_each_call_and_run_their_atexit_handlers(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("first", "second"):   # the fork server starts at the first call
        monkeypatch.setenv("LOCAL_LAUNCH_TEST", value)
        views = spawn_local(_rank_view, 2, str(tmp_path))
        assert [v["variable"] for v in views] == [value, value]
        assert [(v["rank"], v["world"]) for v in views] == [("0", "2"), ("1", "2")]
        assert {v["cwd"] for v in views} == {str(tmp_path)}
        assert all(v["megatron_loaded"] for v in views)   # preloaded, never imported here
        assert sorted(p.name for p in tmp_path.glob("atexit_*")) == ["atexit_0", "atexit_1"]
        for marker in tmp_path.glob("atexit_*"):
            marker.unlink()


def test_a_failing_rank_raises_in_the_caller_with_its_message():
    with pytest.raises(Exception, match="rank 1 fails on purpose"):
        spawn_local(_failing_rank, 2)
