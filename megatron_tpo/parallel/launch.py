"""Start torch.distributed and megatron's parallel state from torchrun or Slurm.

torchrun exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; ``srun`` exports
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODELIST and nothing about a master, so
the first host of the node list becomes the master and the port is derived from the
job id (every task of a job computes the same one without talking to the others).

``start_distributed`` is the one start-up path of every world (tpo-run's through
``init_megatron``, tpo-engine's): it exports torchrun's variables, whatever launched the
process, because vLLM's external_launcher reads ``RANK``/``LOCAL_RANK`` and env://
``MASTER_ADDR``/``MASTER_PORT`` from ``os.environ``; it binds the device both megatron and
vLLM use (``cuda:LOCAL_RANK``); and it starts the process group.
"""

import logging
import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import List, Mapping, Optional, Set, Tuple

import torch

from megatron_tpo.config import ConfigError, ModelConfig, ParallelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"
    local_world_size: int = 1  # ranks on this machine


def expand_slurm_nodelist(nodelist: str) -> List[str]:
    """``"gpu[001-003,7],login1"`` -> ``["gpu001", "gpu002", "gpu003", "gpu7", "login1"]``."""
    hosts: List[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            width = len(low)
            for number in range(int(low), int(high or low) + 1):
                hosts.extend(expand_slurm_nodelist(f"{prefix}{number:0{width}d}{suffix}"))
    return hosts


# Ports free_local_port handed out in this process: each is bound later, by someone else.
_HANDED_OUT: Set[int] = set()
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _kernel_ephemeral_range() -> Tuple[int, int]:
    try:
        low, high = (int(word) for word in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999   # Linux's default
    return low, high


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the kernel's
    ephemeral range and not handed out before by this process.

    The port is bound later (by a process group's store, the rollout bridge's), so it must
    stay free until then. A port the kernel picks (bind to port 0) comes from the ephemeral
    range, where the kernel also picks the ports of every socket bound or connected
    meanwhile (gloo's listeners, the other world's store), and two picks a moment apart
    may be the same port: a world then fails to start now and then."""
    low, high = _kernel_ephemeral_range()
    candidates = [port for port in (*range(10000, low), *range(high + 1, 65536))
                  if port not in _HANDED_OUT]
    chooser = random.SystemRandom()   # independent of any seed a run or a test sets
    for _ in range(min(200, len(candidates))):
        port = chooser.choice(candidates)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:   # in use
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as sock:   # no free port outside the ephemeral range
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def detect_distributed_env(environ: Optional[Mapping[str, str]] = None) -> DistributedEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistributedEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get(
            "SLURM_NODELIST")
        if not nodelist:
            raise ConfigError("SLURM_PROCID is set but SLURM_NODELIST is not: run the job with srun")
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistributedEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_slurm_nodelist(nodelist)[0],
            # Above the ephemeral-port floor most clusters leave free for jobs.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
            # "4(x2)" means four tasks on each of two nodes.
            local_world_size=int(env.get("SLURM_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]),
        )
    return DistributedEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                          master_port=free_local_port(), launcher="single")


def share_cpu_threads(ranks_on_this_machine: int) -> None:
    """Give each rank its share of the cores.

    OpenMP threads that outnumber the cores spin against each other and slow small
    matmuls a hundredfold; torchrun sets OMP_NUM_THREADS=1 for the same reason. An
    explicit OMP_NUM_THREADS wins.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ranks_on_this_machine)))


def export_launch_environment(env: DistributedEnv) -> None:
    """Put this rank's place in ``os.environ`` as torchrun would: vLLM's external_launcher
    reads RANK and LOCAL_RANK from there (a KeyError under srun otherwise) and, when it
    starts the world itself, MASTER_ADDR/MASTER_PORT through env://."""
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank),
                      WORLD_SIZE=str(env.world_size),
                      LOCAL_WORLD_SIZE=str(env.local_world_size),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))


def limit_device_connections() -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 (unless set): megatron-core's overlap of tensor-parallel
    communication with compute relies on one hardware queue, which orders the kernels as
    they were issued. CUDA reads it when its context is created, so it must come first."""
    if "CUDA_DEVICE_MAX_CONNECTIONS" in os.environ:
        return
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if torch.cuda.is_initialized():
        logger.warning("CUDA was initialised before CUDA_DEVICE_MAX_CONNECTIONS=1 was set; it "
                       "takes effect only for a new process: export it in the job script")


def bind_device(local_rank: int) -> None:
    """``cuda:LOCAL_RANK``, the device vLLM's worker takes (it asserts local_rank <
    device_count), so the trainer and the engine of a rank share one GPU."""
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this task has {count} visible CUDA device(s): the "
            "site binds GPUs per task. Each task must see all of its node's GPUs (local "
            "rank i uses cuda:i, as vLLM does): drop --gpus-per-task and --gpu-bind from "
            "the job, or give each task all the node's GPUs (--gpus-per-node with "
            "--gpu-bind=none)")
    torch.cuda.set_device(local_rank)


def start_distributed(env: DistributedEnv, timeout_seconds: float = 1800.0) -> str:
    """Export the launch variables, bind the device, start the default process group
    (unless one exists); returns the backend, nccl on CUDA, else gloo."""
    if not timeout_seconds > 0:
        raise ConfigError(f"run.process_group_timeout_seconds={timeout_seconds}: must be "
                          "positive (how long a collective may wait for the slowest rank)")
    export_launch_environment(env)
    limit_device_connections()
    backend = "gloo"
    if torch.cuda.is_available():
        bind_device(env.local_rank)
        backend = "nccl"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_seconds),
        )
    return backend


def init_megatron(
    parallel: ParallelConfig,
    model: Optional[ModelConfig] = None,
    seed: int = 1234,
    environ: Optional[Mapping[str, str]] = None,
    timeout_seconds: float = 1800.0,
) -> DistributedEnv:
    """Check the layout, start the process group and megatron's parallel state.

    The layout is validated against the model and the world size before any process
    group exists, so a bad setting fails in every rank at once with the same message.
    """
    env = detect_distributed_env(environ)
    if model is not None:
        parallel.validate(model, env.world_size)
    else:
        parallel.data_parallel_size(env.world_size)

    from megatron_tpo.parallel.te_probe import transformer_engine_status

    limit_device_connections()    # before anything (TE, megatron-core) may touch CUDA
    transformer_engine_status()   # a broken TE install is blocked before megatron-core sees it
    from megatron.core import parallel_state, tensor_parallel

    if not torch.cuda.is_available():
        from megatron_tpo.parallel.cpu_adapter import install_cpu_adapter

        install_cpu_adapter()
        share_cpu_threads(env.local_world_size)
    start_distributed(env, timeout_seconds)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return env


def shutdown_megatron() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
