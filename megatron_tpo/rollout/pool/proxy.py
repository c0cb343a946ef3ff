"""``EnginePoolProxy``: every trainer rank's ``RolloutEngine`` when the engines are a
separate ``tpo-engine`` pool (``rollout.placement=separate``), and a pairwise judge's when
its model is served by a pool of its own (``judge.pairwise.placement=separate``: only
``generate`` is asked of it, on every trainer rank, which all get every verdict back).

Trainer rank 0 holds the bridge (``rollout/pool/bridge.py``) and asks the pool; the other
trainer ranks take part only in their own world's collectives, so the loop, the weight
sync and its parity check run unchanged on every rank:

    update_weights(stream)   rank 0 forwards every bucket of the ``WeightStream`` to every
                             engine rank; the others iterate the stream (its gathers and
                             broadcasts need them)
    generate / score         rank 0 asks the pool (which spreads the work over its
                             replicas); the answer is broadcast to every trainer rank.
                             ``generate`` goes in requests of at most
                             ``request_chunk_samples`` samples, with progress on rank 0
    score_each_replica       every replica scores every sequence (the parity check's probes,
                             so no replica goes unchecked)
    weight_checksums         what every engine rank holds; a tensor on which the pool's
                             ranks disagree is left out, so the parity check names it
    set_weight_version       recorded here and in every engine
    sleep / wake             nothing: the engines have devices of their own

Every rank must call each method together (as the loop does), with the same arguments.
While rank 0 talks to the pool the other trainer ranks wait on the default store
(``after_rank_zero``), for as long as rank 0 may wait for the pool, not in a collective of
their world, whose timeout (NCCL's watchdog on GPUs) a rollout or a judging stage would
outlast. An engine error reaches every trainer rank as ``BridgeError``. Replies carry each
engine's weight version, checked against the trainer's, so a pool restarted behind
the trainer's back (engines at version 0) is refused rather than sampled from.
"""

import atexit
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from megatron_tpo.parallel.collectives import RankZeroFailed, is_rank_zero, rank_zero_result
from megatron_tpo.rollout.config import BridgeConfig
from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine, SamplingParams
from megatron_tpo.rollout.pool.bridge import (Bridge, BridgeError, broadcast_object, gather_objects,
                                              open_trainer_side, ring, wait_until_done)
from megatron_tpo.rollout.pool.server import EngineFailure

logger = logging.getLogger(__name__)


class EnginePoolProxy(RolloutEngine):
    def __init__(self, bridge: Optional[Bridge], config: BridgeConfig,
                 settings: str = "rollout.bridge"):
        self.bridge, self.config = bridge, config   # the bridge on trainer rank 0 only
        self.settings = settings
        self.sequence = 0
        if bridge is not None:
            atexit.register(self.shutdown)   # the pool ends with the trainer

    @classmethod
    def connect(cls, config: BridgeConfig, settings: str = "rollout.bridge") -> "EnginePoolProxy":
        """Call on every trainer rank; rank 0 waits (``config.timeout_seconds``) for the pool.
        ``settings`` names the bridge's config group in messages (``judge.pairwise.bridge``
        for a judge model's pool, which only generates)."""
        opened = []
        # The join and the groups' rendezvous wait at most timeout_seconds each.
        _from_rank_zero(lambda: opened.append(open_trainer_side(config, settings)),
                        f"joining the {settings} pool", 2 * config.timeout_seconds,
                        f"2 x {settings}.timeout_seconds")
        return cls(opened[0] if opened else None, config, settings)

    # -- talking to the pool (trainer rank 0) ---------------------------------------
    def _ask(self, kind: str, payload=None, send=None) -> List:
        """Every engine rank's answer to one request; ``send()`` runs after the request
        went out (the weight buckets follow an update_weights request)."""
        bridge = self.bridge
        self.sequence += 1
        ring(bridge, self.sequence, kind)
        broadcast_object(bridge, (kind, payload))
        if send is not None:
            send()
        wait_until_done(bridge, self.sequence, kind, self.config.request_timeout_seconds)
        replies = gather_objects(bridge)
        failures = [value.message for _, value in replies if isinstance(value, EngineFailure)]
        if failures:
            raise BridgeError(f"the engine pool at {bridge.where} failed: " + "; ".join(failures))
        return replies

    def _tell(self, kind: str, payload=None, send=None) -> None:
        def ask() -> None:
            self._ask(kind, payload, send)

        self._answer_everywhere(ask, kind)

    def _answer_everywhere(self, compute, kind: str):
        """``compute()`` (one request) on trainer rank 0, its result or its error on every
        rank. The others wait as long as rank 0 may: a whole request, plus the bridge's
        timeout for the transfers around it, so rank 0's error, which names what failed,
        reaches them before their own bound does."""
        settings = self.settings
        return _from_rank_zero(
            compute, f"a {kind!r} request to the {settings} pool",
            self.config.request_timeout_seconds + self.config.timeout_seconds,
            f"{settings}.request_timeout_seconds + {settings}.timeout_seconds")

    def _check_versions(self, replies: List) -> None:
        stale = {rank: version for rank, (version, _) in enumerate(replies)
                 if version != self.weight_version}
        if stale:
            raise BridgeError(f"engine ranks {sorted(stale)} of the pool at {self.bridge.where} "
                              f"hold weight versions {sorted(set(stale.values()))}, the trainer "
                              f"pushed v{self.weight_version} (was the pool restarted?)")

    def _in_order(self, replies: List, count: int) -> List:
        ordered = {}
        for _, share in replies:
            ordered.update(dict(share or []))
        return [ordered[index] for index in range(count)]

    # -- RolloutEngine --------------------------------------------------------------
    def update_weights(self, stream) -> None:
        """``stream`` is a ``WeightStream``: whole buckets are forwarded, not tensors."""
        if not hasattr(stream, "buckets"):
            raise TypeError("EnginePoolProxy.update_weights forwards whole buckets: pass the "
                            f"WeightStream itself (as push_weights does), not {type(stream)}")

        def forward_buckets():
            for bucket, buffer in stream.buckets():
                layout = [(name, view.storage_offset() - buffer.storage_offset(),
                           tuple(view.shape)) for name, view in bucket.views(buffer)]
                self._send_bucket(buffer, layout)
            broadcast_object(self.bridge, None)   # the end of the stream

        if self.bridge is None:
            for _ in stream.buckets():   # this rank's part in the stream's collectives
                pass
        self._tell("update_weights", send=forward_buckets)

    def _send_bucket(self, buffer: torch.Tensor, layout: List[Tuple[str, int, tuple]]) -> None:
        broadcast_object(self.bridge, (buffer.numel(), buffer.dtype, layout))
        self.bridge.data.broadcast(buffer.to(self.bridge.data_device), 0).wait()

    def set_weight_version(self, version: int) -> None:
        super().set_weight_version(version)
        self._tell("set_weight_version", version)

    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> List[GenerationOutput]:
        """In requests of at most ``request_chunk_samples`` samples, so each request ends
        within ``request_timeout_seconds`` and rank 0 shows progress between them. Each
        carries its place in the whole call, where the pool deals its prompts and seeds
        every sample as it would in one request (``engine_server.replica_seed``)."""
        sampling.validate()
        prompts = list(prompts)
        per_request = max(1, self.config.request_chunk_samples // sampling.n)
        outputs: List[GenerationOutput] = []
        with tqdm(total=len(prompts) * sampling.n, unit="sample",
                  desc=f"{self.settings} generate",
                  disable=not is_rank_zero() or len(prompts) <= per_request) as progress:
            for first in range(0, len(prompts), per_request):
                chunk = prompts[first:first + per_request]
                outputs += self._generate_request(chunk, sampling, first)
                progress.update(len(chunk) * sampling.n)
        return outputs

    def _generate_request(self, prompts: List[str], sampling: SamplingParams,
                          first: int) -> List[GenerationOutput]:
        def ask():
            replies = self._ask("generate", (prompts, sampling, first))
            self._check_versions(replies)
            return self._in_order(replies, len(prompts))

        return self._answer_everywhere(ask, "generate")

    def score(self, token_ids: Sequence[Sequence[int]]) -> List[List[float]]:
        def ask():
            replies = self._ask("score", [list(ids) for ids in token_ids])
            self._check_versions(replies)
            return self._in_order(replies, len(token_ids))

        return self._answer_everywhere(ask, "score")

    def score_each_replica(self, token_ids: Sequence[Sequence[int]]) -> List[List[List[float]]]:
        def ask():
            replies = self._ask("score_everywhere", [list(ids) for ids in token_ids])
            self._check_versions(replies)
            return [scores for _, scores in replies if scores is not None]

        return self._answer_everywhere(ask, "score_everywhere")

    def weight_checksums(self, names: Sequence[str]) -> Dict[str, Tuple[float, float]]:
        def ask():
            held = [value for _, value in self._ask("weight_checksums", list(names))]
            return {name: held[0][name] for name in names
                    if all(name in h and h[name] == held[0][name] for h in held)}

        return self._answer_everywhere(ask, "weight_checksums")

    def shutdown(self) -> None:
        """Stop the pool (trainer rank 0; the other ranks hold no bridge). Once only."""
        if self.bridge is None:
            return
        atexit.unregister(self.shutdown)
        try:
            self._ask("shutdown")
        except RuntimeError as error:   # BridgeError or gloo's: the pool is gone already
            logger.warning("engine pool shutdown at %s: %s", self.bridge.where, error)
        self.bridge = None


def _from_rank_zero(compute, what: str, timeout_seconds: float, bound_by: str):
    """``rank_zero_result``, the other ranks' error a ``BridgeError`` like rank 0's."""
    try:
        return rank_zero_result(compute, what, timeout_seconds, bound_by)
    except RankZeroFailed as error:
        raise BridgeError(str(error)) from error
