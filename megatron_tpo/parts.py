"""What one rank holds for the TPO loop: built by ``build.build_tpo``, run by ``loop.run_tpo``."""

from dataclasses import dataclass
from typing import List, Optional

from megatron_tpo.data.storage import IterationStore
from megatron_tpo.judge.base import Judge
from megatron_tpo.parallel.preemption import PreemptionGuard
from megatron_tpo.report.metrics import RunMetrics
from megatron_tpo.rollout.engine import RolloutEngine
from megatron_tpo.tpo_config import TPOConfig


@dataclass
class TPOParts:
    """What ``megatron_tpo.build.build_tpo`` assembles for one rank."""

    config: TPOConfig
    digest: str                     # of the settings that decide stage outputs
    tokenizer: object
    engine: RolloutEngine           # this rank's replica
    judge: Optional[Judge]          # rank 0 only (a rule judge), unless judge_on_every_rank
    trainer: object                 # DPOTrainer
    checkpointer: object            # TrainingCheckpointer
    store: IterationStore
    metrics: RunMetrics
    preemption: PreemptionGuard
    prompts: List[str]              # the whole training instruction set
    heldout: List[str]
    engine_tensor_parallel_size: int = 1   # ranks per engine replica
    # A judge that generates through engines (pairwise) runs on every rank, spreading
    # its prompts over the replicas (with a model of its own, that model's engine); a
    # reward model spreads its responses over the ranks.
    judge_on_every_rank: bool = False
    judge_engine: Optional[RolloutEngine] = None
