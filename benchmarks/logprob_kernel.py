"""Fused target log-probs against the naive way (full logits, log-softmax, gather).

Forward + backward of sum(log-probs) w.r.t. hidden and weight, both variants in the
same run, on the same inputs. Prints a line per variant and, last, one JSON object.

  python benchmarks/logprob_kernel.py [--repeats 5] [--tokens T --hidden H --vocab V]

Defaults follow the device: without CUDA 4096 tokens, hidden 512, vocab 32000 in
float32 (the chunked torch path); with CUDA 8192 x 4096 x 128256 in bfloat16 (Triton).
Time: median wall time of ``--repeats`` runs after one warm-up run, the two variants
alternating in one process so that load from other jobs falls on both alike.
Peak memory, CPU: each variant runs in a fresh process, which resets the kernel's peak
resident-set counter (/proc/self/clear_refs = 5) just before its first fwd+bwd and
reports VmHWM minus the resident size at that moment: the extra memory the call needed,
allocator caching included. GPU: torch.cuda.max_memory_allocated above the memory
allocated before the call (tensors only, not the caching allocator's reserve).
The GPU run also reports the matmul floor: 6*T*H*V FLOPs (forward logits, and the two
backward matmuls) at the bf16 rate measured here for a same-shape torch.matmul, and
times the fused kernel twice: "fused" is the default deterministic backward,
"fused_atomic" the float32-atomic one (deterministic=False); the CPU torch path has no
such choice, so a CPU run shows neither the atomic variant nor that ratio.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from megatron_tpo.kernels import fused_target_logprobs

CPU_SHAPE = dict(tokens=4096, hidden=512, vocab=32000, dtype="float32")
GPU_SHAPE = dict(tokens=8192, hidden=4096, vocab=128256, dtype="bfloat16")


def naive_logprobs(hidden, weight, targets):
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


def fused_logprobs(hidden, weight, targets):
    return fused_target_logprobs(hidden, weight, targets)


def fused_atomic_logprobs(hidden, weight, targets):
    return fused_target_logprobs(hidden, weight, targets, deterministic=False)


VARIANTS = {"naive": naive_logprobs, "fused": fused_logprobs,
            "fused_atomic": fused_atomic_logprobs}


def variants_for(device):
    """The atomic backward exists only in Triton (GPU); the CPU torch path has one."""
    return tuple(VARIANTS) if device == "cuda" else ("naive", "fused")


def make_inputs(tokens, hidden, vocab, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden_states = torch.randn(tokens, hidden, generator=gen)
    weight = torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    dtype = getattr(torch, dtype)
    return (hidden_states.to(device, dtype).requires_grad_(),
            weight.to(device, dtype).requires_grad_(), targets.to(device))


def forward_backward(variant, hidden, weight, targets):
    hidden.grad = weight.grad = None
    loss = VARIANTS[variant](hidden, weight, targets).double().sum()
    loss.backward()
    return loss.item()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, device):
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def interleaved_median_ms(shape, device, repeats):
    """Median fwd+bwd time per variant, alternating variants so load drift hits all."""
    hidden, weight, targets = make_inputs(**shape, device=device)
    runs = {variant: (lambda v=variant: forward_backward(v, hidden, weight, targets))
            for variant in variants_for(device)}
    for run in runs.values():
        run()  # warm-up (and Triton compilation)
    times = {variant: [] for variant in runs}
    for _ in range(repeats):
        for variant, run in runs.items():
            times[variant].append(wall_ms(run, device))
    return {variant: statistics.median(values) for variant, values in times.items()}


def _resident_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_extra_mb(run, device):
    """Memory a call needs beyond what is allocated before it (see the module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current resident size
    before = _resident_kb("VmRSS")
    run()
    return (_resident_kb("VmHWM") - before) / 1024


def measure_memory(variant, shape, device):
    """Peak extra memory of one fwd+bwd, with the loss and gradient norms for a cross-check."""
    hidden, weight, targets = make_inputs(**shape, device=device)
    losses = []
    peak = peak_extra_mb(
        lambda: losses.append(forward_backward(variant, hidden, weight, targets)), device)
    return dict(peak_mb=peak, loss=losses[0],
                grad_hidden_norm=hidden.grad.double().norm().item(),
                grad_weight_norm=weight.grad.double().norm().item())


def measure_memory_in_fresh_process(variant, args):
    """CPU peak memory needs a process whose peak counter only this variant touched."""
    command = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype,
               "--device", args.device]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_floor_ms(shape, device, repeats):
    """Time of 6*T*H*V FLOPs at the rate of a same-shape (T,H) x (H,V) torch.matmul."""
    dtype = getattr(torch, shape["dtype"])
    a = torch.randn(shape["tokens"], shape["hidden"], device=device, dtype=dtype)
    b = torch.randn(shape["hidden"], shape["vocab"], device=device, dtype=dtype)
    torch.matmul(a, b)
    one_matmul_ms = statistics.median(
        wall_ms(lambda: torch.matmul(a, b), device) for _ in range(repeats))
    flops = 2 * shape["tokens"] * shape["hidden"] * shape["vocab"]
    return 3 * one_matmul_ms, flops / (one_matmul_ms * 1e-3) / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=tuple(VARIANTS),
                        help="internal: measure this variant's memory only")
    args = parser.parse_args()
    defaults = GPU_SHAPE if args.device == "cuda" else CPU_SHAPE
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    shape = {name: getattr(args, name) for name in CPU_SHAPE}

    if args.variant:
        print(json.dumps(measure_memory(args.variant, shape, args.device)))
        return

    results = {}
    for variant in variants_for(args.device):
        if args.device == "cuda":
            results[variant] = measure_memory(variant, shape, args.device)
            torch.cuda.empty_cache()
        else:
            results[variant] = measure_memory_in_fresh_process(variant, args)
    for variant, ms in interleaved_median_ms(shape, args.device, args.repeats).items():
        results[variant]["ms"] = ms
        print(f"{variant}: {ms:.1f} ms fwd+bwd, peak +{results[variant]['peak_mb']:.0f} MiB",
              flush=True)

    naive, fused = results["naive"], results["fused"]
    summary = dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        threads=torch.get_num_threads(), **shape,
        naive_ms=round(naive["ms"], 2), fused_ms=round(fused["ms"], 2),
        time_ratio_fused_over_naive=round(fused["ms"] / naive["ms"], 3),
        naive_peak_mb=round(naive["peak_mb"], 1), fused_peak_mb=round(fused["peak_mb"], 1),
        memory_ratio_fused_over_naive=round(fused["peak_mb"] / naive["peak_mb"], 4),
        memory_method=("cuda max_memory_allocated delta" if args.device == "cuda"
                       else "peak RSS delta (VmHWM reset), fresh process per variant"),
        loss_relative_difference=abs(fused["loss"] - naive["loss"]) / abs(naive["loss"]),
        grad_norm_relative_difference=max(
            abs(fused[k] - naive[k]) / naive[k] for k in ("grad_hidden_norm", "grad_weight_norm")),
    )
    if args.device == "cuda":
        floor_ms, tflops = matmul_floor_ms(shape, args.device, args.repeats)
        summary.update(matmul_tflops=round(tflops, 1), matmul_floor_ms=round(floor_ms, 2),
                       fused_over_floor=round(fused["ms"] / floor_ms, 3),
                       naive_over_floor=round(naive["ms"] / floor_ms, 3))
        atomic = results["fused_atomic"]
        # The price of deterministic gradients (the default) against the atomic backward.
        summary.update(fused_atomic_ms=round(atomic["ms"], 2),
                       fused_atomic_peak_mb=round(atomic["peak_mb"], 1),
                       time_ratio_deterministic_over_atomic=round(fused["ms"] / atomic["ms"], 3))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
