"""The DPO forward step megatron's pipeline schedule runs for each micro-batch of pairs."""

from megatron_tpo.train.config import DPOTrainingConfig
from megatron_tpo.train.losses import dpo_loss
from megatron_tpo.train.pipeline_step import position_ids, unwrapped
from megatron_tpo.train.policy_logprobs import pair_logprobs


def dpo_forward_step(training: DPOTrainingConfig, vocab_size: int):
    """``forward_step(data_iterator, model)`` whose loss is the DPO (or IPO) loss of a
    micro-batch of pairs; its metrics are the means over the micro-batch's pairs."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch.input_ids, position_ids(batch.input_ids), None)

        def loss_func(hidden_states):
            chosen, rejected = pair_logprobs(
                unwrapped(model), hidden_states, batch, vocab_size,
                deterministic=training.logprob_kernel_deterministic)
            reference = batch.reference_logprobs
            result = dpo_loss(chosen, rejected, reference[: batch.num_pairs],
                              reference[batch.num_pairs:], beta=training.beta,
                              loss_type=training.loss_type,
                              label_smoothing=training.label_smoothing)
            # clone: the schedule divides the returned loss in place, and the loss
            # metric shares its storage.
            return result.loss, {name: value.clone() for name, value in result.metrics.items()}

        return output, loss_func

    return forward_step
