"""``tpo-tiny``: the tiny CPU run that shows thinking pays (what ``make tiny`` runs).

    tpo-tiny                          # assets, then TPO and the direct baseline, 3 iterations
    tpo-tiny --seed 1                 # the same comparison from another seed
    tpo-tiny parallel=tp2_pp2         # any tpo-run override applies to both runs
    tpo-tiny --prepare-only           # only the task, tokenizer and warm-started M_0

Nothing is downloaded: a multi-step addition task is generated, a tokenizer trained on
it with `tokenizers`, and a tiny Llama warm-started by a short supervised phase to write
thought + response (and, for the baseline, direct responses). Then the TPO loop runs
(``experiment=tiny_cpu``), and the same loop with ``thought=direct``: same judge, same
DPO, same budget. Each run's directory holds its stages, checkpoints, metrics and plot;
``<root>/summary.json`` and ``<root>/tpo_vs_baseline.png`` set the two side by side.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List

from megatron_tpo.config.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpo-tiny", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--root", default="runs/tiny", help="where assets and runs go")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the task, the warm start and both TPO runs")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="tpo-run overrides for both runs")
    return parser


def run_configs(root: Path, seed: int, assets, overrides: List[str]) -> Dict[str, object]:
    """The TPO run and its direct-response baseline: one setting apart (and each warm
    start's own M_0, trained with the same budget)."""
    from megatron_tpo.cli.run import compose_config

    common = ["experiment=tiny_cpu", f"run.seed={seed}",
              f"model.vocab_size={assets.manifest['vocab_size']}",
              f"prompts.path={assets.train_prompts}", f"evaluation.path={assets.heldout_prompts}",
              f"judge.exact_answer.answers_path={assets.answers}"]
    runs = {"tpo": ["thought=generic", f"run.policy={assets.policy_thought}"],
            "baseline": ["thought=direct", f"run.policy={assets.policy_direct}"]}
    return {name: compose_config(common + extra + [f"run.dir={root / name}"] + overrides)
            for name, extra in runs.items()}


def task_config(seed: int, overrides: List[str]):
    """As many new training instructions as the run's iterations take, and the held-out set
    its evaluation asks for."""
    from megatron_tpo.cli.run import compose_config
    from megatron_tpo.tiny.assets import TinyTaskConfig

    run = compose_config(["experiment=tiny_cpu"] + overrides)
    return TinyTaskConfig(seed=seed,
                          train_size=run.run.iterations * run.prompts.prompts_per_iteration,
                          heldout_size=run.evaluation.num_prompts)


def main(argv=None) -> int:
    from megatron_tpo.cli.run import USAGE, run_rank
    from megatron_tpo.parallel.local_launch import spawn_local
    from megatron_tpo.tiny.assets import prepare_tiny_assets

    args = build_parser().parse_args(argv)
    root = Path(args.root)
    started = time.perf_counter()
    print(f"tpo-tiny: task, tokenizer and warm-started M_0 in {root / 'assets'}", flush=True)
    assets = prepare_tiny_assets(root / "assets", task_config(args.seed, args.overrides))
    if args.prepare_only:
        return 0
    try:
        configs = run_configs(root, args.seed, assets, args.overrides)
        for config in configs.values():
            config.validate(config.parallel.model_parallel_size)
    except ConfigError as error:
        print(f"{USAGE}\ntpo-tiny: error: {error}", file=sys.stderr)
        return 2
    summaries = {}
    for name, config in configs.items():
        print(f"tpo-tiny: {name} ({config.thought.name} prompt), {config.run.iterations} "
              f"iterations in {config.run.dir}", flush=True)
        world_size = config.parallel.model_parallel_size
        summaries[name] = spawn_local(run_rank, world_size, config)[0]
    report(root, summaries, time.perf_counter() - started)
    return 0


def report(root: Path, summaries: Dict[str, dict], seconds: float) -> None:
    from megatron_tpo.report.plots import plot_iterations
    from megatron_tpo.report.summary import summary_table, timing_shares, write_summary

    write_summary(summaries, root / "summary.json")
    plot = plot_iterations({name: s["iterations"] for name, s in summaries.items()},
                           root / "tpo_vs_baseline.png",
                           {name: s["heldout_score"] for name, s in summaries.items()})
    print(summary_table(summaries))
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
