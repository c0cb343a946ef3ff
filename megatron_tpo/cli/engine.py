"""``tpo-engine``: the rollout engines of ``rollout.placement=separate``, as their own world.

    srun tpo-engine experiment=llama3_70b rollout=paper_separate \\
        rollout.bridge.address=$TRAINER_HOST rollout.bridge.engine_ranks=$SLURM_NTASKS
    torchrun --nproc-per-node 2 -m megatron_tpo.cli.engine experiment=tiny_cpu \\
        rollout.placement=separate rollout.bridge.engine_ranks=2

Takes tpo-run's overrides (give both the same ones) and uses the rollout group and
run.policy. Each rank (torchrun or srun) builds its engine with ``build_rollout_engine``
(vllm: one engine per block of rollout.vllm.tensor_parallel_size ranks, through vLLM's
external_launcher in this world; hf: one per rank), connects to trainer rank 0 at
rollout.bridge.address:port, and serves it (weights, generation, scoring, checksums)
until tpo-run asks it to stop. Exit status: 0 when stopped by the trainer, 1 when the
trainer went away without asking, 2 for a bad setting.
"""

import logging
import signal
import sys

from megatron_tpo.config.errors import ConfigError

USAGE = "usage: tpo-engine [KEY=VALUE | GROUP=NAME ...]   (tpo-engine --help for more)"


def check_settings(rollout, world_size: int) -> None:
    rollout.validate()
    if rollout.placement != "separate":
        raise ConfigError(f"rollout.placement={rollout.placement!r}: tpo-engine serves only "
                          "placement=separate (colocated engines live inside tpo-run)")
    if rollout.bridge.engine_ranks != world_size:
        raise ConfigError(f"rollout.bridge.engine_ranks={rollout.bridge.engine_ranks}, but "
                          f"tpo-engine was started with {world_size} ranks")


def start_engine_world(environment, timeout_minutes: int = 30) -> None:
    """This pool's own torch.distributed world, started as tpo-run's is (vLLM's
    external_launcher reuses it and reads RANK/LOCAL_RANK/MASTER_* from the environment)."""
    from megatron_tpo.parallel.launch import start_distributed

    start_distributed(environment, timeout_minutes)


def serve(config, environment) -> bool:
    """Build this rank's engine, join the bridge, serve until stopped (True) or abandoned."""
    from megatron_tpo.parallel.launch import share_cpu_threads
    from megatron_tpo.rollout.bridge import open_engine_side
    from megatron_tpo.rollout.engine_server import EngineServer
    from megatron_tpo.rollout.factory import build_rollout_engine

    start_engine_world(environment, config.run.process_group_timeout_minutes)
    share_cpu_threads(environment.local_world_size)
    rollout = config.rollout
    engine = build_rollout_engine(rollout, config.run.policy)
    bridge = open_engine_side(rollout.bridge, environment.rank)
    return EngineServer(engine, bridge, rollout.ranks_per_engine).serve()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    from megatron_tpo.cli.run import compose_config
    from megatron_tpo.parallel import detect_distributed_env

    environment = detect_distributed_env()
    try:
        config = compose_config(argv)
        check_settings(config.rollout, environment.world_size)
    except ConfigError as error:
        print(f"{USAGE}\ntpo-engine: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    # Slurm's preemption warning (--signal=USR1) reaches every step of the job; it is the
    # trainer's cue to checkpoint and requeue, and the pool must keep serving until then
    # (USR1's default action would end it under the trainer's feet).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    stopped = serve(config, environment)
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if stopped else 1


if __name__ == "__main__":
    sys.exit(main())
