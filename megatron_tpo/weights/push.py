"""The trainer's live weights into every rank's rollout engine, checked.

    push = WeightPush(trainer.chunks, model, WeightSyncConfig())
    push.stream_into(engine)              # the loop's weight-sync phase: weights only
    push.check_parity(engine, probes)     # its parity-check phase: the engine awake
    metrics = push_weights(engine, trainer.chunks, model, config, probes)   # both, outside a run

A collective over the default process group: each rank streams the model as HF-named
full tensors (``WeightStream``) into its own engine, the engine's weight version goes
up by one, and (unless switched off) a parity check scores the probe sequences on both
sides, against a tolerance for the trainer's precision. A check that fails raises
``WeightSyncError`` on every rank, naming the measured difference, the tolerance and the
first tensor whose checksum differs between what was sent and what the engine holds.
Each sync returns the measured difference, so the metrics show a drift before it fails.
"""

import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_tpo.config import ModelConfig
from megatron_tpo.rollout.engine import RolloutEngine
from megatron_tpo.train.pipeline_step import unwrapped
from megatron_tpo.weights.config import WeightSyncConfig
from megatron_tpo.weights.parity import (abs_differences, first_differing_tensor,
                                         trainer_token_logprobs)
from megatron_tpo.weights.stream import WeightStream, cached_plan
from megatron_tpo.weights.transports import cached_transport


class WeightSyncError(RuntimeError):
    """The engine does not compute what the trainer computes after a weight sync."""


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


def check_probes(probes: Optional[Sequence[Sequence[int]]]) -> None:
    """The parity check needs token ids of real text, all of one length."""
    if not probes or len({len(p) for p in probes}) != 1:
        raise ValueError("weight_sync.check_parity=true needs probes: token ids of real text "
                         "of one length (parity.text_probes of the run's chat prompts), got "
                         f"{None if probes is None else [len(p) for p in probes]}")


class WeightPush:
    """The trainer's weights into an engine in the loop's two phases: ``stream_into`` while
    the engine holds only its weights (no KV cache beside two copies of them), then
    ``check_parity`` once it is awake. Every rank of the world calls both, together, with
    the same ``probes`` (token ids of real text, one length: ``parity.text_probes``),
    which the trainer scores padded to ``pad_to_multiple_of`` (its
    ``train.pad_to_multiple_of``) and to what its FP8 and sequence parallelism need."""

    def __init__(self, chunks: list, model: ModelConfig, config: WeightSyncConfig,
                 pad_to_multiple_of: int = 1):
        config.validate()
        self.chunks, self.model, self.config = chunks, model, config
        self.pad_to_multiple_of = pad_to_multiple_of
        self.stream: Optional[WeightStream] = None

    def stream_into(self, engine: RolloutEngine) -> Dict[str, float]:
        """Stream this rank's megatron ``chunks`` (DDP-wrapped or not) into ``engine`` and
        raise its weight version. Returns ``seconds`` (the stream), ``bytes`` (broadcast)
        and ``version`` (the engine's new weight version)."""
        gpt_chunks = [unwrapped(c) for c in self.chunks]
        plan = cached_plan(gpt_chunks, self.model, self.config.bucket_bytes)
        device = next(gpt_chunks[0].parameters()).device
        self.stream = WeightStream(plan, gpt_chunks, self.model,
                                   cached_transport(self.config.transport, plan, device))
        _synchronize()
        started = time.perf_counter()
        _stream_into(engine, self.stream)
        _synchronize()
        version = engine.weight_version + 1
        engine.set_weight_version(version)
        return {"seconds": time.perf_counter() - started, "bytes": float(plan.total_bytes),
                "version": float(version)}

    def check_parity(self, engine: RolloutEngine,
                     probes: Optional[Sequence[Sequence[int]]]) -> Dict[str, float]:
        """``parity_seconds`` and, from the parity check, ``max_abs_logprob_diff`` (over
        all ranks' replicas), ``mean_abs_logprob_diff`` (the worst replica's),
        ``parity_tolerance`` (the bound used) and ``parity_probe_tokens`` (log-probs
        compared per replica); nan and 0 when ``check_parity`` is off."""
        config = self.config
        metrics = {"parity_seconds": 0.0, "max_abs_logprob_diff": float("nan"),
                   "mean_abs_logprob_diff": float("nan"), "parity_tolerance": float("nan"),
                   "parity_probe_tokens": 0.0}
        if not config.check_parity:
            return metrics
        check_probes(probes)
        started = time.perf_counter()
        metrics.update(check_parity(engine, self.chunks, self.model, config, self.stream, probes,
                                    self.pad_to_multiple_of))
        metrics["parity_seconds"] = time.perf_counter() - started
        return metrics


def push_weights(engine: RolloutEngine, chunks: list, model: ModelConfig,
                 config: WeightSyncConfig, probes: Optional[Sequence[Sequence[int]]] = None,
                 pad_to_multiple_of: int = 1) -> Dict[str, float]:
    """``WeightPush``'s two steps with the engine woken for each, outside a run's placement
    (tests, benchmarks): the weights, the stream, the whole engine, the parity check. The
    engine is awake afterwards. Returns both steps' metrics."""
    push = WeightPush(chunks, model, config, pad_to_multiple_of)
    if config.check_parity:
        check_probes(probes)   # before any stream
    engine.wake_weights()
    metrics = push.stream_into(engine)
    engine.wake()
    metrics.update(push.check_parity(engine, probes))
    return metrics


def trainer_precision(chunks: Sequence) -> Tuple[torch.dtype, bool]:
    """The trainer's parameter dtype and whether its GEMMs run in FP8."""
    gpt = unwrapped(chunks[0])
    return next(gpt.parameters()).dtype, bool(getattr(gpt.config, "fp8", None))


def check_parity(engine: RolloutEngine, chunks: Sequence, model: ModelConfig,
                 config: WeightSyncConfig, stream: WeightStream,
                 probes: Sequence[Sequence[int]], pad_to_multiple_of: int = 1
                 ) -> Dict[str, float]:
    """The probe log-prob difference over all ranks (max, and the worst replica's mean);
    raises ``WeightSyncError`` (on every rank) above the tolerance for the trainer's
    precision."""
    dtype, fp8 = trainer_precision(chunks)
    name, tolerance = config.tolerance_for(dtype, fp8)
    trainer = trainer_token_logprobs(chunks, probes, model.vocab_size, pad_to_multiple_of)
    per_replica = [abs_differences(scores, trainer)
                   for scores in engine.score_each_replica(probes)]
    worst = torch.tensor([max(d[0] for d in per_replica), max(d[1] for d in per_replica)],
                         dtype=torch.float64,
                         device=next(unwrapped(chunks[0]).parameters()).device)
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    worst_max, worst_mean = (float(value) for value in worst.tolist())
    if not worst_max <= tolerance:  # nan fails too
        measured = (f"{worst_max:.3g} (mean {worst_mean:.3g}) > {name}={tolerance} "
                    f"({'fp8' if fp8 else str(dtype).replace('torch.', '')} trainer)")
        raise WeightSyncError(_parity_failure(engine, stream, measured))
    return {"max_abs_logprob_diff": worst_max, "mean_abs_logprob_diff": worst_mean,
            "parity_tolerance": tolerance, "parity_probe_tokens": float(trainer.numel())}


def _parity_failure(engine: RolloutEngine, stream: WeightStream, measured: str) -> str:
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
            f"by {measured}; {where}")

