"""The bridge between the trainer's torch.distributed world and a separate engine pool's.

``rollout.placement=separate`` runs the rollout engines as their own world (``tpo-engine``
on their own GPUs). The two worlds meet in one more process group, the bridge: bridge
rank 0 is trainer rank 0, bridge rank ``1 + i`` is engine rank ``i``, as vLLM's RL
examples and NeMo-RL place the engine ranks after the trainer's. It is made by
rendezvous on a ``torch.distributed.TCPStore`` that trainer rank 0 serves at
``rollout.bridge.address:port``:

    trainer rank 0                             every tpo-engine rank
    open_trainer_side(config)                  open_engine_side(config, engine_rank)
      serves the store, waits for the joins      connects to the store, joins
      ProcessGroupGloo ("control")  <------->    requests and replies, pickled in uint8 tensors
      ProcessGroupNCCL ("data", on GPUs) <--->   weight buckets (gloo's group on CPU)

The groups are built from torch's process-group classes on a ``PrefixStore``, not through
``init_process_group``: each side already has its own default world. Requests are rung
on the store first (``ring`` / ``wait_for_ring``) because an engine waits for the next
one while the trainer trains, for hours, longer than any collective may take; the
request's data then moves over the groups within ``rollout.bridge.timeout_seconds``.

A judge model's pool (``judge.pairwise.placement=separate``, ``tpo-engine --serve judge``)
meets the trainer the same way on a bridge of its own (``judge.pairwise.bridge``, another
port); ``settings`` names which group the messages point to.
"""

import pickle
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from megatron_tpo.rollout.config import BridgeConfig

JOINED = "engine_ranks_joined"
BACKEND = "bucket_backend"
# How often a waiting engine rank looks at the store; a closed store ends the wait at once.
_RING_POLL = timedelta(seconds=30)


class BridgeError(RuntimeError):
    """The other side of the bridge is missing, went away, or answered with an error."""


@dataclass
class Bridge:
    store: dist.TCPStore
    control: Any               # a gloo process group: requests, replies
    data: Any                  # where buckets travel: NCCL on GPUs, else ``control``
    data_device: torch.device  # where bucket buffers must live for ``data``
    rank: int                  # 0: trainer rank 0; 1 + i: engine rank i
    size: int
    where: str                 # "address:port", for messages
    settings: str = "rollout.bridge"   # the config group it was opened from, for messages

    @property
    def engine_ranks(self) -> int:
        return self.size - 1


def _resolved_backend(config: BridgeConfig) -> str:
    if config.backend != "auto":
        return config.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def _groups(store, rank: int, size: int, backend: str, timeout: timedelta):
    control = dist.ProcessGroupGloo(dist.PrefixStore("control/", store), rank, size, timeout)
    if backend == "gloo":
        return control, control, torch.device("cpu")
    # Bound to this process's current device (megatron's, or tpo-engine's LOCAL_RANK).
    data = dist.ProcessGroupNCCL(dist.PrefixStore("data/", store), rank, size, timeout)
    return control, data, torch.device("cuda", torch.cuda.current_device())


def open_trainer_side(config: BridgeConfig, settings: str = "rollout.bridge") -> Bridge:
    """On trainer rank 0: serve the store, wait for every engine rank, build the groups."""
    where = f"{config.address}:{config.port}"
    timeout = timedelta(seconds=config.timeout_seconds)
    try:
        store = dist.TCPStore(config.address, config.port, is_master=True, timeout=timeout,
                              wait_for_workers=False)
    except dist.DistError as error:
        raise BridgeError(f"trainer rank 0 cannot serve the bridge store at {where} "
                          f"({settings}.address/port): {error}") from error
    backend = _resolved_backend(config)
    store.set(BACKEND, backend)   # the engines follow the trainer's choice
    deadline = time.monotonic() + config.timeout_seconds
    while (joined := store.add(JOINED, 0)) < config.engine_ranks:
        if time.monotonic() > deadline:
            raise BridgeError(
                f"no engine pool at {where}: {joined} of {settings}.engine_ranks="
                f"{config.engine_ranks} tpo-engine ranks joined within {settings}."
                f"timeout_seconds={config.timeout_seconds:g}; start {_server_command(settings)}"
                f" with the same {settings} settings (placement=separate)")
        time.sleep(0.05)
    size = config.engine_ranks + 1
    control, data, device = _groups(store, 0, size, backend, timeout)
    return Bridge(store, control, data, device, 0, size, where, settings)


def _server_command(settings: str) -> str:
    return "tpo-engine --serve judge" if settings.startswith("judge.") else "tpo-engine"


def open_engine_side(config: BridgeConfig, engine_rank: int,
                     settings: str = "rollout.bridge") -> Bridge:
    """On every engine rank: reach trainer rank 0's store, join, build the groups."""
    where = f"{config.address}:{config.port}"
    timeout = timedelta(seconds=config.timeout_seconds)
    try:
        store = dist.TCPStore(config.address, config.port, is_master=False, timeout=timeout)
    except dist.DistError as error:
        raise BridgeError(f"engine rank {engine_rank}: no trainer at {where} (the bridge store "
                          f"that tpo-run's rank 0 serves) within {settings}.timeout_seconds="
                          f"{config.timeout_seconds:g}: {error}") from error
    backend = store.get(BACKEND).decode()
    store.add(JOINED, 1)
    control, data, device = _groups(store, 1 + engine_rank, config.engine_ranks + 1, backend,
                                    timeout)
    return Bridge(store, control, data, device, 1 + engine_rank, config.engine_ranks + 1, where,
                  settings)


def ring(bridge: Bridge, sequence: int, kind: str) -> None:
    bridge.store.set(f"request/{sequence}", kind)


def wait_for_ring(bridge: Bridge, sequence: int) -> Optional[str]:
    """The kind of request ``sequence``; None when the trainer's store went away."""
    key = f"request/{sequence}"
    while True:
        try:
            bridge.store.wait([key], _RING_POLL)
            return bridge.store.get(key).decode()
        except dist.DistStoreError:   # no request yet: the trainer is still training
            continue
        except dist.DistNetworkError:
            return None


def mark_done(bridge: Bridge, sequence: int) -> None:
    bridge.store.set(f"done/{sequence}/{bridge.rank}", "")


def wait_until_done(bridge: Bridge, sequence: int, kind: str, timeout_seconds: float) -> None:
    """On trainer rank 0: every engine rank finished request ``sequence`` (a rollout may
    take far longer than a collective may wait)."""
    keys = [f"done/{sequence}/{rank}" for rank in range(1, bridge.size)]
    try:
        bridge.store.wait(keys, timedelta(seconds=timeout_seconds))
    except dist.DistStoreError as error:
        missing = [rank - 1 for rank, key in enumerate(keys, start=1)
                   if not bridge.store.check([key])]
        raise BridgeError(f"engine ranks {missing} of the pool at {bridge.where} did not finish "
                          f"{kind!r} within {bridge.settings}.request_timeout_seconds="
                          f"{timeout_seconds:g}") from error


def broadcast_object(bridge: Bridge, value: Any = None) -> Any:
    """``value`` from bridge rank 0 to every bridge rank."""
    if bridge.rank == 0:
        payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
        length = torch.tensor([payload.numel()], dtype=torch.int64)
    else:
        length = torch.zeros(1, dtype=torch.int64)
    bridge.control.broadcast(length, 0).wait()
    if bridge.rank != 0:
        payload = torch.empty(int(length), dtype=torch.uint8)
    bridge.control.broadcast(payload, 0).wait()
    return value if bridge.rank == 0 else pickle.loads(payload.numpy().tobytes())


def gather_objects(bridge: Bridge, value: Any = None) -> Optional[List[Any]]:
    """Every engine rank's ``value``, by engine rank, on bridge rank 0 (None elsewhere)."""
    if bridge.rank != 0:
        payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
        bridge.control.send([torch.tensor([payload.numel()], dtype=torch.int64)], 0, 0).wait()
        bridge.control.send([payload], 0, 1).wait()
        return None
    values = []
    for rank in range(1, bridge.size):
        length = torch.zeros(1, dtype=torch.int64)
        bridge.control.recv([length], rank, 0).wait()
        payload = torch.empty(int(length), dtype=torch.uint8)
        bridge.control.recv([payload], rank, 1).wait()
        values.append(pickle.loads(payload.numpy().tobytes()))
    return values

