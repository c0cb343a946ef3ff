"""The chunked torch path of fused_target_logprobs against the float64 reference; TP=2 on gloo."""

import functools

import pytest
import torch

from logprob_reference import (logprob_only_reference, logprob_only_values_and_grads,
                               vocab_parallel_shard)
from megatron_tpo.kernels import fused_target_logprobs, logprob_torch, reference_target_logprobs
from megatron_tpo.parallel.local_launch import spawn_local

IGNORE = -100


def make_inputs(tokens, hidden_size, vocab, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(dtype)
    # Scaled so that logits spread over several units, as a trained model's do.
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 2 / hidden_size ** 0.5).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    mask = (torch.rand(tokens, generator=gen) > 0.25).long()
    targets[torch.rand(tokens, generator=gen) < 0.15] = IGNORE
    upstream = torch.randn(2, tokens, generator=gen)
    return hidden, weight, targets, mask, upstream


def values_and_grads(fn, hidden, weight, targets, mask, upstream, dtype):
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    logprobs, entropy = fn(hidden, weight, targets, mask)
    loss = logprobs * upstream[0].to(logprobs.dtype) + entropy * upstream[1].to(entropy.dtype)
    loss.sum().backward()
    return logprobs.detach(), entropy.detach(), hidden.grad, weight.grad


def reference(hidden, weight, targets, mask, upstream):
    return values_and_grads(reference_target_logprobs, hidden, weight, targets, mask, upstream,
                            torch.float64)


def fused(hidden, weight, targets, mask, upstream, **kwargs):
    call = functools.partial(fused_target_logprobs, return_entropy=True, ignore_index=IGNORE,
                             impl="torch", **kwargs)
    return values_and_grads(call, hidden, weight, targets, mask, upstream, hidden.dtype)


def logprob_only_fused(hidden, weight, targets, mask, upstream, **kwargs):
    call = functools.partial(fused_target_logprobs, ignore_index=IGNORE, impl="torch", **kwargs)
    return logprob_only_values_and_grads(call, hidden, weight, targets, mask, upstream,
                                         hidden.dtype)


def assert_close(actual, expected, atol):
    for a, e, name in zip(actual, expected, ("logprobs", "entropy", "grad hidden", "grad weight")):
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=atol, msg=name)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks far smaller than the shapes, and vocab chunks that do not divide the vocab."""
    for name in ("slice_statistics", "slice_gradients"):
        monkeypatch.setattr(logprob_torch, name, functools.partial(
            getattr(logprob_torch, name), token_chunk=8, vocab_chunk=32))


@pytest.mark.slow
@pytest.mark.parametrize("tokens,hidden_size,vocab", [(37, 24, 101), (1, 16, 50), (65, 40, 257)])
def test_values_and_gradients_match_float64_reference(small_chunks, tokens, hidden_size, vocab):
    inputs = make_inputs(tokens, hidden_size, vocab)
    assert_close(fused(*inputs), reference(*inputs), atol=2e-5)


@pytest.mark.parametrize("tokens,hidden_size,vocab", [(37, 24, 101), (65, 40, 257)])
def test_logprob_only_gradients_match_float64_reference(small_chunks, tokens, hidden_size,
                                                        vocab):
    inputs = make_inputs(tokens, hidden_size, vocab, seed=6)
    actual, expected = logprob_only_fused(*inputs), logprob_only_reference(*inputs)
    assert expected[1].abs().max() > 0 and expected[2].abs().max() > 0
    for a, e, name in zip(actual, expected, ("logprobs", "grad hidden", "grad weight")):
        torch.testing.assert_close(a.double(), e, atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.slow
def test_default_chunking_matches_reference():
    inputs = make_inputs(2100, 16, 4500, seed=1)  # more than one token and vocab chunk
    assert_close(fused(*inputs), reference(*inputs), atol=2e-5)


def test_masked_tokens_give_zero_and_get_zero_gradient(small_chunks):
    hidden, weight, targets, mask, upstream = make_inputs(29, 16, 70, seed=2)
    logprobs, entropy, grad_hidden, _ = fused(hidden, weight, targets, mask, upstream)
    skipped = (mask == 0) | (targets == IGNORE)
    assert skipped.any() and (~skipped).any()
    assert (logprobs[skipped] == 0).all() and (entropy[skipped] == 0).all()
    assert (grad_hidden[skipped] == 0).all()
    assert (logprobs[~skipped] < 0).all()


def test_everything_masked_gives_zeros():
    hidden, weight, targets, _, upstream = make_inputs(5, 16, 40)
    values = fused(hidden, weight, targets, torch.zeros(5), upstream)
    assert all((v == 0).all() for v in values)


def test_logprobs_alone_keep_leading_dimensions_int32_targets(small_chunks):
    hidden, weight, targets, mask, _ = make_inputs(24, 16, 90, seed=3)
    hidden = hidden.view(4, 6, 16).requires_grad_()
    logprobs = fused_target_logprobs(hidden, weight, targets.view(4, 6).int(),
                                     mask.view(4, 6), impl="torch")
    assert logprobs.shape == (4, 6) and logprobs.dtype == torch.float32
    logprobs.sum().backward()
    expected, _ = reference_target_logprobs(hidden.detach(), weight, targets.view(4, 6),
                                            mask.view(4, 6))
    torch.testing.assert_close(logprobs.detach().double(), expected, atol=2e-5, rtol=0)
    assert hidden.grad.shape == hidden.shape


def test_bfloat16_inputs_accumulate_in_float32():
    hidden, weight, targets, mask, upstream = make_inputs(33, 64, 300, seed=4,
                                                          dtype=torch.bfloat16)
    actual = fused(hidden, weight, targets, mask, upstream)
    assert actual[0].dtype == torch.float32 and actual[2].dtype == torch.bfloat16
    # The reference sees the same bf16-rounded inputs, so values differ only by float32
    # accumulation; gradients are returned in bf16 and differ by its rounding.
    expected = reference(hidden, weight, targets, mask, upstream)
    torch.testing.assert_close(actual[0].double(), expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(actual[1].double(), expected[1], atol=1e-4, rtol=0)
    for a, e in zip(actual[2:], expected[2:]):
        torch.testing.assert_close(a.double(), e, atol=1e-2, rtol=1e-2)


def test_target_outside_the_vocab_is_refused():
    hidden, weight, targets, _, _ = make_inputs(4, 16, 40)
    targets[1] = 40
    with pytest.raises(ValueError, match=r"\[40\].*owned by no vocab shard"):
        fused_target_logprobs(hidden, weight, targets)


def test_unknown_implementation_is_refused():
    hidden, weight, targets, _, _ = make_inputs(4, 16, 40)
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_target_logprobs(hidden, weight, targets, impl="cuda")


# --- tensor parallelism: two gloo processes, each owning half of the vocabulary ---

def _tp_rank(rank, world_size, inputs):
    """With entropy, then log-probs alone, on this rank's half of the vocabulary."""
    hidden, weight, targets, mask, upstream = inputs
    shard, vocab_parallel = vocab_parallel_shard(weight, rank, world_size)
    return (fused(hidden, shard, targets, mask, upstream, **vocab_parallel),
            logprob_only_fused(hidden, shard, targets, mask, upstream, **vocab_parallel))


TP_INPUTS = make_inputs(45, 24, 2 * 77, seed=5)


@pytest.fixture(scope="module")
def two_tp_ranks():
    return spawn_local(_tp_rank, 2, TP_INPUTS)


@pytest.mark.slow
def test_tensor_parallel_two_ranks_equal_one(two_tp_ranks):
    ranks = [with_entropy for with_entropy, _ in two_tp_ranks]
    single = fused(*TP_INPUTS)
    for rank in ranks:  # every rank returns the full values and the full hidden gradient
        for a, e in zip(rank[:3], single[:3]):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([ranks[0][3], ranks[1][3]]), single[3],
                               atol=1e-5, rtol=1e-5)
    assert_close(single, reference(*TP_INPUTS), atol=2e-5)


@pytest.mark.slow
def test_tensor_parallel_logprob_only_gradients_equal_reference(two_tp_ranks):
    expected = logprob_only_reference(*TP_INPUTS)
    ranks = [logprobs_only for _, logprobs_only in two_tp_ranks]
    for rank in ranks:  # the full values and the full (all-reduced) hidden gradient
        for actual, wanted, name in zip(rank[:2], expected[:2], ("logprobs", "grad hidden")):
            torch.testing.assert_close(actual.double(), wanted, atol=2e-5, rtol=2e-5, msg=name)
    torch.testing.assert_close(torch.cat([ranks[0][2], ranks[1][2]]).double(), expected[2],
                               atol=2e-5, rtol=2e-5)
