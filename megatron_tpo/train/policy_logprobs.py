"""Per-token log-probs of the targets straight from megatron's last hidden states.

The fused kernel reads the final hidden states and the output-layer weight shard and
never builds the [tokens, vocab] logits (2 GiB per 4096-token sequence at Llama-3's
128K vocab in fp32). So the post-process stage's output layer must hand its input
through instead of multiplying it by the weight.
"""

import torch

from megatron_tpo.kernels.logprob import fused_target_logprobs
from megatron_tpo.train.dpo_batch import PairMicroBatch
from megatron_tpo.train.losses import sequence_logprobs


def return_hidden_states_from_output_layer(gpt_model) -> None:
    """Make this ``GPTModel`` chunk's forward return [batch, seq, hidden] final hidden states.

    Only the output layer instance's ``forward`` is replaced: the module and its weight
    stay where they are, so parameter names, DDP's grad buffers, the optimizer and
    checkpoints see the same model, and the weight still gets its gradient, through the
    kernel instead of the matmul. GPTModel transposes the layer's output to batch-first
    as it would the logits. Chunks without the post-process stage are left alone.
    """
    if not gpt_model.post_process:
        return
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    output_layer = gpt_model.output_layer
    gather_sequence = gpt_model.config.sequence_parallel

    def hidden_states_instead_of_logits(hidden_states, weight=None, runtime_gather_output=None):
        if gather_sequence:
            # Each TP rank holds a slice of the sequence; the kernel needs every token on
            # every rank. Its backward already sums the hidden gradient over the TP group,
            # so the gather's backward must only keep this rank's slice: the default
            # reduce-scatter (right for the logits matmul's partial gradients) would add
            # the TP ranks' identical full gradients up once more.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        return hidden_states, None

    output_layer.forward = hidden_states_instead_of_logits


def true_vocab_weight_shard(gpt_model, vocab_size: int):
    """``(weight rows of the true vocab held by this rank, vocab_start)``.

    Megatron pads the vocab so every TP rank holds as many rows; the padding rows are
    untrained and must take no probability mass, so they are cut off here.
    """
    from megatron.core import parallel_state

    # Tied embeddings: the output layer has no weight of its own at PP=1 and a copy of
    # the embedding at PP > 1; megatron names either one this way.
    weight = gpt_model.shared_embedding_or_output_weight() if (
        gpt_model.share_embeddings_and_output_weights) else gpt_model.output_layer.weight
    rows_per_rank = weight.shape[0]
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * rows_per_rank
    true_rows = min(rows_per_rank, vocab_size - vocab_start)
    if true_rows <= 0:
        raise ValueError(f"TP rank's vocab shard [{vocab_start}, {vocab_start + rows_per_rank}) "
                         f"holds only padding (vocab {vocab_size}); lower "
                         "make_vocab_size_divisible_by")
    if true_rows == rows_per_rank:
        # No slice, no SliceBackward: it would allocate a zero [rows, hidden] gradient
        # to scatter into on every rank, though only the last one holds padding.
        return weight, vocab_start
    return weight[:true_rows], vocab_start


def token_logprobs(gpt_model, hidden_states: torch.Tensor, batch: PairMicroBatch,
                   vocab_size: int, deterministic: bool = True) -> torch.Tensor:
    """[2P, L] float32 log-probs of ``batch.targets``, 0 where the loss mask is 0.

    ``deterministic``: the kernel's gradients have the same bits on every run
    (``train.logprob_kernel_deterministic``); False lets its GPU backward use atomics.
    """
    from megatron.core import parallel_state

    weight, vocab_start = true_vocab_weight_shard(gpt_model, vocab_size)
    tp_group = (parallel_state.get_tensor_model_parallel_group()
                if parallel_state.get_tensor_model_parallel_world_size() > 1 else None)
    return fused_target_logprobs(hidden_states, weight, batch.targets, mask=batch.loss_mask,
                                 tp_group=tp_group, vocab_start=vocab_start,
                                 deterministic=deterministic)


def pair_logprobs(gpt_model, hidden_states: torch.Tensor, batch: PairMicroBatch,
                  vocab_size: int, deterministic: bool = True):
    """``(chosen, rejected)``: [P] sums of thought+response log-probs of each pair."""
    sums = sequence_logprobs(
        token_logprobs(gpt_model, hidden_states, batch, vocab_size, deterministic),
        batch.loss_mask)
    return sums[: batch.num_pairs], sums[batch.num_pairs:]
