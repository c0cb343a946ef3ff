"""Run a function in several local gloo processes, as torchrun would (tests, CPU demos)."""

import atexit
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, List

import torch.multiprocessing as mp

from megatron_tpo.parallel.launch import free_local_port, share_cpu_threads


# How the ranks start. "spawn": a fresh interpreter per rank that ends as torchrun's ranks
# do. "forkserver": forked from a server that imported PRELOADED_MODULES once, which saves
# each rank seconds of CPU on cores the ranks share (the test suite's choice, set in
# tests/conftest.py); such a rank ends through os._exit, without the interpreter's
# finalization, so what a library frees only then stays behind (vLLM's CPU shared
# memory, under names the next engine reuses): its tests keep "spawn".
START_METHOD = "spawn"
PRELOADED_MODULES = ["torch", "megatron.core", "transformers"]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple,
            result_dir: str, environment: dict) -> None:
    # A forked rank inherits the fork server's environment, fixed when the server started;
    # every rank takes its caller's of this call.
    os.environ.clear()
    os.environ.update(environment)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    share_cpu_threads(world_size)
    try:
        _run_and_store(rank, world_size, fn, args, result_dir)
    finally:
        # A forked rank leaves through os._exit, which skips atexit: the handlers (an engine
        # pool's shutdown, say) run here, as they would at a spawned or torchrun rank's exit.
        atexit._run_exitfuncs()


def _run_and_store(rank: int, world_size: int, fn: Callable, args: tuple,
                   result_dir: str) -> None:
    try:
        result = fn(rank, world_size, *args)
    finally:
        # Every rank ends the same way, whatever its function set up: megatron's parallel
        # state and the process group go, so no caller repeats the teardown.
        _tear_down_distributed()
    # A file, not a queue: a large result in a pipe would block the child before join.
    with open(Path(result_dir) / f"{rank}.pkl", "wb") as handle:
        pickle.dump(result, handle)


def _tear_down_distributed() -> None:
    import torch.distributed

    if not torch.distributed.is_initialized():
        return
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def spawn_local(fn: Callable, world_size: int, *args: Any) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return results by rank.

    The processes start by ``START_METHOD`` and see the caller's environment of this call.

    ``fn`` must be importable (a module-level function). A failure in any rank is
    re-raised here with that rank's traceback. Each rank's process group and megatron
    parallel state are torn down after ``fn``, so ``fn`` need not do it.
    """
    if START_METHOD == "forkserver":
        mp.get_context("forkserver").set_forkserver_preload(PRELOADED_MODULES)
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_worker, args=(world_size, free_local_port(), fn, args, result_dir,
                                          dict(os.environ)),
                           nprocs=world_size, join=True, start_method=START_METHOD)
        results = []
        for rank in range(world_size):
            with open(Path(result_dir) / f"{rank}.pkl", "rb") as handle:
                results.append(pickle.load(handle))
        return results
