"""``tpo-engine``: the rollout engines of ``rollout.placement=separate``, as their own world;
with ``--serve judge``, the pairwise judge model's engines (``judge.pairwise.placement=
separate``).

    srun tpo-engine experiment=llama3_70b rollout=paper_separate \\
        rollout.bridge.address=$TRAINER_HOST rollout.bridge.engine_ranks=$SLURM_NTASKS
    torchrun --nproc-per-node 2 -m megatron_tpo.cli.engine experiment=tiny_cpu \\
        rollout.placement=separate rollout.bridge.engine_ranks=2
    srun tpo-engine --serve judge experiment=llama3_70b judge.pairwise.placement=separate \\
        judge.pairwise.bridge.address=$TRAINER_HOST judge.pairwise.bridge.engine_ranks=8

Takes tpo-run's overrides (give both the same ones) and uses the rollout group and
run.policy. Each rank (torchrun or srun) builds its engine with ``build_rollout_engine``
(vllm: one engine per block of rollout.vllm.tensor_parallel_size ranks, through vLLM's
external_launcher in this world; hf: one per rank), connects to trainer rank 0 at
rollout.bridge.address:port, and serves it (weights, generation, scoring, checksums)
until tpo-run asks it to stop.

``--serve judge`` builds each rank's engine from judge.pairwise.model (its own checkpoint
weights, loaded at start-up), with the policy's engine kind (rollout.engine) and the judge's
own judge.pairwise.vllm settings, and joins judge.pairwise.bridge (a port of its own, so
both pools may serve one trainer). It only ever generates verdicts: no weight pushes.
Exit status: 0 when stopped by the trainer, 1 when the trainer went away without asking,
2 for a bad setting.
"""

import logging
import signal
import sys

from megatron_tpo.config.errors import ConfigError

USAGE = ("usage: tpo-engine [--serve policy|judge] [KEY=VALUE | GROUP=NAME ...]   "
         "(tpo-engine --help for more)")
ROLES = ("policy", "judge")


def check_settings(rollout, world_size: int) -> None:
    rollout.validate()
    if rollout.placement != "separate":
        raise ConfigError(f"rollout.placement={rollout.placement!r}: tpo-engine serves only "
                          "placement=separate (colocated engines live inside tpo-run)")
    if rollout.bridge.engine_ranks != world_size:
        raise ConfigError(f"rollout.bridge.engine_ranks={rollout.bridge.engine_ranks}, but "
                          f"tpo-engine was started with {world_size} ranks")


def check_judge_settings(config, world_size: int) -> None:
    """``--serve judge``: a pairwise judge with a model of its own, placed in this pool."""
    from megatron_tpo.judge.config import check_judge_placement

    judge = config.judge
    judge.validate()
    if judge.kind != "pairwise" or judge.pairwise.model is None:
        raise ConfigError(f"judge.kind={judge.kind!r}, judge.pairwise.model="
                          f"{judge.pairwise.model}: tpo-engine --serve judge serves a pairwise "
                          "judge's own model only")
    if judge.pairwise.placement != "separate":
        raise ConfigError(f"judge.pairwise.placement={judge.pairwise.placement!r}: tpo-engine "
                          "--serve judge serves only placement=separate")
    check_judge_placement(judge, config.rollout)
    if judge.pairwise.bridge.engine_ranks != world_size:
        raise ConfigError(f"judge.pairwise.bridge.engine_ranks="
                          f"{judge.pairwise.bridge.engine_ranks}, but tpo-engine --serve judge "
                          f"was started with {world_size} ranks")


def split_role(argv):
    """``(role, the other arguments)`` from ``--serve ROLE`` / ``--serve=ROLE`` (policy)."""
    role, rest, arguments = "policy", [], iter(argv)
    for argument in arguments:
        if argument == "--serve":
            role = next(arguments, "")
        elif argument.startswith("--serve="):
            role = argument.split("=", 1)[1]
        else:
            rest.append(argument)
    if role not in ROLES:
        raise ConfigError(f"--serve {role!r}: must be one of {ROLES}")
    return role, rest


def start_engine_world(environment, timeout_seconds: float = 1800.0) -> None:
    """This pool's own torch.distributed world, started as tpo-run's is (vLLM's
    external_launcher reuses it and reads RANK/LOCAL_RANK/MASTER_* from the environment)."""
    from megatron_tpo.parallel.launch import start_distributed

    start_distributed(environment, timeout_seconds)


def serve(config, environment, role: str = "policy") -> bool:
    """Build this rank's engine, join the bridge, serve until stopped (True) or abandoned."""
    from megatron_tpo.judge.config import judge_engine_settings
    from megatron_tpo.parallel.launch import share_cpu_threads
    from megatron_tpo.rollout.factory import build_rollout_engine
    from megatron_tpo.rollout.pool.bridge import open_engine_side
    from megatron_tpo.rollout.pool.server import EngineServer

    start_engine_world(environment, config.run.process_group_timeout_seconds)
    share_cpu_threads(environment.local_world_size)
    if role == "judge":   # the judge's checkpoint, served as it is (never a weight push)
        settings, name = judge_engine_settings(config.rollout, config.judge.pairwise), \
            "judge.pairwise.bridge"
        engine = build_rollout_engine(settings, config.judge.pairwise.model,
                                      serves_checkpoint=True)
    else:   # the policy's, which waits for the trainer's first weight sync
        settings, name = config.rollout, "rollout.bridge"
        engine = build_rollout_engine(settings, config.run.policy)
    bridge = open_engine_side(settings.bridge, environment.rank, name)
    return EngineServer(engine, bridge, settings.ranks_per_engine).serve()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    from megatron_tpo.cli.run import compose_config
    from megatron_tpo.parallel import detect_distributed_env

    environment = detect_distributed_env()
    try:
        role, argv = split_role(argv)
        config = compose_config(argv)
        if role == "judge":
            check_judge_settings(config, environment.world_size)
        else:
            check_settings(config.rollout, environment.world_size)
    except ConfigError as error:
        print(f"{USAGE}\ntpo-engine: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    # Slurm's preemption warning (--signal=USR1) reaches every step of the job; it is the
    # trainer's cue to checkpoint and requeue, and the pool must keep serving until then
    # (USR1's default action would end it under the trainer's feet).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    stopped = serve(config, environment, role)
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if stopped else 1


if __name__ == "__main__":
    sys.exit(main())
