"""Which fitting layouts this repository's trainer can actually run today.

The memory and time model covers megatron-core's full feature set (NVIDIA's published
recipes use context parallelism, and the validation against them needs it), but the
DPO trainer refuses some of it. This module is the planner's copy of those refusals;
``tests/test_plan_runnable.py`` checks it against ``megatron_tpo.train.dpo_trainer``'s
own ``_check_layout`` so the two cannot drift apart silently.
"""

from typing import Optional

from megatron_tpo.plan.workload import TrainingLayout

NOT_RUNNABLE = "not runnable by the DPO trainer"


def trainer_refusal(layout: TrainingLayout) -> Optional[str]:
    """Why ``DPOTrainer`` would refuse ``layout`` (None: it runs it).

    Context parallelism: each CP rank would need its load-balanced slice of every pair
    and the sequence log-prob sums an all-reduce over CP; the trainer does neither yet.
    """
    if layout.cp > 1:
        return (f"{NOT_RUNNABLE}: CP{layout.cp} (parallel.context_parallel_size="
                f"{layout.cp}); it does not split pairs over context-parallel ranks yet")
    return None
