"""Preference pairs as DPO micro-batches: chosen and rejected of a pair side by side.

A micro-batch of P pairs is 2P sequences, the P chosen ones first, then the P rejected
ones in the same pair order, so one forward pass yields both halves of every pair and
the loss needs no communication. Each sequence is prompt + completion (thought and
response), shifted by one into inputs and targets and right-padded; the loss mask
keeps only the targets that are completion tokens.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from megatron_tpo.config import ConfigError
from megatron_tpo.train.losses import completion_mask


@dataclass
class TokenizedPair:
    prompt: Sequence[int]
    chosen: Sequence[int]    # thought + response tokens of the preferred output
    rejected: Sequence[int]
    # Sequence log-probs under the frozen iteration-start model, once computed.
    reference_chosen: Optional[float] = None
    reference_rejected: Optional[float] = None


def tokenized_pairs(rows: Sequence[dict]) -> List[TokenizedPair]:
    """DPO trains on exactly the token ids the policy sampled, never on re-tokenized text."""
    return [TokenizedPair(prompt=row["prompt_token_ids"], chosen=row["chosen_token_ids"],
                          rejected=row["rejected_token_ids"],
                          reference_chosen=row.get("reference_chosen"),
                          reference_rejected=row.get("reference_rejected")) for row in rows]


@dataclass
class PairMicroBatch:
    input_ids: torch.Tensor   # [2P, L]
    targets: torch.Tensor     # [2P, L], input_ids shifted by one
    loss_mask: torch.Tensor   # [2P, L], 1 on thought+response targets
    reference_logprobs: Optional[torch.Tensor]  # [2P] float64, or None before computed

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def seq_length(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> "PairMicroBatch":
        reference = self.reference_logprobs
        return PairMicroBatch(self.input_ids.to(device), self.targets.to(device),
                              self.loss_mask.to(device),
                              None if reference is None else reference.to(device))


def padded_length(pairs: Sequence[TokenizedPair], pad_to_multiple_of: int) -> int:
    """Input length that holds every sequence of ``pairs`` (minus its last token), rounded up."""
    longest = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs) - 1
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of


def _check_pair(index: int, pair: TokenizedPair) -> None:
    if not pair.prompt:
        raise ValueError(f"pair {index}: empty prompt; the first completion token needs a "
                          "prompt token to be predicted from")
    if not pair.chosen or not pair.rejected:
        raise ValueError(f"pair {index}: empty chosen or rejected completion")


def pair_micro_batch(pairs: Sequence[TokenizedPair], seq_length: int,
                     pad_token_id: int = 0) -> PairMicroBatch:
    """One micro-batch of ``len(pairs)`` pairs padded to ``seq_length`` inputs."""
    sequences, prompt_lengths = [], []
    for half in ("chosen", "rejected"):
        for pair in pairs:
            sequences.append(list(pair.prompt) + list(getattr(pair, half)))
            prompt_lengths.append(len(pair.prompt))
    lengths = torch.tensor([len(s) for s in sequences])
    if int(lengths.max()) - 1 > seq_length:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit "
                          f"seq_length={seq_length} inputs")
    tokens = torch.full((len(sequences), seq_length + 1), pad_token_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    mask = completion_mask(torch.tensor(prompt_lengths), lengths, seq_length)

    references = [(p.reference_chosen, p.reference_rejected) for p in pairs]
    known = [r is not None for ref in references for r in ref]
    if any(known) and not all(known):
        raise ValueError("some pairs carry reference log-probs and some do not; compute "
                          "them for all pairs of the iteration")
    reference = None
    if all(known):
        reference = torch.tensor([c for c, _ in references] + [r for _, r in references],
                                 dtype=torch.float64)
    return PairMicroBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask,
                          reference)


def pair_micro_batches(pairs: Sequence[TokenizedPair], pairs_per_micro_batch: int,
                       pad_to_multiple_of: int = 1, pad_token_id: int = 0,
                       max_seq_length: Optional[int] = None) -> List[PairMicroBatch]:
    """Split ``pairs`` into micro-batches that share one padded length.

    The pipeline schedule sends activations of one fixed shape, so every micro-batch of
    a step must have the same sequence length.
    """
    if not pairs:
        raise ValueError("no preference pairs to batch")
    if len(pairs) % pairs_per_micro_batch:
        raise ConfigError(f"{len(pairs)} pairs do not split into micro-batches of "
                          f"train.micro_batch_pairs={pairs_per_micro_batch}")
    for index, pair in enumerate(pairs):
        _check_pair(index, pair)
    seq_length = padded_length(pairs, pad_to_multiple_of)
    if max_seq_length is not None and seq_length > max_seq_length:
        raise ConfigError(f"pairs need {seq_length} input positions (padded to a multiple of "
                          f"{pad_to_multiple_of}), more than the model's "
                          f"max_position_embeddings={max_seq_length}")
    return [pair_micro_batch(pairs[start:start + pairs_per_micro_batch], seq_length, pad_token_id)
            for start in range(0, len(pairs), pairs_per_micro_batch)]
