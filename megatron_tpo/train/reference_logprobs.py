"""Reference log-probs of every pair under the frozen iteration-start model.

DPO compares the policy against the model the iteration started from, M_t. Before the
first step of an iteration the policy *is* M_t, so one forward-only pass of the same
chunks over the iteration's pairs gives the reference values, and no second copy of
the weights is ever held. They are stored with the pairs (and reused every epoch).
"""

import dataclasses
import functools
from typing import List, Sequence

import torch

from megatron_tpo.train.dpo_batch import PairMicroBatch, TokenizedPair
from megatron_tpo.train.policy_logprobs import pair_logprobs
from megatron_tpo.train.pipeline_step import collecting_forward_step, forward_only, from_last_stage


def _pair_logprobs(gpt_model, hidden_states, batch, vocab_size: int):
    chosen, rejected = pair_logprobs(gpt_model, hidden_states, batch, vocab_size)
    return {"chosen": chosen, "rejected": rejected}


def reference_pair_logprobs(chunks: List, micro_batches: Sequence[PairMicroBatch],
                            vocab_size: int) -> torch.Tensor:
    """[pairs, 2] float64 (chosen, rejected) sequence log-probs, on every rank.

    ``chunks`` are this rank's model chunks (DDP-wrapped or not); all micro-batches
    share one sequence length, as the pipeline needs.
    """
    from megatron.core import parallel_state

    step = collecting_forward_step(functools.partial(_pair_logprobs, vocab_size=vocab_size))
    per_micro_batch = forward_only(chunks, step, micro_batches, micro_batches[0].seq_length,
                                   2 * micro_batches[0].num_pairs)
    device = micro_batches[0].input_ids.device
    pairs = sum(batch.num_pairs for batch in micro_batches)
    values = torch.zeros(pairs, 2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        values = torch.stack([torch.cat([m["chosen"] for m in per_micro_batch]),
                              torch.cat([m["rejected"] for m in per_micro_batch])], dim=1).double()
    # Only the last stage computed them; every stage stores the pairs.
    return from_last_stage(values).cpu()


def with_reference_logprobs(pairs: Sequence[TokenizedPair],
                            values: torch.Tensor) -> List[TokenizedPair]:
    """Copies of ``pairs`` carrying the [pairs, 2] reference log-probs."""
    return [dataclasses.replace(pair, reference_chosen=chosen, reference_rejected=rejected)
            for pair, (chosen, rejected) in zip(pairs, values.tolist())]
