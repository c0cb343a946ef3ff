"""Process groups from torchrun/Slurm, megatron's parallel state, and the CPU adapter."""

from megatron_tpo.parallel.launch import (
    DistributedEnv, detect_distributed_env, expand_slurm_nodelist, init_megatron,
    shutdown_megatron,
)

__all__ = ["DistributedEnv", "detect_distributed_env", "expand_slurm_nodelist",
           "init_megatron", "shutdown_megatron"]
