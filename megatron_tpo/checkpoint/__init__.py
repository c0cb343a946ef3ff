"""Training checkpoints on megatron-core dist_checkpointing: atomic, verified, reshardable.

    checkpointer = TrainingCheckpointer(run_dir / "checkpoints", CheckpointConfig(keep_last=2))
    loop_state = checkpointer.load_latest(trainer.ddp_chunks, trainer.optimizer,
                                          trainer.scheduler)      # None on a fresh run
    ...
    checkpointer.save(step, trainer.ddp_chunks, trainer.optimizer, trainer.scheduler,
                      {"iteration": t, "step_in_iteration": k})  # on every rank
"""

from megatron_tpo.checkpoint.config import CheckpointConfig, CheckpointError
from megatron_tpo.checkpoint.training import TrainingCheckpointer

__all__ = ["CheckpointConfig", "CheckpointError", "TrainingCheckpointer"]
