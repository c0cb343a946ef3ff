"""``tpo-engine`` worlds started as torchrun would start them, for the pool tests."""

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

from megatron_tpo.parallel.launch import free_local_port


def start_engine_world(arguments: Sequence[str], ranks: int, log_dir: Path,
                       log_name: str = "engine") -> List[Tuple[subprocess.Popen, object]]:
    """One ``python -m megatron_tpo.cli.engine`` process per rank, each logging to
    ``log_dir/<log_name>_<rank>.log``."""
    master_port, processes = free_local_port(), []
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(ranks),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port),
                   GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        log = open(log_dir / f"{log_name}_{rank}.log", "w")
        processes.append((subprocess.Popen(
            [sys.executable, "-m", "megatron_tpo.cli.engine", *arguments],
            env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return processes


def stop_engine_world(processes, log_dir: Path, log_name: str = "engine"):
    """Exit codes (the world should be stopping by itself) and the ranks' logs, which are
    also printed: pytest shows them when the test fails, on the trainer's side too."""
    try:
        exit_codes = [process.wait(timeout=60) for process, _ in processes]
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
            log.close()
        logs = [(log_dir / f"{log_name}_{rank}.log").read_text()
                for rank in range(len(processes))]
        for rank, text in enumerate(logs):
            print(f"--- {log_name} rank {rank} ---\n{text}")
    return exit_codes, logs
