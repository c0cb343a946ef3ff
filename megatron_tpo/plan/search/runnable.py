"""Which fitting layouts this repository's trainer can actually run today.

The memory and time model covers megatron-core's full feature set (NVIDIA's published
recipes use context parallelism, and the validation against them needs it), but the
DPO trainer refuses some of it. This module is the planner's copy of those refusals;
``tests/plan/test_plan_runnable.py`` checks it against ``megatron_tpo.train.dpo_trainer``'s
own ``_check_layout`` so the two cannot drift apart silently.
"""

from typing import Optional

from megatron_tpo.plan.workload import TrainingLayout

NOT_RUNNABLE = "not runnable by the DPO trainer"


def trainer_refusal(layout: TrainingLayout) -> Optional[str]:
    """Why ``DPOTrainer`` would refuse ``layout`` (None: it runs it).

    Context parallelism: each CP rank would need its load-balanced slice of every pair
    and the sequence log-prob sums an all-reduce over CP; the trainer does neither yet
    (``dpo_trainer._check_layout``). Micro-batch: a micro-batch holds whole pairs, the
    chosen and the rejected sequence of each (``dpo_batch.pair_micro_batches``), so it
    has 2 x ``train.micro_batch_pairs`` sequences, never an odd number.
    """
    reasons = []
    if layout.cp > 1:
        reasons.append(f"CP{layout.cp} (parallel.context_parallel_size={layout.cp}); it "
                       "does not split pairs over context-parallel ranks yet")
    if layout.micro_batch % 2:
        reasons.append(f"MBS{layout.micro_batch}: a micro-batch holds whole pairs "
                       "(2 x train.micro_batch_pairs sequences), so its size is even")
    return f"{NOT_RUNNABLE}: " + "; ".join(reasons) if reasons else None
