"""The Triton kernels themselves, run on CPU by Triton's interpreter, against the reference.

TRITON_INTERPRET must be set before triton is first imported, so the ordinary test run
starts a fresh pytest process with it set; there the interpreted tests below run. The
ordinary run also compiles the kernels for an H100 (sm_90), which needs no GPU.
"""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

# Neither import loads triton: the Triton module is imported when impl="triton" is used.
from megatron_tpo.kernels import fused_target_logprobs, reference_target_logprobs
from megatron_tpo.parallel.local_launch import spawn_local
from logprob_reference import (logprob_only_reference, logprob_only_values_and_grads,
                               vocab_parallel_shard)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in the child with "
                                       "TRITON_INTERPRET=1 (see test_kernels_in_interpreter)")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
def test_kernels_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-k", "interpreted", __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    # Every test_interpreted_* must have run, not been skipped.
    assert " skipped" not in run.stdout.splitlines()[-1], run.stdout


def _inputs(tokens, hidden_size, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 2 / hidden_size ** 0.5).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[torch.rand(tokens, generator=gen) < 0.2] = -100
    mask = (torch.rand(tokens, generator=gen) > 0.2).long()
    upstream = torch.randn(2, tokens, generator=gen)
    return hidden, weight, targets, mask, upstream


def _values_and_grads(fn, hidden, weight, targets, mask, upstream, dtype, with_entropy=True):
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    logprobs, entropy = fn(hidden, weight, targets, mask)
    loss = (logprobs * upstream[0].to(logprobs.dtype)).sum()
    if with_entropy:
        loss = loss + (entropy * upstream[1].to(entropy.dtype)).sum()
    loss.backward()
    return logprobs.detach(), entropy.detach(), hidden.grad, weight.grad


def _triton(hidden, weight, targets, mask, upstream, with_entropy=True, deterministic=True):
    def call(h, w, t, m):
        return fused_target_logprobs(h, w, t, m, return_entropy=True, impl="triton",
                                     deterministic=deterministic)
    return _values_and_grads(call, hidden, weight, targets, mask, upstream, hidden.dtype,
                             with_entropy)


def _reference(hidden, weight, targets, mask, upstream, with_entropy=True):
    return _values_and_grads(reference_target_logprobs, hidden, weight, targets, mask, upstream,
                             torch.float64, with_entropy)


def _triton_logprob_only(hidden, weight, targets, mask, upstream, **kwargs):
    """Log-probs alone (no entropy computed in forward or backward), as DPO asks."""
    def call(h, w, t, m):
        return fused_target_logprobs(h, w, t, m, impl="triton", **kwargs)
    return logprob_only_values_and_grads(call, hidden, weight, targets, mask, upstream,
                                         hidden.dtype)


@needs_interpreter
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("tokens,hidden_size,vocab", [(37, 40, 101), (1, 16, 50), (18, 33, 64)])
def test_interpreted_float32_values_and_gradients(tokens, hidden_size, vocab, deterministic):
    inputs = _inputs(tokens, hidden_size, vocab, torch.float32)
    for actual, expected in zip(_triton(*inputs, deterministic=deterministic),
                                _reference(*inputs)):
        torch.testing.assert_close(actual.double(), expected, atol=2e-5, rtol=2e-5)


@needs_interpreter
def test_interpreted_several_tiles_per_program_and_no_entropy_gradient(monkeypatch):
    from megatron_tpo.kernels import logprob_triton
    # Few programs: each walks several vocab tiles, exercising the online rescaling.
    monkeypatch.setattr(logprob_triton, "TARGET_PROGRAMS", 2)
    inputs = _inputs(21, 24, 150, torch.float32, seed=1)
    expected = _reference(*inputs, with_entropy=False)
    for deterministic in (True, False):
        actual = _triton(*inputs, with_entropy=False, deterministic=deterministic)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a.double(), e, atol=2e-5, rtol=2e-5)


@needs_interpreter
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("tokens,hidden_size,vocab", [(37, 40, 101), (18, 33, 64)])
def test_interpreted_logprob_only_gradients(tokens, hidden_size, vocab, deterministic):
    inputs = _inputs(tokens, hidden_size, vocab, torch.float32, seed=5)
    expected = logprob_only_reference(*inputs)
    assert expected[1].abs().max() > 0 and expected[2].abs().max() > 0
    actual = _triton_logprob_only(*inputs, deterministic=deterministic)
    for a, e, name in zip(actual, expected, ("logprobs", "grad hidden", "grad weight")):
        torch.testing.assert_close(a.double(), e, atol=2e-5, rtol=2e-5, msg=name)


@needs_interpreter
def test_interpreted_bfloat16_accumulates_in_float32():
    inputs = _inputs(19, 48, 90, torch.bfloat16, seed=2)
    actual, expected = _triton(*inputs), _reference(*inputs)
    torch.testing.assert_close(actual[0].double(), expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(actual[1].double(), expected[1], atol=1e-4, rtol=0)
    # Gradients pass through bf16 (the logit gradient and the returned grads).
    for a, e in zip(actual[2:], expected[2:]):
        torch.testing.assert_close(a.double(), e, atol=2e-2, rtol=2e-2)


def _tp_rank(rank, world_size, inputs):
    """With entropy, then log-probs alone, on this rank's half of the vocabulary."""
    hidden, weight, targets, mask, upstream = inputs
    shard, vocab_parallel = vocab_parallel_shard(weight, rank, world_size)

    def call(h, w, t, m):
        return fused_target_logprobs(h, w, t, m, return_entropy=True, impl="triton",
                                     **vocab_parallel)
    return (_values_and_grads(call, hidden, shard, targets, mask, upstream, hidden.dtype),
            _triton_logprob_only(hidden, shard, targets, mask, upstream, **vocab_parallel))


TP_INPUTS = _inputs(17, 24, 2 * 40, torch.float32, seed=3)


@pytest.fixture(scope="module")
def two_tp_ranks():
    return spawn_local(_tp_rank, 2, TP_INPUTS)


@needs_interpreter
def test_interpreted_tensor_parallel_two_ranks_equal_reference(two_tp_ranks):
    ranks = [with_entropy for with_entropy, _ in two_tp_ranks]
    expected = _reference(*TP_INPUTS)
    for rank in ranks:  # full values and the full (all-reduced) hidden gradient everywhere
        for actual, wanted in zip(rank[:3], expected[:3]):
            torch.testing.assert_close(actual.double(), wanted, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(torch.cat([ranks[0][3], ranks[1][3]]).double(), expected[3],
                               atol=2e-5, rtol=2e-5)


@needs_interpreter
def test_interpreted_tensor_parallel_logprob_only_gradients(two_tp_ranks):
    ranks = [logprobs_only for _, logprobs_only in two_tp_ranks]
    expected = logprob_only_reference(*TP_INPUTS)
    for rank in ranks:  # the full values and the full (all-reduced) hidden gradient
        for actual, wanted, name in zip(rank[:2], expected[:2], ("logprobs", "grad hidden")):
            torch.testing.assert_close(actual.double(), wanted, atol=2e-5, rtol=2e-5, msg=name)
    torch.testing.assert_close(torch.cat([ranks[0][2], ranks[1][2]]).double(), expected[2],
                               atol=2e-5, rtol=2e-5)


def _compile_for_h100(kernel, pointer_dtypes, constexprs, num_warps):
    """Compile ``kernel`` to an sm_90 cubin without a GPU; return cuobjdump's usage line."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_dtypes.get(name, "*fp32")
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
    return next(line for line in usage.splitlines() if "REG:" in line)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiles for a GPU target, not interpreted")
@pytest.mark.parametrize("with_entropy", [False, True])
def test_bf16_kernels_compile_for_h100(with_entropy):
    """No GPU here, but Triton's compiler and ptxas run anyway: the GPU settings must
    compile, and the hot (no entropy gradient) kernels must not spill registers."""
    from megatron_tpo.kernels import logprob_triton
    bf16 = {"hidden_ptr": "*bf16", "weight_ptr": "*bf16", "targets_ptr": "*i64"}
    backward = logprob_triton.GPU_BACKWARD
    for kernel, settings, weight_side in (
            (logprob_triton._statistics_kernel, logprob_triton.GPU_FORWARD, None),
            (logprob_triton._gradients_kernel, backward, None),  # the atomic backward
            (logprob_triton._owned_gradient_kernel, backward, False),  # deterministic
            (logprob_triton._owned_gradient_kernel, logprob_triton.GPU_WEIGHT_BACKWARD, True)):
        blocks = {name: value for name, value in settings.items() if name != "num_warps"}
        flags = dict(WITH_ENTROPY=with_entropy, WITH_ENTROPY_GRAD=with_entropy,
                     WEIGHT_SIDE=weight_side)
        constexprs = dict(blocks, DOT_PRECISION="tf32", DOT_IN_FP32=False,
                          **{name: value for name, value in flags.items()
                             if name in kernel.arg_names})
        usage = _compile_for_h100(kernel, bf16, constexprs, settings["num_warps"])
        if not with_entropy:
            assert " STACK:0 " in usage, f"{kernel.__name__} {flags} spills: {usage}"


# --- determinism: the result must not depend on the order in which programs run ---

class _InterpreterSchedule:
    """Counts the atomics the interpreted kernels issue and, once ``reverse`` is set, runs
    every grid's programs in reverse index order.

    The interpreter runs a grid's programs one by one in index order, so float atomics
    add up in the same order on every run there and look deterministic. A GPU runs
    programs in whatever order its scheduler picks: reversing the order here is one such
    schedule, and an order-dependent reduction shows up as differing bits.
    """

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter
        builder = interpreter.interpreter_builder
        self.atomics, self.reverse = 0, False
        set_index, issue_atomic = builder.set_grid_idx, builder.create_atomic_rmw

        def scheduled_index(x, y, z):
            if self.reverse:
                size_x, size_y, size_z = builder.grid_dim
                x, y, z = size_x - 1 - x, size_y - 1 - y, size_z - 1 - z
            set_index(x, y, z)

        def counted_atomic(*args, **kwargs):
            self.atomics += 1
            return issue_atomic(*args, **kwargs)

        monkeypatch.setattr(builder, "set_grid_idx", scheduled_index)
        monkeypatch.setattr(builder, "create_atomic_rmw", counted_atomic)


def _gradients(inputs, **kwargs):
    hidden, weight, targets, mask, upstream = inputs

    def call(h, w, t, m):
        return fused_target_logprobs(h, w, t, m, return_entropy=True, impl="triton", **kwargs)
    return _values_and_grads(call, hidden, weight, targets, mask, upstream, hidden.dtype)[2:]


# 64 tokens (about 41 unmasked) and 64 vocab rows: >= 3 token blocks and 4 vocab tiles of
# the interpreter's 16, so three or more partial sums meet in every gradient element
# and their order can change the rounding.
ORDER_SHAPE = (64, 16, 64)
GRADIENTS = ("grad hidden", "grad weight")


@needs_interpreter
@pytest.mark.parametrize("layout", ["slot per tile", "several tiles per slot", "no workspace"])
def test_interpreted_default_gradients_do_not_depend_on_program_order(monkeypatch, layout):
    """Gradients of hidden and weight, bit for bit: two runs in index order and one with
    every grid run in reverse order, for each way the deterministic backward lays out its
    partial sums. Proves that the default backward issues no atomic and that its bits
    do not depend on the order in which programs run or finish (the GPU fixes neither,
    and the interpreter alone would hide atomics' order dependence; the atomic control
    test below shows this schedule exposes it). It says nothing about whether another
    Triton version or GPU compiles the same rounding."""
    from megatron_tpo.kernels import logprob_triton
    if layout == "several tiles per slot":  # 3 token blocks x 4 vocab tiles: 2 splits of 2
        monkeypatch.setattr(logprob_triton, "TARGET_PROGRAMS", 8)
    elif layout == "no workspace":
        monkeypatch.setattr(logprob_triton, "DETERMINISTIC_WORKSPACE_BYTES", 0)
    layouts = []  # (splits, tiles_per_split) of the hidden side, then of the weight side
    choose = logprob_triton._reduction_splits
    monkeypatch.setattr(logprob_triton, "_reduction_splits",
                        lambda *args: layouts.append(choose(*args)) or layouts[-1])
    inputs = _inputs(*ORDER_SHAPE, torch.float32, seed=4)
    schedule = _InterpreterSchedule(monkeypatch)
    first, second = _gradients(inputs), _gradients(inputs)
    splits, tiles = zip(*layouts[:2])
    assert {"slot per tile": set(tiles) == {1} and min(splits) > 1,
            "several tiles per slot": min(tiles) > 1 and min(splits) > 1,
            "no workspace": set(splits) == {1}}[layout], layouts[:2]
    schedule.reverse = True
    reversed_order = _gradients(inputs)
    assert schedule.atomics == 0
    for a, b, c, name in zip(first, second, reversed_order, GRADIENTS):
        assert torch.equal(a, b), f"{name} differs between two runs"
        assert torch.equal(a, c), f"{name} changed with the program order"
    for actual, expected in zip(first, _reference(*inputs)[2:]):
        torch.testing.assert_close(actual.double(), expected, atol=2e-5, rtol=2e-5)


@needs_interpreter
def test_interpreted_atomic_gradients_change_with_program_order(monkeypatch):
    """The control for the test above: the atomic backward (deterministic=False) issues
    atomics, and reversing the program order changes bits of both of its gradients, so
    the schedule can expose an order-dependent reduction; both orders still equal the
    float64 reference to float32 rounding."""
    inputs = _inputs(*ORDER_SHAPE, torch.float32, seed=4)
    schedule = _InterpreterSchedule(monkeypatch)
    in_order = _gradients(inputs, deterministic=False)
    schedule.reverse = True
    reversed_order = _gradients(inputs, deterministic=False)
    assert schedule.atomics > 0
    expected = _reference(*inputs)[2:]
    for a, b, wanted, name in zip(in_order, reversed_order, expected, GRADIENTS):
        assert not torch.equal(a, b), f"{name}: reversing the programs changed no bit"
        for actual in (a, b):
            torch.testing.assert_close(actual.double(), wanted, atol=2e-5, rtol=2e-5)
