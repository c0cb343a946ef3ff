"""``tpo-run``: Thought Preference Optimization, from M_0 to M_T, on one machine or a cluster.

    tpo-run experiment=tiny_cpu                      # local: spawns TP*PP*DP gloo processes
    tpo-run experiment=tiny_cpu thought=direct       # the direct-response baseline
    tpo-run --dry-run experiment=llama3_70b          # check the whole config, start nothing
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
    from megatron_tpo.tpo_config import TPOConfig, register_with_hydra

    register_with_hydra()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = compose(config_name="tpo", overrides=list(overrides))
        # Merged into the schema once more: a key appended with "+" is refused here too.
        plain = OmegaConf.to_container(composed, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TPOConfig), plain))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_composition_message(error)) from error


def _composition_message(error: Exception) -> str:
    """Hydra's message, with the reason it keeps in ``__cause__`` and without its advice to
    append unknown keys with ``+`` (the typed schema would refuse them anyway)."""
    message = " ".join(str(error).split())
    if error.__cause__ is not None:
        message += f": {' '.join(str(error.__cause__).split())}"
    if "Could not override" in message:
        key = message.split("'")[1]
        message = f"{key}: no such setting (see configs/ or tpo-run --help)"
    return message


def run_rank(rank: int, world_size: int, config) -> Optional[dict]:
    """One rank of the job: megatron, the parts, the loop; always torn down."""
    from megatron_tpo.build import build_tpo
    from megatron_tpo.loop import run_tpo
    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.parallel.preemption import Preempted

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron_tpo").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    init_megatron(config.parallel, config.model, seed=config.run.seed,
                  timeout_seconds=config.run.process_group_timeout_seconds)
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
            for engine in (parts.engine, parts.judge_engine):
                if engine is not None:
                    engine.close()   # while the world it may share still exists
        shutdown_megatron()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    dry_run = "--dry-run" in argv
    argv = [arg for arg in argv if arg != "--dry-run"]
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
    if dry_run:
        try:
            print(dry_run_report(config, world_size))
        except ConfigError as error:
            print(f"tpo-run: error: {error}", file=sys.stderr)
            return 2
        return 0
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


def describe(config, world_size: int) -> str:
    parallel = config.parallel
    return (f"tpo-run: config valid for {world_size} rank(s): model {config.model.name} at "
            f"TP={parallel.tensor_model_parallel_size} PP={parallel.pipeline_model_parallel_size}"
            f" VPP={parallel.virtual_pipeline_model_parallel_size or 1} "
            f"DP={parallel.data_parallel_size(world_size)}; {config.run.iterations} iterations "
            f"of {config.prompts.prompts_per_iteration} prompts x {config.rollout.sampling.n} "
            f"samples, thought={config.thought.name}, judge={config.judge.kind}, "
            f"engine={config.rollout.engine}; run directory {config.run.dir}")


def dry_run_report(config, world_size: int) -> str:
    """The layout, then each phase's peak memory per GPU on ``run.hardware``; a
    ConfigError naming the phase, the GPU, the numbers and the smallest fix where one
    does not fit (tpo-doctor calls this too)."""
    from megatron_tpo.plan.phase_fit import check_fit

    peaks = check_fit(config, world_size)
    if not peaks:
        fit = f"memory per phase: not checked (run.hardware={config.run.hardware})"
    else:
        fit = "\n".join(f"  fits: {peak.line()}" for peak in peaks)
    return f"{describe(config, world_size)}\n{fit}"


def print_result(config, summary: dict) -> None:
    from megatron_tpo.report.summary import summary_table

    print(summary_table({config.thought.name: summary}))
    print(f"summary: {config.run.dir}/summary.json   plot: {config.run.dir}/iterations.png")


if __name__ == "__main__":
    sys.exit(main())
