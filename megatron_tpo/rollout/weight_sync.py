"""``push_weights``: the trainer's live weights into every rank's rollout engine, checked.

    metrics = push_weights(engine, trainer.chunks, model, WeightSyncConfig())  # every rank

A collective over the default process group: each rank streams the model as HF-named
full tensors (``WeightStream``) into its own engine, the engine's weight version goes
up by one, and (unless switched off) a parity check scores fixed probe sequences on
both sides. A check that fails raises ``WeightSyncError`` on every rank, naming the
first tensor whose checksum differs between what was sent and what the engine holds.
The engine is awake afterwards.
"""

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from megatron_tpo.config import ConfigError, ModelConfig
from megatron_tpo.rollout.bucket_transport import TRANSPORTS, cached_transport
from megatron_tpo.rollout.engine import RolloutEngine
from megatron_tpo.rollout.parity import (
    first_differing_tensor, max_abs_difference, probe_token_ids, trainer_token_logprobs,
)
from megatron_tpo.rollout.weight_stream import WeightStream, cached_plan
from megatron_tpo.train.pipeline_step import unwrapped


class WeightSyncError(RuntimeError):
    """The engine does not compute what the trainer computes after a weight sync."""


@dataclass
class WeightSyncConfig:
    # Bytes per broadcast; extra memory per rank is about two buckets (see WeightStream).
    bucket_bytes: int = 1 << 30
    # How buckets reach the ranks (rollout/bucket_transport.py): "broadcast" over the
    # process group, "shared_memory" for CPU ranks of one host, "auto" picks.
    transport: str = "auto"
    check_parity: bool = True
    # Largest allowed |engine - trainer| per-token log-prob on the probes. float32 on both
    # sides agrees to ~1e-5; bf16 engines and trainers differ far more on random tokens,
    # and a corrupted tensor moves log-probs by whole units.
    parity_tolerance: float = 0.1
    num_probe_sequences: int = 4
    probe_length: int = 64
    probe_seed: int = 0

    def validate(self) -> None:
        if self.bucket_bytes < 1:
            raise ConfigError(f"weight_sync.bucket_bytes={self.bucket_bytes}: must be positive")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"weight_sync.transport={self.transport!r}: must be one of "
                              f"{TRANSPORTS}")
        if not self.parity_tolerance > 0:
            raise ConfigError(f"weight_sync.parity_tolerance={self.parity_tolerance}: "
                              "must be positive")
        if self.num_probe_sequences < 1:
            raise ConfigError(f"weight_sync.num_probe_sequences={self.num_probe_sequences}: "
                              "must be >= 1")
        if self.probe_length < 2:
            raise ConfigError(f"weight_sync.probe_length={self.probe_length}: must be >= 2 "
                              "(the first token is only context)")


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _stream_into(engine: RolloutEngine, stream: WeightStream) -> None:
    # The stream itself (iterable of named tensors): a pool proxy forwards its buckets.
    engine.update_weights(stream)
    if not stream.finished:
        # Every rank must run every collective of the stream, or the others hang.
        raise WeightSyncError(f"{type(engine).__name__}.update_weights stopped before the end "
                              "of the weight stream")


def _sent_checksums(stream: WeightStream) -> Dict:
    per_rank: List[Optional[Dict]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(per_rank, stream.source_checksums())
    return {name: value for sent in per_rank for name, value in sent.items()}


def push_weights(engine: RolloutEngine, chunks: list, model: ModelConfig,
                 config: WeightSyncConfig) -> Dict[str, float]:
    """Stream this rank's megatron ``chunks`` (DDP-wrapped or not) into ``engine``; every
    rank of the world calls it. Returns ``seconds`` (the stream), ``bytes`` (broadcast),
    ``version`` (the engine's new weight version), ``parity_seconds`` and
    ``max_abs_logprob_diff`` (nan when the check is off), on every rank."""
    config.validate()
    gpt_chunks = [unwrapped(c) for c in chunks]
    plan = cached_plan(gpt_chunks, model, config.bucket_bytes)
    device = next(gpt_chunks[0].parameters()).device
    stream = WeightStream(plan, gpt_chunks, model, cached_transport(config.transport, plan, device))
    _synchronize()
    started = time.perf_counter()
    _stream_into(engine, stream)
    _synchronize()
    seconds = time.perf_counter() - started
    version = engine.weight_version + 1
    engine.set_weight_version(version)
    engine.wake()
    metrics = {"seconds": seconds, "bytes": float(plan.total_bytes), "version": float(version),
               "parity_seconds": 0.0, "max_abs_logprob_diff": float("nan")}
    if config.check_parity:
        started = time.perf_counter()
        metrics["max_abs_logprob_diff"] = check_parity(engine, chunks, model, config, stream)
        metrics["parity_seconds"] = time.perf_counter() - started
    return metrics


def check_parity(engine: RolloutEngine, chunks: Sequence, model: ModelConfig,
                 config: WeightSyncConfig, stream: WeightStream) -> float:
    """The largest probe log-prob difference over all ranks; raises ``WeightSyncError``
    (on every rank) above ``config.parity_tolerance``."""
    probes = probe_token_ids(model.vocab_size, config.num_probe_sequences, config.probe_length,
                             config.probe_seed)
    trainer = trainer_token_logprobs(chunks, probes, model.vocab_size)
    local = max(max_abs_difference(scores, trainer)
                for scores in engine.score_each_replica(probes))
    worst = torch.tensor([local], dtype=torch.float64,
                         device=next(unwrapped(chunks[0]).parameters()).device)
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    worst_value = float(worst.item())
    if not worst_value <= config.parity_tolerance:  # nan fails too
        raise WeightSyncError(_parity_failure(engine, config, stream, worst_value))
    return worst_value


def _parity_failure(engine: RolloutEngine, config: WeightSyncConfig, stream: WeightStream,
                    worst: float) -> str:
    order = stream.plan.hf_names
    local = first_differing_tensor(order, _sent_checksums(stream), engine.weight_checksums(order))
    per_rank: List[Optional[str]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(per_rank, local)
    position = {name: index for index, name in enumerate(order)}
    named = sorted(((position[n], rank, n) for rank, n in enumerate(per_rank) if n is not None))
    where = (f"first tensor whose checksum differs between what was sent and what the engine "
             f"holds: {named[0][2]} (rank {named[0][1]})" if named else
             "every tensor's checksum matches what was sent, so the engine computes differently "
             "(dtype, kernels), or the tolerance is too tight")
    return (f"weight sync v{engine.weight_version}: probe log-probs differ from the trainer's "
            f"by {worst:.3g} > weight_sync.parity_tolerance={config.parity_tolerance}; {where}")

