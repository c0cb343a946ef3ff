"""Linear warm-up, then cosine (or linear, or no) decay: megatron-core's scheduler."""

from megatron_tpo.train.config import DPOTrainingConfig


def warmup_decay_scheduler(optimizer, training: DPOTrainingConfig):
    """An ``OptimizerParamScheduler`` that sets ``optimizer``'s lr for each step.

    Call ``step(1)`` *before* each optimizer step: step k then runs at the schedule's
    value for k, so the first warm-up step already moves the weights (at lr / warmup)
    instead of spending a step at lr 0.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=training.lr, min_lr=training.min_lr,
        lr_warmup_steps=training.warmup_steps, lr_decay_steps=training.train_steps,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay, end_wd=training.weight_decay,
        wd_incr_steps=training.train_steps, wd_incr_style="constant",
    )
