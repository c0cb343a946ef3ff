"""What one rank holds for the TPO loop: built by ``build.build_tpo``, run by ``loop.run_tpo``."""

from dataclasses import dataclass
from typing import List

from megatron_tpo.checkpoint.training import TrainingCheckpointer
from megatron_tpo.data.storage import IterationStore
from megatron_tpo.judge.base import Judge
from megatron_tpo.parallel.preemption import PreemptionGuard
from megatron_tpo.placement import Placement
from megatron_tpo.report.metrics import RunMetrics
from megatron_tpo.rollout.engine import RolloutEngine
from megatron_tpo.tpo_config import TPOConfig
from megatron_tpo.train.dpo_trainer import DPOTrainer
from megatron_tpo.weights import WeightPush


@dataclass
class TPOParts:
    """What ``megatron_tpo.build.build_tpo`` assembles for one rank (or, for the dry run,
    stand-ins of the trainer, checkpointer, weight push, engine and judge that do no
    compute but claim the same memory)."""

    config: TPOConfig
    digest: str                     # of the settings that decide stage outputs
    tokenizer: object
    engine: RolloutEngine           # this rank's replica, or a proxy of the engine pool
    judge: Judge                    # judges on every rank, or on rank 0 (judge.on_every_rank)
    trainer: DPOTrainer             # reference log-probs, DPO steps, its chunks
    checkpointer: TrainingCheckpointer
    weights: WeightPush             # the trainer's weights into the engine
    placement: Placement            # who holds accelerator memory in each phase
    store: IterationStore
    metrics: RunMetrics
    preemption: PreemptionGuard
    prompts: List[str]              # the whole training instruction set
    heldout: List[str]
    engine_tensor_parallel_size: int = 1   # ranks per engine replica
