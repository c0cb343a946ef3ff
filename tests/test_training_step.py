"""The training stack (DDP, Adam, pipeline schedules) learns, and layouts agree."""

import math

from megatron_tpo.cli.tiny_train import run_tiny_training
from megatron_tpo.config import load_model_config


def test_tp2_pp2_and_interleaved_tp1_pp2_vpp2_train_identically():
    steps = 3
    plain = run_tiny_training(tp=2, pp=2, steps=steps, micro_batches=4, seq_len=16)
    interleaved = run_tiny_training(tp=1, pp=2, vpp=2, steps=steps, micro_batches=4, seq_len=16)
    losses = [loss for loss, _, _ in plain]
    # A random init predicts uniformly: the first loss is about log(vocab).
    assert abs(losses[0] - math.log(load_model_config("tiny").vocab_size)) < 0.05
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    for (loss_a, norm_a, _), (loss_b, norm_b, _) in zip(plain, interleaved):
        assert abs(loss_a - loss_b) < 1e-4 and abs(norm_a - norm_b) < 1e-3 * norm_a
