"""The training stack (DDP, Adam, pipeline schedules) learns, and layouts agree."""

import math

import pytest

from megatron_tpo.config import ParallelConfig, load_model_config
from megatron_tpo.train.fixed_batch import FixedBatchRun, run_locally

pytestmark = pytest.mark.slow


def _run(tp, pp, vpp=None):
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    return run_locally(FixedBatchRun(model=load_model_config("tiny"), parallel=parallel,
                                     steps=3, micro_batches=4, seq_len=16))


def test_tp2_pp2_and_interleaved_tp1_pp2_vpp2_train_identically():
    plain, interleaved = _run(2, 2), _run(1, 2, vpp=2)
    losses = [record.loss for record in plain]
    # A random init predicts uniformly: the first loss is about log(vocab).
    assert abs(losses[0] - math.log(load_model_config("tiny").vocab_size)) < 0.05
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    for a, b in zip(plain, interleaved):
        assert abs(a.loss - b.loss) < 1e-4 and abs(a.grad_norm - b.grad_norm) < 1e-3 * a.grad_norm
