"""Log-probs without entropy (the path DPO trains on) and their gradients, and the float64
reference of them, for the torch and Triton kernel tests."""

import torch

from megatron_tpo.kernels import reference_target_logprobs


def logprob_only_values_and_grads(fn, hidden, weight, targets, mask, upstream, dtype):
    """Log-probs and their gradients with no entropy asked for: the path DPO trains on."""
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    logprobs = fn(hidden, weight, targets, mask)
    (logprobs * upstream[0].to(logprobs.dtype)).sum().backward()
    return logprobs.detach(), hidden.grad, weight.grad


def logprob_only_reference(hidden, weight, targets, mask, upstream):
    def logprobs(*inputs):
        return reference_target_logprobs(*inputs)[0]
    return logprob_only_values_and_grads(logprobs, hidden, weight, targets, mask, upstream,
                                         torch.float64)


def vocab_parallel_shard(weight, rank: int, world_size: int):
    """In a rank of spawn_local's world: a gloo group over it, this rank's equal share of
    the vocabulary rows and the kernel settings that place them."""
    import torch.distributed as dist

    # spawn_local exported RANK, WORLD_SIZE and MASTER_*, and tears the group down after.
    dist.init_process_group("gloo")
    shard_size = weight.shape[0] // world_size
    shard = weight[rank * shard_size:(rank + 1) * shard_size]
    return shard, dict(tp_group=dist.group.WORLD, vocab_start=rank * shard_size)
