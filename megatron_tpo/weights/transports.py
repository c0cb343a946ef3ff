"""How a weight-stream bucket reaches every rank: two transports behind one interface.

For each bucket of the plan every rank calls, in this order:

    transport.buffer(index, bucket)      the flat buffer the bucket is packed into / read from
    transport.shards(planned, local)     per tensor of the bucket: the TP shards this rank
                                         writes into the buffer (None entries: written by
                                         their own ranks; None: nothing to write)
    transport.publish(bucket, buffer)    afterwards every rank may read the buffer

``ProcessGroupTransport`` gathers each tensor's shards on the bucket's source over the TP
group and broadcasts the packed bucket over the world: NCCL on GPUs, gloo elsewhere, any
number of hosts.

``SharedMemoryTransport`` is for CPU ranks that share one host, where gloo's TCP
broadcast copies every byte through the kernel once per receiver and caps the stream far
below memory bandwidth. Every rank maps the same two bucket slots in ``/dev/shm`` (the
one being read, the one being packed); each TP rank of the source's stage writes its own
shard straight into its place in the slot, a world barrier follows, and every rank reads
the slot in place. No gather, no broadcast: each byte is written once.
"""

import os
import socket
import uuid
import weakref
from pathlib import Path
from typing import List, Optional

import torch

SHARED_MEMORY_DIR = Path("/dev/shm")
TRANSPORTS = ("auto", "broadcast", "shared_memory")


class ProcessGroupTransport:
    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.rank = torch.distributed.get_rank()

    def buffer(self, index: int, bucket) -> torch.Tensor:
        return torch.empty(bucket.numel, dtype=self.dtype, device=self.device)

    def shards(self, planned, local: Optional[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """On the source, all of the tensor's TP shards (a gather over TP, which its peers
        join here); None elsewhere."""
        if self.rank not in planned.gather_ranks:
            return None
        local = local.detach()
        if len(planned.gather_ranks) == 1:
            return [local]
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
        source = planned.gather_ranks[0]
        if self.rank != source:
            torch.distributed.gather(local.contiguous(), None, dst=source, group=group)
            return None
        shards = [torch.empty_like(local) for _ in planned.gather_ranks]
        torch.distributed.gather(local.contiguous(), shards, dst=source, group=group)
        return shards

    def publish(self, bucket, buffer: torch.Tensor) -> None:
        torch.distributed.broadcast(buffer, src=bucket.source)


class SharedMemoryTransport:
    def __init__(self, slots: List[torch.Tensor]):
        self.rank = torch.distributed.get_rank()
        self.slots = slots

    @classmethod
    def create(cls, plan) -> Optional["SharedMemoryTransport"]:
        """Two slots of the plan's largest bucket, or None where the ranks do not share a
        ``/dev/shm`` (a container per rank on one host, say)."""
        slots = _mapped_slots(2, max(b.numel for b in plan.buckets), plan.dtype)
        return None if slots is None else cls(slots)

    def buffer(self, index: int, bucket) -> torch.Tensor:
        # The slot last held bucket index - 2, which every rank finished reading before it
        # reached the barrier that published bucket index - 1.
        return self.slots[index % 2][:bucket.numel]

    def shards(self, planned, local: Optional[torch.Tensor]) -> Optional[List]:
        if self.rank not in planned.gather_ranks:
            return None
        own: List[Optional[torch.Tensor]] = [None] * len(planned.gather_ranks)
        own[planned.gather_ranks.index(self.rank)] = local.detach()
        return own

    def publish(self, bucket, buffer: torch.Tensor) -> None:
        torch.distributed.barrier()   # every writer has written its part of the slot


def _mapped_slots(count: int, numel: int, dtype: torch.dtype) -> Optional[List[torch.Tensor]]:
    """``count`` new shared files of ``numel`` elements, mapped on every rank of the world;
    None (on every rank) when some rank cannot see the files rank 0 made."""
    rank = torch.distributed.get_rank()
    names = [f"megatron_tpo_weights_{uuid.uuid4().hex}" if rank == 0 else None]
    torch.distributed.broadcast_object_list(names, src=0)
    paths = [SHARED_MEMORY_DIR / f"{names[0]}_{index}" for index in range(count)]
    if rank == 0:
        for path in paths:
            torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
    torch.distributed.barrier()
    # Mapping a name that is not there would create a private file of zeros: check first.
    seen = torch.tensor([int(all(path.is_file() for path in paths))], dtype=torch.int32)
    torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MIN)
    slots = None
    if seen.item():
        slots = [torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
                 for path in paths]
    torch.distributed.barrier()
    if rank == 0:
        # The mappings outlive the names: nothing is left in /dev/shm, even after a crash.
        for path in paths:
            path.unlink()
    return slots


_TRANSPORTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cached_transport(name: str, plan, device: torch.device):
    """``choose_transport`` once per plan (shared-memory slots are mapped once)."""
    per_plan = _TRANSPORTS.setdefault(plan, {})
    if (name, device) not in per_plan:
        per_plan[(name, device)] = choose_transport(name, plan, device)
    return per_plan[(name, device)]


def choose_transport(name: str, plan, device: torch.device):
    """The transport ``name`` asks for; ``auto`` takes shared memory when every rank is a
    CPU rank of one host and ``/dev/shm`` has room for the slots, else the process group.
    A collective: every rank calls it and all get the same kind."""
    if name not in TRANSPORTS:
        raise ValueError(f"weight_sync.transport={name!r}: must be one of {TRANSPORTS}")
    hosts: List[Optional[str]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(hosts, _host_identity())
    shared_possible = device.type == "cpu" and len(set(hosts)) == 1
    if name == "shared_memory" and not shared_possible:
        raise ValueError("weight_sync.transport=shared_memory needs every rank on the CPU of "
                         f"one host (these are {device.type} ranks on {len(set(hosts))} hosts)")
    if name == "shared_memory" or (name == "auto" and shared_possible
                                   and _shared_memory_room(plan)):
        shared = SharedMemoryTransport.create(plan)
        if shared is not None:
            return shared
        if name == "shared_memory":
            raise ValueError(f"weight_sync.transport=shared_memory: the ranks do not share "
                             f"{SHARED_MEMORY_DIR} (a container per rank?)")
    return ProcessGroupTransport(device, plan.dtype)


def _host_identity() -> str:
    boot = Path("/proc/sys/kernel/random/boot_id")
    return socket.gethostname() + (boot.read_text().strip() if boot.is_file() else "")


def _shared_memory_room(plan) -> bool:
    """Whether ``/dev/shm`` has room for the two slots twice over on every rank
    (containers often mount a small one)."""
    needed = 2 * plan.largest_bucket_bytes
    room = 0
    if SHARED_MEMORY_DIR.is_dir():
        stats = os.statvfs(SHARED_MEMORY_DIR)
        room = int(stats.f_bavail * stats.f_frsize >= 2 * needed)
    agreed = torch.tensor([room], dtype=torch.int32)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    return bool(agreed.item())
