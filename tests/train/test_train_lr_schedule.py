"""train/lr_schedule.py: the lr each step runs at, against the schedule written out here
in float64: linear warm-up from 0, then cosine or linear decay to min_lr, or constant."""

import math

import pytest
import torch

from megatron_tpo.train.config import DPOTrainingConfig
from megatron_tpo.train.lr_schedule import warmup_decay_scheduler


def expected_lr(step: int, lr: float, min_lr: float, warmup: int, total: int, style: str) -> float:
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if style == "constant":
        return lr
    if step > total:
        return min_lr
    progress = (step - warmup) / (total - warmup)
    coefficient = (0.5 * (1 + math.cos(math.pi * progress)) if style == "cosine"
                   else 1 - progress)
    return min_lr + coefficient * (lr - min_lr)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_each_step_runs_at_the_warmup_then_decay_value(style):
    training = DPOTrainingConfig(lr=3e-4, min_lr=3e-5, warmup_steps=4, train_steps=20,
                                 lr_decay_style=style, weight_decay=0.01)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = warmup_decay_scheduler(optimizer, training)
    assert optimizer.param_groups[0]["lr"] == 0.0   # built at step 0: nothing runs at it
    seen = []
    for step in range(1, 25):
        scheduler.step(1)   # before each optimizer step, as the trainer calls it
        seen.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.01)
    wanted = [expected_lr(step, 3e-4, 3e-5, 4, 20, style) for step in range(1, 25)]
    assert seen == pytest.approx(wanted, rel=1e-12, abs=1e-15)
    assert seen[0] == pytest.approx(3e-4 / 4)   # the first step already moves the weights
    assert seen[3] == pytest.approx(3e-4)       # the peak at the end of the warm-up


def test_without_warmup_the_first_step_runs_at_the_peak():
    training = DPOTrainingConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, train_steps=10,
                                 lr_decay_style="cosine")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_decay_scheduler(optimizer, training)
    scheduler.step(1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr(1, 1e-3, 0.0, 0, 10,
                                                                        "cosine"))
    scheduler.step(9)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-18)
