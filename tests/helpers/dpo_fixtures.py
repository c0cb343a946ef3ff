"""A DPO trainer on random token pairs, for the tests that train, save and load one;
the DPO and IPO losses from the papers, in float64, for the tests that check one."""

import numpy as np
import torch

from megatron_tpo.config import ParallelConfig

from megatron_tpo.train.config import DPOTrainingConfig
from megatron_tpo.train.dpo_batch import TokenizedPair

# Warm-up and clipping on, so a resumed schedule or optimizer state shows in the steps.
TRAINING = DPOTrainingConfig(beta=0.5, lr=2e-3, warmup_steps=2, train_steps=8,
                             micro_batch_pairs=1, pad_to_multiple_of=8, clip_grad=1.0)


def random_pairs(vocab_size: int, count: int = 4, seed: int = 3,
                 completion_lengths=(3, 10)):
    """``count`` pairs of random token ids: prompts of 2 to 5 tokens, completions with
    lengths drawn from ``range(*completion_lengths)``."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        length = int(torch.randint(low, high, (), generator=generator))
        return torch.randint(0, vocab_size, (length,), generator=generator).tolist()

    return [TokenizedPair(prompt=tokens(2, 6), chosen=tokens(*completion_lengths),
                          rejected=tokens(*completion_lengths))
            for _ in range(count)]


def start_trainer(model, sizes, seed):
    """Megatron at (tp, pp, vpp) in the running process group, and a fresh trainer."""
    from megatron_tpo.parallel import init_megatron
    from megatron_tpo.train.dpo_trainer import DPOTrainer

    tp, pp, vpp = sizes
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    init_megatron(parallel, model, seed=seed)
    return DPOTrainer(model, parallel, TRAINING)


def my_pairs(pairs, reference):
    """This DP rank's share of the pairs, carrying the given reference log-probs."""
    from megatron.core import parallel_state

    from megatron_tpo.train.reference_logprobs import with_reference_logprobs

    dp_rank = parallel_state.get_data_parallel_rank()
    share = len(pairs) // parallel_state.get_data_parallel_world_size()
    mine = slice(dp_rank * share, (dp_rank + 1) * share)
    return with_reference_logprobs(pairs[mine], reference[mine])


def trainer_weights(trainer):
    """Copies of every parameter of the trainer's model chunks, in order."""
    return [p.detach().clone() for chunk in trainer.chunks for p in chunk.parameters()]


def numpy_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type,
              label_smoothing):
    """Per-pair loss and its derivative by the chosen policy log-prob, from the papers."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    sigmoid = 1 / (1 + np.exp(-beta * h))
    if loss_type == "sigmoid":
        loss = ((1 - label_smoothing) * np.logaddexp(0, -beta * h)
                + label_smoothing * np.logaddexp(0, beta * h))
        dloss_dh = beta * (-(1 - label_smoothing) * (1 - sigmoid) + label_smoothing * sigmoid)
    else:
        loss = (h - 1 / (2 * beta)) ** 2
        dloss_dh = 2 * (h - 1 / (2 * beta))
    return loss, dloss_dh
