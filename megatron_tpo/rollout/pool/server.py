"""The engine side of ``placement=separate``: one rank of the ``tpo-engine`` pool serving
the trainer over the bridge (``rollout/pool/bridge.py``) until told to stop.

Every engine rank runs ``EngineServer(engine, bridge, ranks_per_engine).serve()``. Each
request is rung on the store, broadcast from trainer rank 0 over the bridge's control
group, handled, and answered with one reply per engine rank:

    update_weights       buckets from trainer rank 0 (layout over control, bytes over the
                         data group), fed to this rank's engine as ``(hf_name, view)``
    set_weight_version   the trainer's new version
    generate / score     this replica's round-robin share, as ``generate_on_all_ranks``
                         deals prompts to colocated replicas: replica ``r`` of ``R`` takes
                         items ``r, r + R, ...``, its seed ``seed + r``; every rank of a
                         replica computes, the first one replies. A generate request is
                         one chunk of a longer call (``EnginePoolProxy.generate``): dealt
                         and seeded as its part of the whole call
    score_everywhere     every sequence on every replica (the parity check's probes)
    weight_checksums     this rank's engine's
    shutdown             reply, then return

A reply is ``(weight_version, value)`` or ``(weight_version, EngineFailure)``: an engine
error goes back to the trainer instead of leaving it waiting.
"""

import logging
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_tpo.rollout.engine import RolloutEngine, SamplingParams
from megatron_tpo.rollout.pool.bridge import (Bridge, broadcast_object, gather_objects, mark_done,
                                              wait_for_ring)

logger = logging.getLogger(__name__)


@dataclass
class EngineFailure:
    message: str


def replica_share(count: int, replica: int, replicas: int, first: int = 0) -> List[int]:
    """The indices, within a request of ``count`` items that starts at item ``first`` of
    the whole call, of the items replica ``replica`` of ``replicas`` handles: round robin
    over the whole call."""
    return list(range((replica - first) % replicas, count, replicas))


def replica_seed(sampling: SamplingParams, replica: int, replicas: int,
                 first: int) -> Optional[int]:
    """The seed of replica ``replica``'s share of a request that starts at item ``first``
    of the whole call. Over the whole call it is ``seed + replica`` (colocated replicas
    are seeded so); engines seed sample ``k`` of their ``i``-th prompt with ``seed + i * n
    + k`` (``vllm_engine.request_seeds``), so it moves on by ``n`` for each item the
    replica handled before ``first``, and every sample keeps the whole call's seed."""
    if sampling.seed is None:
        return None
    handled_before = len(range(replica, first, replicas))
    return sampling.seed + replica + handled_before * sampling.n


def received_tensors(bridge: Bridge) -> Iterator[Tuple[str, torch.Tensor]]:
    """The buckets trainer rank 0 forwards, as named views, until its end marker (None).

    A bucket's buffer is dropped when the next one arrives: receivers copy, as
    ``RolloutEngine.update_weights`` promises."""
    while (header := broadcast_object(bridge)) is not None:
        numel, dtype, layout = header
        buffer = torch.empty(numel, dtype=dtype, device=bridge.data_device)
        bridge.data.broadcast(buffer, 0).wait()
        for name, offset, shape in layout:
            count = 1
            for size in shape:
                count *= size
            yield name, buffer[offset:offset + count].view(shape)


class EngineServer:
    def __init__(self, engine: RolloutEngine, bridge: Bridge, ranks_per_engine: int = 1):
        self.engine, self.bridge = engine, bridge
        self.engine_rank = bridge.rank - 1
        self.replica = self.engine_rank // ranks_per_engine
        self.replicas = bridge.engine_ranks // ranks_per_engine
        self.replies = self.engine_rank % ranks_per_engine == 0   # a replica answers once

    def serve(self) -> bool:
        """Handle requests until ``shutdown`` (True) or until the trainer's store closes
        without one (False: the trainer died or was killed)."""
        sequence = 0
        while True:
            sequence += 1
            if wait_for_ring(self.bridge, sequence) is None:
                logger.warning("engine rank %d: the trainer's bridge at %s closed without a "
                               "shutdown request", self.engine_rank, self.bridge.where)
                return False
            kind, payload = broadcast_object(self.bridge)
            try:
                value = getattr(self, f"_{kind}")(payload)
            except Exception as error:  # the trainer raises it; this rank waits for the next
                logger.exception("engine rank %d: %s failed", self.engine_rank, kind)
                value = EngineFailure(f"engine rank {self.engine_rank}: {kind}: "
                                      f"{type(error).__name__}: {error}")
            mark_done(self.bridge, sequence)
            gather_objects(self.bridge, (self.engine.weight_version, value))
            if kind == "shutdown":
                return True

    # -- requests -------------------------------------------------------------------
    def _update_weights(self, payload) -> None:
        stream = received_tensors(self.bridge)
        try:
            self.engine.update_weights(stream)
        finally:
            for _ in stream:   # the trainer sends every bucket whatever the engine did
                pass

    def _set_weight_version(self, version: int) -> None:
        self.engine.set_weight_version(version)

    def _generate(self, payload: Tuple[Sequence[str], SamplingParams, int]):
        prompts, sampling, first = payload
        mine = replica_share(len(prompts), self.replica, self.replicas, first)
        seed = replica_seed(sampling, self.replica, self.replicas, first)
        outputs = (self.engine.generate([prompts[i] for i in mine], replace(sampling, seed=seed))
                   if mine else [])
        return list(zip(mine, outputs)) if self.replies else None

    def _score(self, token_ids: Sequence[Sequence[int]]):
        mine = replica_share(len(token_ids), self.replica, self.replicas)
        scores = self.engine.score([token_ids[i] for i in mine]) if mine else []
        return list(zip(mine, scores)) if self.replies else None

    def _score_everywhere(self, token_ids: Sequence[Sequence[int]]):
        """Every replica scores every sequence (the parity probes: few, and each replica
        must be checked)."""
        scores = self.engine.score(list(token_ids))
        return scores if self.replies else None

    def _weight_checksums(self, names: Sequence[str]):
        return self.engine.weight_checksums(names)

    def _shutdown(self, payload) -> None:
        return None
