"""``tpo-run``: Thought Preference Optimization, from M_0 to M_T, on one machine or a cluster.

    tpo-run experiment=tiny_cpu                      # local: spawns TP*PP*DP gloo processes
    tpo-run experiment=tiny_cpu thought=direct       # the direct-response baseline
    srun tpo-run experiment=llama3_70b run.dir=/ckpt/tpo70b   # one rank per task

Arguments are Hydra overrides of configs/tpo.yaml: pick a file of a group (model=,
parallel=, train=, rollout=, judge=, thought=, prompts=, experiment=) or set any key
(train.lr=1e-6, run.iterations=4). The resolved config is checked whole before any
process group, weight or prompt is touched; a bad key or value stops with its name.
A run directory resumes where it stopped: finished stages are read back, training
continues from the newest checkpoint.
"""

import logging
import sys
from typing import List, Optional

from megatron_tpo.config.errors import ConfigError

USAGE = "usage: tpo-run [KEY=VALUE | GROUP=NAME ...]   (tpo-run --help for more)"


def compose_config(overrides: List[str]):
    """``configs/tpo.yaml`` with ``overrides``, as a ``TPOConfig`` (not yet validated)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from megatron_tpo.config.loading import CONFIG_DIR
    from megatron_tpo.config.tpo import register_with_hydra

    register_with_hydra()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = compose(config_name="tpo", overrides=list(overrides))
        return OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(" ".join(str(error).split())) from error


def run_rank(rank: int, world_size: int, config) -> Optional[dict]:
    """One rank of the job: megatron, the parts, the loop; always torn down."""
    from megatron_tpo.build import build_tpo
    from megatron_tpo.loop import run_tpo
    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.parallel.preemption import Preempted

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron_tpo").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    init_megatron(config.parallel, config.model, seed=config.run.seed)
    parts = None
    try:
        parts = build_tpo(config)
        return run_tpo(parts)
    except Preempted as stop:
        logging.getLogger("tpo-run").warning("%s; checkpoint saved", stop)
        if rank == 0:
            parts.preemption.requeue()
        return None
    finally:
        if parts is not None:
            parts.metrics.close()
        shutdown_megatron()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    from megatron_tpo.parallel import detect_distributed_env

    environment = detect_distributed_env()
    try:
        config = compose_config(argv)
        world_size = (config.parallel.model_parallel_size if environment.launcher == "single"
                      else environment.world_size)
        config.validate(world_size)
    except ConfigError as error:
        print(f"{USAGE}\ntpo-run: error: {error}", file=sys.stderr)
        return 2
    if environment.launcher == "single" and world_size > 1:
        from megatron_tpo.parallel.local_launch import spawn_local

        print(f"tpo-run: {world_size} local processes (gloo), run directory {config.run.dir}",
              flush=True)
        summary = spawn_local(run_rank, world_size, config)[0]
    else:
        summary = run_rank(environment.rank, environment.world_size, config)
    if summary is not None and environment.rank == 0:
        print_result(config, summary)
    return 0


def print_result(config, summary: dict) -> None:
    from megatron_tpo.report.summary import summary_table

    print(summary_table({config.thought.name: summary}))
    print(f"summary: {config.run.dir}/summary.json   plot: {config.run.dir}/iterations.png")


if __name__ == "__main__":
    sys.exit(main())
