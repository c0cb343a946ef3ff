"""DPO / IPO loss against independent float64 formulas, hand-computed values and a tiny HF model."""

import math

import numpy as np
import pytest
import torch

from megatron_tpo.kernels import fused_target_logprobs
from megatron_tpo.train.losses import completion_mask, dpo_loss, sequence_logprobs

from dpo_fixtures import numpy_dpo


@pytest.mark.parametrize("loss_type,beta,label_smoothing",
                         [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0),
                          ("ipo", 1.0, 0.0)])
def test_matches_float64_formulas(loss_type, beta, label_smoothing):
    rng = np.random.default_rng(0)
    logps = -rng.uniform(5, 60, size=(4, 16))
    logps[0] += rng.normal(0, 3, 16)  # the policy moved away from the reference
    inputs = [torch.tensor(row, dtype=torch.float32) for row in logps]
    inputs[0].requires_grad_()
    result = dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    result.loss.backward()

    as_float32 = [row.astype(np.float32).astype(np.float64) for row in logps]
    expected, dloss_dh = numpy_dpo(*as_float32, beta, loss_type, label_smoothing)
    np.testing.assert_allclose(result.per_pair.detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.loss.item(), expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(inputs[0].grad.numpy(), dloss_dh / 16, rtol=1e-4, atol=1e-6)

    chosen = beta * (as_float32[0] - as_float32[2])
    rejected = beta * (as_float32[1] - as_float32[3])
    metrics = {name: value.item() for name, value in result.metrics.items()}
    assert metrics["rewards/chosen"] == pytest.approx(chosen.mean(), rel=1e-4)
    assert metrics["rewards/rejected"] == pytest.approx(rejected.mean(), rel=1e-4)
    margin = (chosen - rejected).mean()
    assert metrics["rewards/margin"] == pytest.approx(margin, rel=1e-4, abs=1e-5)
    assert metrics["rewards/accuracy"] == pytest.approx((chosen > rejected).mean())
    assert metrics["logps/chosen"] == pytest.approx(as_float32[0].mean(), rel=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(as_float32[1].mean(), rel=1e-5)


def hand_example(**kwargs):
    # Policy prefers chosen by 2 nats more than the reference does: h = 2.
    t = lambda x: torch.tensor([x])  # noqa: E731
    return dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), **kwargs)


def test_hand_computed_values():
    sigmoid = hand_example(beta=0.5)
    assert sigmoid.loss.item() == pytest.approx(math.log(1 + math.exp(-1)))  # -log sigmoid(1)
    assert sigmoid.metrics["rewards/chosen"].item() == pytest.approx(0.5)
    assert sigmoid.metrics["rewards/rejected"].item() == pytest.approx(-0.5)
    assert sigmoid.metrics["rewards/margin"].item() == pytest.approx(1.0)
    assert sigmoid.metrics["rewards/accuracy"].item() == 1.0
    # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e), and log(1 + e) = 1 + log(1 + e^-1).
    smoothed = hand_example(beta=0.5, label_smoothing=0.1)
    assert smoothed.loss.item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.1)
    assert hand_example(beta=0.5, loss_type="ipo").loss.item() == pytest.approx(1.0)  # (2-1)^2
    assert hand_example(beta=0.1, loss_type="ipo").loss.item() == pytest.approx(9.0)  # (2-5)^2


def test_policy_equal_to_reference_gives_log_2():
    logps = torch.tensor([-31.5, -7.25, -120.0])
    result = dpo_loss(logps, logps - 3, logps, logps - 3, beta=0.3)
    assert result.loss.item() == pytest.approx(math.log(2))
    assert result.metrics["rewards/accuracy"].item() == 0.0
    assert result.metrics["rewards/margin"].item() == 0.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(loss_type="hinge"), "loss_type"), (dict(beta=0.0), "beta"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="ipo", label_smoothing=0.1), "sigmoid DPO loss only")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hand_example(**kwargs)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.zeros(2))


def test_completion_mask_and_sums():
    # Sequence 0: 2 prompt tokens, 5 tokens in all; sequence 1: 3 prompt tokens, 4 in all.
    mask = completion_mask(torch.tensor([2, 3]), torch.tensor([5, 4]), target_length=5)
    assert mask.tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]
    token_logprobs = -torch.arange(1.0, 11.0).view(2, 5)
    assert sequence_logprobs(token_logprobs, mask).tolist() == [-9.0, -8.0]
    assert sequence_logprobs(token_logprobs, mask, average=True).tolist() == [-3.0, -8.0]


def test_tiny_llama_sequence_logprobs_and_log_2_at_the_reference():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    # Two pairs: rows 0, 1 chosen and rows 2, 3 rejected; right-padded with token 0.
    prompt_lengths = torch.tensor([3, 4, 3, 4])
    sequence_lengths = torch.tensor([9, 7, 6, 10])
    input_ids = torch.randint(1, 61, (4, 10))
    input_ids[torch.arange(10)[None, :] >= sequence_lengths[:, None]] = 0

    hidden = model.model(input_ids=input_ids).last_hidden_state
    token_logprobs = fused_target_logprobs(hidden[:, :-1], model.lm_head.weight,
                                           input_ids[:, 1:])
    mask = completion_mask(prompt_lengths, sequence_lengths, target_length=9)
    fused_sums = sequence_logprobs(token_logprobs, mask)

    # Independent: full logits of HF's own forward, summed token by token.
    with torch.no_grad():
        log_softmax = torch.log_softmax(model(input_ids=input_ids).logits.double(), dim=-1)
    expected = [sum(log_softmax[row, position - 1, input_ids[row, position]].item()
                    for position in range(prompt_lengths[row], sequence_lengths[row]))
                for row in range(4)]
    np.testing.assert_allclose(fused_sums.detach().numpy(), expected, rtol=1e-5)

    chosen, rejected = fused_sums[:2], fused_sums[2:]
    result = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)
    assert result.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    result.loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
