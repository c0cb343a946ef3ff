"""train/dpo_step.py: the forward step megatron's schedule runs per micro-batch of pairs.
Its loss is the DPO (or IPO) loss of the completions' summed log-probs, read straight
from the last hidden states through the fused kernel with the training's settings; its
metrics survive the schedule dividing the loss in place. Megatron's TP state is faked
as one rank (no process group); the model is what the step reads of a GPTModel."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_tpo.kernels import fused_target_logprobs
from megatron_tpo.train import policy_logprobs
from megatron_tpo.train.config import load_training_config
from megatron_tpo.train.dpo_batch import TokenizedPair, pair_micro_batches
from megatron_tpo.train.dpo_step import dpo_forward_step

from dpo_fixtures import numpy_dpo


@pytest.fixture(autouse=True)
def one_tensor_parallel_rank(monkeypatch):
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 0)


class Model(SimpleNamespace):  # what the step reads of a GPTModel, and its call
    def __call__(self, *inputs):
        return None


@pytest.mark.parametrize("deterministic", [True, False])
def test_training_setting_reaches_the_kernel(monkeypatch, deterministic):
    """train.logprob_kernel_deterministic, loaded from configs/train/dpo.yaml with an
    override, is what the DPO forward step hands fused_target_logprobs; the loss
    still comes out (TP=1 faked in megatron's parallel_state, no process group)."""
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("deterministic", "not passed"))
        return fused_target_logprobs(*args, **kwargs)
    monkeypatch.setattr(policy_logprobs, "fused_target_logprobs", recording)

    training = load_training_config("dpo", logprob_kernel_deterministic=deterministic)
    vocab, hidden_size = 11, 8
    pair = TokenizedPair([1, 2], [3, 4, 5], [6, 7], reference_chosen=-3.0,
                         reference_rejected=-2.0)
    batch = pair_micro_batches([pair], 1)[0]

    model = Model(share_embeddings_and_output_weights=False,
                  output_layer=SimpleNamespace(weight=torch.randn(vocab, hidden_size)))
    _, loss_func = dpo_forward_step(training, vocab)(iter([batch]), model)
    hidden = torch.randn(*batch.input_ids.shape, hidden_size)
    loss, metrics = loss_func(hidden)
    assert seen == [deterministic]
    assert torch.isfinite(loss) and "rewards/margin" in metrics


PAIRS = [TokenizedPair([1, 2], [3, 4, 5], [6, 7], reference_chosen=-9.0, reference_rejected=-7.5),
         TokenizedPair([8], [9, 10], [11, 12, 2, 3], reference_chosen=-6.0,
                       reference_rejected=-12.0)]


def _completion_logprob(logprobs: torch.Tensor, row: int, prompt, completion) -> float:
    """Sum of log p(token | the tokens before it) over the completion's tokens."""
    sequence = list(prompt) + list(completion)
    return sum(logprobs[row, position - 1, sequence[position]].item()
               for position in range(len(prompt), len(sequence)))


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_the_loss_is_dpo_of_the_completions_log_probs(loss_type, beta):
    vocab, hidden_size = 13, 8
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden_size, generator=generator)
    batch = pair_micro_batches(PAIRS, 2)[0]
    hidden = torch.randn(*batch.input_ids.shape, hidden_size, generator=generator)
    training = load_training_config("dpo", beta=beta, loss_type=loss_type)
    model = Model(share_embeddings_and_output_weights=False,
                  output_layer=SimpleNamespace(weight=weight))
    _, loss_func = dpo_forward_step(training, vocab)(iter([batch]), model)
    loss, metrics = loss_func(hidden)

    # In float64 from the logits; rows: the chosen of pairs 0 and 1, then their rejected.
    logprobs = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    chosen = [_completion_logprob(logprobs, i, p.prompt, p.chosen) for i, p in enumerate(PAIRS)]
    rejected = [_completion_logprob(logprobs, 2 + i, p.prompt, p.rejected)
                for i, p in enumerate(PAIRS)]
    references = [np.array([getattr(p, name) for p in PAIRS])
                  for name in ("reference_chosen", "reference_rejected")]
    per_pair, _ = numpy_dpo(np.array(chosen), np.array(rejected), *references, beta,
                            loss_type, label_smoothing=0.0)
    expected = per_pair.mean()
    margins = (np.array(chosen) - references[0]) - (np.array(rejected) - references[1])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["rewards/margin"].item() == pytest.approx(beta * margins.mean(), rel=1e-5)
    assert metrics["logps/chosen"].item() == pytest.approx(sum(chosen) / 2, rel=1e-5)
    assert metrics["logps/rejected"].item() == pytest.approx(sum(rejected) / 2, rel=1e-5)
    # Megatron's schedule divides the returned loss in place by the micro-batch count.
    loss /= 4
    assert metrics["loss"].item() == pytest.approx(expected, rel=1e-5)
