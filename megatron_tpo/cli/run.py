"""``tpo-run``: Thought Preference Optimization, from M_0 to M_T, on one machine or a cluster.

    tpo-tiny --prepare-only                          # once: the tiny run's policy and prompts
    tpo-run experiment=tiny_cpu                      # local: spawns TP*PP*CP gloo processes (DP=1)
    tpo-run experiment=tiny_cpu thought=direct       # the direct-response baseline
    srun tpo-run experiment=llama3_70b run.dir=/ckpt/tpo70b   # one rank per task

    tpo-run --dry-run experiment=llama3_8b run.policy=... [--nodes N [--gpus-per-node G]
            | --world-size N] [--trace FILE]
    tpo-run --show-config experiment=tiny_cpu run.iterations=4   # every setting: value, meaning

Arguments are Hydra overrides of configs/tpo.yaml: pick a file of a group (model=,
parallel=, train=, rollout=, judge=, thought=, prompts=, experiment=) or set any key
(train.lr=1e-6, run.iterations=4). The resolved config is checked whole before any
process group, weight or prompt is touched; a bad key or value stops with its name (an
unknown key with the nearest known ones). --show-config prints every setting of the
composed config, after the overrides, as ``dotted.key = value  # what it means``, and
exits without checking or running anything (docs/configuration.md).
Without a launcher, tpo-run spawns one local process per model-parallel rank
(TP*PP*CP, data parallel size 1); under srun or torchrun each task is one rank.
A run directory resumes where it stopped: finished stages are read back, training
continues from the newest checkpoint.

--dry-run runs the run's own build and loop code for one iteration with stand-ins that
do no compute but claim the memory the real parts would, reads every file the job will
read, and prints each phase's peak on each kind of GPU (or refuses the first that does
not fit, with the smallest setting that fits); it starts no process group and writes
nothing but --trace (the ledger, as a run's ledger.jsonl). It sizes the world a launcher
gives it (srun, torchrun), else --world-size or --nodes x --gpus-per-node (8), else the
recipe's run.world_size, else TP*PP*CP ranks.
"""

import logging
import sys
from pathlib import Path
from typing import List, Optional, Tuple

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
        message = no_such_setting(message.split("'")[1])
    return message


def known_settings() -> List[str]:
    """Every key of the typed config (``TPOConfig``), dotted: what overrides may set."""
    from megatron_tpo.config.docs import documented_settings
    from megatron_tpo.tpo_config import TPOConfig

    return [key for key, _, _ in documented_settings(TPOConfig())]


def no_such_setting(key: str) -> str:
    """The error for an unknown key: the nearest known keys, or what its group holds
    (tpo-run --help does not list settings; this message does)."""
    import difflib

    known = known_settings()
    group, _, name = key.rpartition(".")
    starting_alike = [k for k in known if k.rpartition(".")[0] == group
                      and k.rpartition(".")[2].startswith(name)]
    close = starting_alike[:3] or difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    if close:
        return f"{key}: no such setting; did you mean {' or '.join(close)}?"
    inside = list(dict.fromkeys(k[len(group) + 1:].partition(".")[0] for k in known
                                if group and k.startswith(group + ".")))
    if inside:
        return f"{key}: no such setting; {group} has {', '.join(inside)}"
    groups = list(dict.fromkeys(k.partition(".")[0] for k in known))
    return f"{key}: no such setting; the groups are {', '.join(groups)}"


def show_config(config) -> str:
    """One line per setting of ``config``: ``dotted.key = value  # doc`` (values as JSON)."""
    import json

    from megatron_tpo.config.docs import documented_settings

    lines = []
    for key, value, doc in documented_settings(config):
        line = f"{key} = {json.dumps(value, default=str)}"
        lines.append(f"{line}  # {doc}" if doc else line)
    return "\n".join(lines)


def run_rank(rank: int, world_size: int, config) -> Optional[dict]:
    """One rank of the job: megatron, the parts, the loop; always torn down."""
    from megatron_tpo.build import build_tpo
    from megatron_tpo.loop import run_tpo
    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.parallel.preemption import Preempted

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron_tpo").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    say_expected_warnings_once(rank)
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
            parts.placement.close()   # engines first, while the world they share exists
        shutdown_megatron()


OPTIONS = ("--world-size", "--nodes", "--gpus-per-node", "--trace")


def split_arguments(argv: List[str]):
    """``(flags, options, overrides)``: ``--dry-run`` or ``--show-config``, the dry run's
    ``--name value`` options, and the Hydra overrides."""
    flags, options, overrides = set(), {}, []
    arguments = iter(argv)
    for argument in arguments:
        name, equals, value = argument.partition("=")
        if argument in ("--dry-run", "--show-config"):
            flags.add(argument)
        elif name in OPTIONS:
            value = value if equals else next(arguments, None)
            if value is None:
                raise ConfigError(f"{name} needs a value")
            options[name] = value
        elif argument.startswith("--"):
            raise ConfigError(f"{argument}: no such option (tpo-run --help)")
        else:
            overrides.append(argument)
    return flags, options, overrides


def dry_run_world(config, options: dict, environment) -> Tuple[int, str]:
    """The world the dry run sizes, and where that number came from."""
    def count(name: str) -> int:
        try:
            value = int(options[name])
        except ValueError:
            raise ConfigError(f"{name}={options[name]}: not a whole number") from None
        if value < 1:
            raise ConfigError(f"{name}={value}: must be >= 1")
        return value

    if "--world-size" in options:
        return count("--world-size"), "--world-size"
    if "--nodes" in options:
        per_node = count("--gpus-per-node") if "--gpus-per-node" in options else 8
        return count("--nodes") * per_node, f"--nodes x --gpus-per-node ({per_node})"
    if environment.launcher != "single":
        return environment.world_size, f"the {environment.launcher} launcher"
    if config.run.world_size is not None:
        return config.run.world_size, "the recipe's run.world_size"
    return config.parallel.model_parallel_size, "TP x PP x CP, no launcher"


# megatron-core warns from a dozen modules at import that it falls back to torch without
# Transformer Engine and Apex: on CPU that is the expected set-up, not fourteen warnings.
FALLBACK_WARNINGS = r"(Transformer Engine and Apex are|Apex is) not installed"


def say_expected_warnings_once(rank: int) -> None:
    import importlib.util
    import warnings

    warnings.filterwarnings("ignore", message=FALLBACK_WARNINGS)
    if rank == 0 and importlib.util.find_spec("transformer_engine") is None:
        logging.getLogger("megatron_tpo.run").info(
            "Transformer Engine is not installed: megatron-core runs its local layers and "
            "torch optimizers (expected on CPU; a GPU run wants it, see tpo-doctor)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    from megatron_tpo.parallel import detect_distributed_env

    try:
        flags, options, overrides = split_arguments(argv)
        if options and "--dry-run" not in flags:
            raise ConfigError(f"{', '.join(options)}: options of --dry-run only")
        if flags == {"--dry-run", "--show-config"}:
            raise ConfigError("--dry-run, --show-config: give one of them")
        config = compose_config(overrides)
        if "--show-config" in flags:
            print(show_config(config))
            return 0
        environment = detect_distributed_env()
        if "--dry-run" in flags:
            world_size, source = dry_run_world(config, options, environment)
        else:
            world_size = (config.parallel.model_parallel_size if environment.launcher == "single"
                          else environment.world_size)
        config.validate(world_size)
    except ConfigError as error:
        print(f"{USAGE}\ntpo-run: error: {error}", file=sys.stderr)
        return 2
    if "--dry-run" in flags:
        try:
            print(dry_run_report(config, world_size, source,
                                 Path(options["--trace"]) if "--trace" in options else None))
        except ConfigError as error:
            print(f"tpo-run: error: {error}\ntpo-run: sized for world size {world_size} "
                  f"({source})", file=sys.stderr)
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


def dry_run_report(config, world_size: int, source: str = "",
                   trace: Optional[Path] = None) -> str:
    """The layout, then each phase's peak on each kind of GPU of ``run.hardware``; a
    ConfigError naming the phase, the GPU, its tenants and the smallest fix where one
    does not fit (tpo-doctor calls this too)."""
    from megatron_tpo.dry_run import dry_run

    run = dry_run(config, world_size, trace)
    run.check()
    sized = f"sized for world size {world_size}" + (f" ({source})" if source else "")
    return f"{describe(config, world_size)}\n{sized}\n{run.report()}"


def print_result(config, summary: dict) -> None:
    from megatron_tpo.report.summary import summary_table

    print(summary_table({config.thought.name: summary}))
    print(f"summary: {config.run.dir}/summary.json   plot: {config.run.dir}/iterations.png")


if __name__ == "__main__":
    sys.exit(main())
