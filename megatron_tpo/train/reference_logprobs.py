"""Reference log-probs of every pair under the frozen iteration-start model.

DPO compares the policy against the model the iteration started from, M_t. Before the
first step of an iteration the policy *is* M_t, so one forward-only pass of the same
chunks over the iteration's pairs gives the reference values, and no second copy of
the weights is ever held. They are stored with the pairs (and reused every epoch).
"""

import dataclasses
from typing import List, Sequence

import torch

from megatron_tpo.train.dpo_batch import PairMicroBatch, TokenizedPair
from megatron_tpo.train.policy_logprobs import pair_logprobs
from megatron_tpo.train.pipeline_step import position_ids, unwrapped


def _reference_forward_step(vocab_size: int):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch.input_ids, position_ids(batch.input_ids), None)

        def collect(hidden_states):
            chosen, rejected = pair_logprobs(unwrapped(model), hidden_states, batch, vocab_size)
            # The schedule divides the returned loss in place, so it gets its own zero.
            return hidden_states.new_zeros(()), {"chosen": chosen, "rejected": rejected}

        return output, collect

    return forward_step


def reference_pair_logprobs(chunks: List, micro_batches: Sequence[PairMicroBatch],
                            vocab_size: int) -> torch.Tensor:
    """[pairs, 2] float64 (chosen, rejected) sequence log-probs, on every rank.

    ``chunks`` are this rank's model chunks (DDP-wrapped or not); all micro-batches
    share one sequence length, as the pipeline needs.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = chunks if len(chunks) > 1 else chunks[0]
    iterators = [iter(micro_batches) for _ in chunks]
    with torch.no_grad():
        per_micro_batch = get_forward_backward_func()(
            forward_step_func=_reference_forward_step(vocab_size),
            data_iterator=iterators if len(chunks) > 1 else iterators[0], model=model,
            num_microbatches=len(micro_batches), seq_length=micro_batches[0].seq_length,
            micro_batch_size=2 * micro_batches[0].num_pairs, forward_only=True,
        )
    device = micro_batches[0].input_ids.device
    pairs = sum(batch.num_pairs for batch in micro_batches)
    values = torch.zeros(pairs, 2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        values = torch.stack([torch.cat([m["chosen"] for m in per_micro_batch]),
                              torch.cat([m["rejected"] for m in per_micro_batch])], dim=1).double()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # Only the last stage computed them; every stage stores the pairs.
        torch.distributed.broadcast(
            values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group())
    return values.cpu()


def with_reference_logprobs(pairs: Sequence[TokenizedPair],
                            values: torch.Tensor) -> List[TokenizedPair]:
    """Copies of ``pairs`` carrying the [pairs, 2] reference log-probs."""
    return [dataclasses.replace(pair, reference_chosen=chosen, reference_rejected=rejected)
            for pair, (chosen, rejected) in zip(pairs, values.tolist())]
