"""The tiny run over several seeds: does TPO's gain over the direct baseline hold?

    python benchmarks/tiny_seeds.py                      # seeds 0..4, runs/tiny_seeds/seed_<s>
    python benchmarks/tiny_seeds.py --seeds 3 --reuse    # 0..2; a seed with a summary is read back
    python benchmarks/tiny_seeds.py --seed-list 7 11 -- run.iterations=2 tiny.sft.steps=300

Each seed is one ``tpo-tiny --seed s`` (its own task, tokenizer, M_0 and both arms), in
a process of its own. Prints, per arm, the mean and spread (sample standard deviation,
min and max) of the held-out score of M_0..M_T over the seeds, TPO's share of sampled
column-sum thoughts, and as its last line one JSON object:
``{"seeds", "tpo_final", "baseline_final", "tpo_m0", "baseline_m0", "tpo_scores",
"baseline_scores", "tpo_vs_baseline_final", "columns_share", "m0_thought_use", "seconds"}``.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="run seeds 0..N-1")
    parser.add_argument("--seed-list", type=int, nargs="+", help="these seeds instead")
    parser.add_argument("--root", default="runs/tiny_seeds")
    parser.add_argument("--reuse", action="store_true",
                        help="read back a seed whose summary.json exists instead of running it")
    parser.add_argument("overrides", nargs="*", help="passed to every tpo-tiny (after --)")
    return parser.parse_args(argv)


def run_seed(seed: int, root: Path, overrides: Sequence[str], reuse: bool) -> dict:
    summary_path = root / "summary.json"
    if not (reuse and summary_path.is_file()):
        command = [sys.executable, "-m", "megatron_tpo.cli.tiny", "--root", str(root),
                   "--seed", str(seed), *overrides]
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
            raise SystemExit(f"tiny_seeds: seed {seed} failed (exit {completed.returncode})")
        print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(summary_path.read_text())


def spread(values: Sequence[float]) -> str:
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{statistics.fmean(values):.3f} ± {deviation:.3f} "
            f"[{min(values):.3f}, {max(values):.3f}]")


def per_iteration_table(name: str, runs: Sequence[List[float]]) -> List[str]:
    lines = [f"{name}: held-out score per iteration over {len(runs)} seed(s), "
             "mean ± sd [min, max]"]
    for t in range(min(len(r) for r in runs)):
        lines.append(f"  M_{t}: {spread([r[t] for r in runs])}")
    return lines


def aggregate(seeds: Sequence[int], summaries: Sequence[dict]) -> Dict[str, object]:
    columns = [[s["kinds"]["columns"] for s in summary["tpo"]["sampled"]] for summary in summaries]
    return {
        "seeds": list(seeds),
        "tpo_final": [s["tpo"]["heldout_score"][-1] for s in summaries],
        "baseline_final": [s["baseline"]["heldout_score"][-1] for s in summaries],
        "tpo_m0": [s["tpo"]["heldout_score"][0] for s in summaries],
        "baseline_m0": [s["baseline"]["heldout_score"][0] for s in summaries],
        "tpo_scores": [s["tpo"]["heldout_score"] for s in summaries],
        "baseline_scores": [s["baseline"]["heldout_score"] for s in summaries],
        "tpo_vs_baseline_final": [s["tpo_vs_baseline_win_rate"][-1] for s in summaries],
        "columns_share": columns,
        # Whether M_0's response reads a thought written for it (tiny/thought_use.py).
        "m0_thought_use": [summary["m0"].get("thought_use") for summary in summaries],
        "seconds": [s.get("seconds") for s in summaries],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = args.seed_list if args.seed_list else list(range(args.seeds))
    root = Path(args.root)
    summaries = [run_seed(seed, root / f"seed_{seed}", args.overrides, args.reuse)
                 for seed in seeds]
    result = aggregate(seeds, summaries)
    for name, key in (("TPO (thought prompt)", "tpo_scores"),
                      ("direct baseline", "baseline_scores")):
        print("\n".join(per_iteration_table(name, result[key])))
    sampled = result["columns_share"]
    print("TPO: share of sampled thoughts that are the true column sums, M_0..M_{T-1}:")
    for t in range(min(len(c) for c in sampled)):
        print(f"  M_{t}: {spread([c[t] for c in sampled])}")
    uses = [use for use in result["m0_thought_use"] if use]
    if uses:
        print(f"M_0 given a thought, share of right answers over {len(uses)} seed(s):")
        for kind in uses[0]["correct"]:
            print(f"  after {kind}: {spread([use['correct'][kind] for use in uses])}")
        print(f"  answer the wrong sums add up to: "
              f"{spread([use['follows_wrong_sums'] for use in uses])}")
    gains = [a - b for a, b in zip(result["tpo_final"], result["baseline_final"])]
    print(f"final TPO minus baseline: {spread(gains)}; TPO ahead on "
          f"{sum(g > 0 for g in gains)} of {len(gains)} seeds")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
