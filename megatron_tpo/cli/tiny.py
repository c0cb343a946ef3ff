"""``tpo-tiny``: the tiny CPU run that shows thinking pays (what ``make tiny`` runs).

    tpo-tiny                          # assets, then TPO and the direct baseline, 3 iterations
    tpo-tiny --seed 1                 # the same comparison from another seed
    tpo-tiny parallel=tp2_pp2         # any tpo-run override applies to both runs
    tpo-tiny --prepare-only           # only the task, tokenizer and warm-started M_0
    tpo-tiny --report-only            # summary, table and PNG again from the finished runs
    tpo-tiny tiny.thought_mix.columns=0.5 tiny.sft.steps=300   # the warm start's settings

Nothing is downloaded: a multi-step addition task is generated, a tokenizer trained on
it with `tokenizers`, and ONE tiny Llama, M_0, warm-started by a short supervised phase
on direct answers and on the thought format with thoughts of mixed kinds (column sums,
wrong sums, restatements, unrelated text; every one followed by the correct answer, so
it is never told which kind helps). Then the TPO loop runs from M_0 with the thought
prompt (``experiment=tiny_cpu``), and the same loop from the same M_0 with
``thought=direct``: same judge, same DPO, same budget. Each run's directory holds its
stages, checkpoints, metrics and plot; ``<root>/summary.json`` and
``<root>/tpo_vs_baseline.png`` set the two side by side, with the kinds of thought TPO
samples per iteration (classified from the stored rollouts).
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

from megatron_tpo.config.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpo-tiny", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--root", default="runs/tiny", help="where assets and runs go")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the task, the warm start and both TPO runs")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild summary.json, the table and the PNG from finished runs")
    parser.add_argument("overrides", nargs="*",
                        help="tpo-run overrides for both runs; tiny.<key>=<value> sets the "
                             "task and warm start (TinyTaskConfig)")
    return parser


def split_overrides(overrides: List[str]) -> Tuple[List[str], List[str]]:
    """(tiny.* overrides, tpo-run overrides)."""
    tiny = [o for o in overrides if o.startswith("tiny.")]
    return tiny, [o for o in overrides if not o.startswith("tiny.")]


def apply_tiny_overrides(config, overrides: List[str]):
    """``tiny.sft.steps=300``, ``tiny.thought_mix.restate=0``: set on the TinyTaskConfig,
    typed like the value they replace; an unknown key is refused by name."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ConfigError(f"{override}: a tiny override is tiny.<key>=<value>")
        *parents, leaf = key.split(".")[1:]
        target = config
        for part in parents:
            if not hasattr(target, part):
                raise ConfigError(f"{key}: no such setting")
            target = getattr(target, part)
        if isinstance(target, dict):
            if leaf not in target and parents != ["thought_mix"]:
                raise ConfigError(f"{key}: no such setting")
            target[leaf] = _typed(key, text, float)
            continue
        if not leaf or not hasattr(target, leaf) or isinstance(getattr(target, leaf), dict):
            raise ConfigError(f"{key}: no such setting")
        setattr(target, leaf, _typed(key, text, type(getattr(target, leaf))))
    return config


def _typed(key: str, text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}={text}: must be a {kind.__name__}") from None


def run_configs(root: Path, seed: int, assets, overrides: List[str]) -> Dict[str, object]:
    """The TPO run and its direct-response baseline: one setting apart, the same M_0."""
    from megatron_tpo.cli.run import compose_config

    common = ["experiment=tiny_cpu", f"run.seed={seed}",
              f"model.vocab_size={assets.manifest['vocab_size']}",
              f"prompts.path={assets.train_prompts}", f"evaluation.path={assets.heldout_prompts}",
              f"judge.exact_answer.answers_path={assets.answers}"]
    runs = {"tpo": ["thought=generic", f"run.policy={assets.policy}"],
            "baseline": ["thought=direct", f"run.policy={assets.policy}"]}
    return {name: compose_config(common + extra + [f"run.dir={root / name}"] + overrides)
            for name, extra in runs.items()}


def task_config(seed: int, overrides: List[str], tiny_overrides: List[str] = ()):
    """As many new training instructions as the run's iterations take, and the held-out set
    its evaluation asks for; ``tiny_overrides`` set the rest."""
    from megatron_tpo.cli.run import compose_config
    from megatron_tpo.tiny.assets import TinyTaskConfig

    run = compose_config(["experiment=tiny_cpu"] + overrides)
    config = TinyTaskConfig(seed=seed,
                            train_size=run.run.iterations * run.prompts.prompts_per_iteration,
                            heldout_size=run.evaluation.num_prompts)
    return apply_tiny_overrides(config, list(tiny_overrides))


def main(argv=None) -> int:
    from megatron_tpo.cli.run import USAGE, run_rank
    from megatron_tpo.parallel.local_launch import spawn_local
    from megatron_tpo.tiny.assets import prepare_tiny_assets

    args = build_parser().parse_args(argv)
    root = Path(args.root)
    started = time.perf_counter()
    tiny_overrides, overrides = split_overrides(args.overrides)
    try:
        task = task_config(args.seed, overrides, tiny_overrides)
        task.validate()
    except ConfigError as error:
        print(f"{USAGE}\ntpo-tiny: error: {error}", file=sys.stderr)
        return 2
    print(f"tpo-tiny: task, tokenizer and warm-started M_0 in {root / 'assets'}", flush=True)
    assets = prepare_tiny_assets(root / "assets", task)
    if args.prepare_only:
        return 0
    try:
        configs = run_configs(root, args.seed, assets, overrides)
        for config in configs.values():
            config.validate(config.parallel.model_parallel_size)
    except ConfigError as error:
        print(f"{USAGE}\ntpo-tiny: error: {error}", file=sys.stderr)
        return 2
    summaries = {}
    if args.report_only:
        import json

        summaries = {name: json.loads((Path(c.run.dir) / "summary.json").read_text())
                     for name, c in configs.items()}
        report(root, summaries, {name: c.run.dir for name, c in configs.items()},
               json.loads((root / "summary.json").read_text()).get("seconds", 0.0)
               if (root / "summary.json").is_file() else 0.0, assets)
        return 0
    for name, config in configs.items():
        print(f"tpo-tiny: {name} ({config.thought.name} prompt), {config.run.iterations} "
              f"iterations in {config.run.dir}", flush=True)
        world_size = config.parallel.model_parallel_size
        summaries[name] = spawn_local(run_rank, world_size, config)[0]
    report(root, summaries, {name: c.run.dir for name, c in configs.items()},
           time.perf_counter() - started, assets)
    return 0


def report(root: Path, summaries: Dict[str, dict], run_dirs: Dict[str, str], seconds: float,
           assets) -> None:
    """summary.json: each arm's run summary with its thought kinds and lengths per
    iteration (from the stored rollouts), the head-to-head win rate, M_0 (what it samples,
    and whether its response reads a thought written for it), the warm start."""
    from megatron_tpo.report.summary import timing_shares, write_summary
    from megatron_tpo.tiny.report import pair_lines, plot_report, report_table, tiny_report
    from megatron_tpo.tiny.thought_use import policy_thought_use, thought_use_line

    details = tiny_report({name: Path(path) for name, path in run_dirs.items()})
    thought_use = policy_thought_use(assets.policy, assets.heldout_prompts)
    combined = {name: {**summary, **details[name]} for name, summary in summaries.items()}
    combined.update({"tpo_vs_baseline_win_rate": details["tpo_vs_baseline_win_rate"],
                     "m0": {**details["m0"], "thought_use": thought_use},
                     "warm_start": assets.manifest["warm_start"], "seconds": seconds})
    write_summary(combined, root / "summary.json")
    plot = plot_report(summaries, details, root / "tpo_vs_baseline.png")
    print(report_table(summaries, details))
    print("\n".join(pair_lines(details)))
    print(thought_use_line(thought_use))
    for name, summary in summaries.items():
        shares = ", ".join(f"{stage} {share:.0%}"
                           for stage, share in timing_shares(summary["iterations"]).items())
        print(f"{name}: {shares}")
    final = {name: s["heldout_score"][-1] for name, s in summaries.items()}
    print(f"final held-out score: TPO {final['tpo']:.3f}, direct baseline "
          f"{final['baseline']:.3f}; {seconds / 60:.1f} min in all")
    print(f"summary: {root / 'summary.json'}\nplot:    {plot}")


if __name__ == "__main__":
    sys.exit(main())
