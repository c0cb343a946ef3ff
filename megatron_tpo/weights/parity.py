"""After a weight sync, does the engine compute what the trainer computes?

A few fixed probe sequences of real text (the run's first chat prompts, tokenized) are
scored by both: the trainer through a forward-only pass of megatron's pipeline schedule
and the fused log-prob kernel (the numbers DPO trains on), the engine through
``RolloutEngine.score``. Real text, because random ids hit tokens no training ever
touched (Llama-3's reserved ids), whose log-probs say nothing of the model DPO trains.
When they differ by more than a tolerance, the per-tensor checksums of what was sent
and what the engine holds name the first tensor that differs.

The trainer's GPU kernels refuse some shapes its CPU twin accepts: FP8 GEMMs want token
rows in multiples of 8 and sequence parallelism a sequence the TP size divides. So the
probes enter the trainer right-padded as its DPO micro-batches are, the padded targets
masked out and dropped; the engine scores them unpadded.
"""

import contextlib
import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_tpo.train.dpo_batch import PairMicroBatch
from megatron_tpo.train.fp8 import token_rows_multiple
from megatron_tpo.train.pipeline_step import (collecting_forward_step, forward_only,
                                          from_last_stage, unwrapped)


def text_probes(tokenizer, texts: Sequence[str], count: int, length: int) -> List[List[int]]:
    """The token ids of the first ``count`` texts (chat-formatted: the template brings its
    own special tokens), all cut to the shortest one's length and at most ``length``: the
    trainer scores probes of one length. The same on every rank for the same texts."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts[:count]]
    if not ids or min(len(sequence) for sequence in ids) < 2:
        raise ValueError(f"parity probes need at least 2 tokens each (the first is only "
                         f"context); got lengths {[len(sequence) for sequence in ids]}")
    common = min(length, *(len(sequence) for sequence in ids))
    return [list(sequence[:common]) for sequence in ids]


@contextlib.contextmanager
def _hidden_states_from_output_layers(gpt_chunks: Sequence):
    """Output layers hand back hidden states for the fused kernel while inside; chunks
    the trainer already set up that way stay as they are."""
    from megatron_tpo.train.policy_logprobs import return_hidden_states_from_output_layer

    patched = [c for c in gpt_chunks
               if c.post_process and "forward" not in vars(c.output_layer)]
    for chunk in patched:
        return_hidden_states_from_output_layer(chunk)
    try:
        yield
    finally:
        for chunk in patched:
            del chunk.output_layer.forward


def _token_logprobs(gpt_model, hidden_states, batch, vocab_size: int):
    from megatron_tpo.train.policy_logprobs import token_logprobs

    return {"logprobs": token_logprobs(gpt_model, hidden_states, batch, vocab_size)}


def probe_length_multiple(gpt_config, tensor_parallel_size: int,
                          pad_to_multiple_of: int = 1) -> int:
    """The multiple of tokens a probe (one sequence per micro-batch) is padded to for the
    trainer's forward under its megatron ``gpt_config``: the trainer's own
    ``train.pad_to_multiple_of``; sequence parallelism splits each sequence evenly over
    the TP ranks (megatron-core asserts it); FP8 GEMMs see one rank's slice, whose token
    rows TE wants in multiples of 8 (32 for MXFP8). The trainer's multiple alone is not
    enough: its FP8 check counts both sequences of a pair per micro-batch."""
    split = tensor_parallel_size if gpt_config.sequence_parallel else 1
    rows = token_rows_multiple(gpt_config.fp8_recipe) if gpt_config.fp8 else 1
    return math.lcm(pad_to_multiple_of, split * rows)


def _probe_micro_batch(sequence: Sequence[int], seq_length: int, device) -> PairMicroBatch:
    """``sequence`` as one micro-batch of ``seq_length`` inputs: right-padded (causal
    attention keeps the padding from every real token), its padded targets masked out."""
    real = len(sequence) - 1
    tokens = torch.zeros(1, seq_length + 1, dtype=torch.long, device=device)
    tokens[0, :len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
    loss_mask = torch.zeros(1, seq_length, dtype=torch.long, device=device)
    loss_mask[0, :real] = 1
    return PairMicroBatch(input_ids=tokens[:, :-1], targets=tokens[:, 1:],
                          loss_mask=loss_mask, reference_logprobs=None)


def trainer_token_logprobs(chunks: Sequence, token_ids: Sequence[Sequence[int]],
                           vocab_size: int, pad_to_multiple_of: int = 1) -> torch.Tensor:
    """[sequences, length - 1] float64 per-token log-probs under this rank's model replica,
    on every rank (a collective over the pipeline; sequences of one length). The sequences
    enter padded to ``probe_length_multiple`` (``pad_to_multiple_of``: the trainer's
    ``train.pad_to_multiple_of``); only their real targets come back."""
    from megatron.core import parallel_state

    gpt_chunks = [unwrapped(c) for c in chunks]
    device = next(gpt_chunks[0].parameters()).device
    # One sequence per micro-batch. The interleaved schedule wants a multiple of the
    # pipeline size of them: the first probes come round again, their repeats dropped.
    count = len(token_ids)
    if len(chunks) > 1:
        stages = parallel_state.get_pipeline_model_parallel_world_size()
        token_ids = [token_ids[i % count] for i in range(-(-count // stages) * stages)]
    targets = len(token_ids[0]) - 1
    multiple = probe_length_multiple(
        gpt_chunks[0].config, parallel_state.get_tensor_model_parallel_world_size(),
        pad_to_multiple_of)
    seq_length = -(-targets // multiple) * multiple
    batches = [_probe_micro_batch(sequence, seq_length, device) for sequence in token_ids]
    step = collecting_forward_step(functools.partial(_token_logprobs, vocab_size=vocab_size))
    with _hidden_states_from_output_layers(gpt_chunks):
        per_micro_batch = forward_only(chunks, step, batches, seq_length, micro_batch_size=1)
    values = torch.zeros(len(batches), seq_length, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        values = torch.cat([m["logprobs"] for m in per_micro_batch]).double()
    values = from_last_stage(values)
    return values[:count, :targets].cpu()


def abs_differences(engine_values: Sequence[Sequence[float]], trainer_values: torch.Tensor
                    ) -> Tuple[float, float]:
    """``(max, mean)`` of |engine - trainer| over every probe token's log-prob; a NaN on
    either side counts as an infinite difference."""
    engine = torch.tensor(engine_values, dtype=torch.float64)
    if engine.shape != trainer_values.shape:
        raise ValueError(f"engine scored {tuple(engine.shape)} log-probs, the trainer "
                         f"{tuple(trainer_values.shape)}")
    difference = (engine - trainer_values).abs()
    # inf, not NaN: the check takes the max over replicas (Python's max) and over ranks
    # (a MAX all-reduce), and both may drop a NaN operand (gloo's MAX does), passing it.
    difference = torch.where(difference.isnan(), math.inf, difference)
    return float(difference.max()), float(difference.mean())


def _differs(sent: Tuple[float, float], held: Tuple[float, float], rtol: float = 1e-6) -> bool:
    scale = math.sqrt(abs(sent[1])) + abs(sent[0])
    return abs(sent[0] - held[0]) > rtol * scale or abs(sent[1] - held[1]) > rtol * abs(sent[1])


def first_differing_tensor(order: Sequence[str], sent: Dict[str, Tuple[float, float]],
                           held: Dict[str, Tuple[float, float]]) -> Optional[str]:
    """The first name (in stream order) whose checksum the engine does not hold, or None."""
    for name in order:
        if name not in held or _differs(sent[name], held[name]):
            return name
    return None
