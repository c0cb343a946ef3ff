"""train/megatron_setup.py on one rank: the tiny model wrapped in megatron DDP with its
Adam, whose first step reports the gradients' norm computed here and moves every weight
by lr against its gradient's sign (Adam's first step), and whose settings are the ones given."""

import pytest
import torch

from megatron_tpo.config import ParallelConfig, load_model_config
from megatron_tpo.train.megatron_setup import OptimizerSettings, wrap_for_training

TINY = load_model_config("tiny")


@pytest.fixture
def one_rank_megatron(one_rank_job):
    """Megatron at TP1 PP1 in a one-process group, shut down afterwards."""
    from megatron_tpo.parallel import init_megatron, shutdown_megatron

    parallel = ParallelConfig(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    init_megatron(parallel, TINY)
    yield parallel
    shutdown_megatron()


def test_the_first_step_is_adams_with_the_gradients_norm(one_rank_megatron):
    from megatron.core.distributed import DistributedDataParallel

    from megatron_tpo.model.llama import build_llama_chunks
    from megatron_tpo.train.pipeline_step import position_ids

    settings = OptimizerSettings(lr=1e-3, clip_grad=1e6, adam_eps=1e-12)
    assert settings.use_distributed_optimizer is torch.cuda.is_available()
    chunks = build_llama_chunks(TINY, one_rank_megatron, params_dtype=torch.float32)
    ddp_chunks, optimizer = wrap_for_training(chunks, settings)
    assert [type(c) for c in ddp_chunks] == [DistributedDataParallel]
    assert chunks[0].config.finalize_model_grads_func is not None
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert (optimizer.config.clip_grad, optimizer.config.adam_eps, optimizer.config.adam_beta2,
            optimizer.config.use_distributed_optimizer) == (1e6, 1e-12, 0.95, False)

    params = [p for p in ddp_chunks[0].parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    tokens = torch.randint(0, TINY.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    ddp_chunks[0].zero_grad_buffer()
    optimizer.zero_grad()
    logits = ddp_chunks[0](tokens, position_ids(tokens), None)
    logits.float().pow(2).mean().backward()
    ddp_chunks[0].finish_grad_sync()
    grads = [p.main_grad.detach().clone() for p in params]
    succeeded, grad_norm, _ = optimizer.step()
    assert succeeded
    assert grad_norm == pytest.approx(float(torch.cat([g.flatten() for g in grads]).norm()),
                                      rel=1e-4)
    for param, old, grad in zip(params, before, grads):
        moved = param.detach() - old
        clear = grad.abs() > 1e-6   # Adam's first step: lr * g / |g|, wherever g is not ~0
        assert torch.allclose(moved[clear], -1e-3 * grad[clear].sign(), rtol=1e-3, atol=1e-9)
