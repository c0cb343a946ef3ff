"""What one TPO iteration did, from a run directory: printed, and samples for a person.

    python examples/smollm2_cpu/report.py runs/smollm2_cpu/tpo

Prints the parse rate, thought and response lengths, pair margins, the DPO metrics and
the wall time of every stage (metrics.jsonl ``timing/*``), and writes ``samples.md`` in
the run directory: held-out answers of M_0 beside M_1's, and a few training pairs.
"""

import json
import statistics
import sys
from collections import Counter
from pathlib import Path

from megatron_tpo.data.storage import IterationStore


def _mean(values):
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def _records(run_dir: Path, kind: str):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def rollout_summary(rows, tokenizer) -> None:
    parsed = [r for r in rows if r["parse_ok"]]
    print(f"rollouts: {len(rows)} samples, parse rate {len(parsed) / max(len(rows), 1):.1%}, "
          f"finish {dict(Counter(r['finish_reason'] for r in rows))}, failures "
          f"{dict(Counter(r['parse_failure'] for r in rows if not r['parse_ok']))}")
    tokens = lambda text: len(tokenizer(text or "", add_special_tokens=False)["input_ids"])
    print(f"  output tokens, mean {_mean(len(r['output_token_ids']) for r in rows):.0f}; parsed: "
          f"thought {_mean(tokens(r['thought']) for r in parsed):.0f} tokens, "
          f"response {_mean(tokens(r['response']) for r in parsed):.0f} tokens")


def pair_summary(pairs) -> None:
    print(f"pairs: {len(pairs)}, rejected because {dict(Counter(p['rejected_reason'] for p in pairs))}")
    judged = [p for p in pairs if p["rejected_reason"] == "judged"]
    if judged:
        print(f"  judged pairs: score margin mean {_mean(p['score_margin'] for p in judged):.3f}, "
              f"length margin mean {_mean(p['length_margin'] for p in judged):.1f}")


def training_summary(run_dir: Path) -> None:
    for step in _records(run_dir, "train_step"):
        values = {k: v for k, v in step.items() if k.split("/")[0] in (
            "loss", "rewards", "grad_norm", "lr")}
        print("  DPO " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(values.items())
                                   if isinstance(v, (int, float))))
    for record in _records(run_dir, "iteration"):
        timings = {k: v for k, v in record.items() if k.startswith("timing/")}
        print("stage wall time (s): " + ", ".join(f"{k[7:]} {v:.1f}" for k, v in timings.items()))


def heldout_samples(store: IterationStore, iterations: int, out: Path, pairs) -> None:
    before, after = store.read(0, "heldout"), store.read(iterations, "heldout")
    for name, rows in (("M_0", before), (f"M_{iterations}", after)):
        print(f"held-out {name}: parse rate {_mean(r['parse_ok'] for r in rows):.0%}, "
              f"output tokens mean {_mean(r['output_tokens'] for r in rows):.0f}")
    lines = ["# Held-out answers before and after the iteration (greedy)\n"]
    for then, now in zip(before, after):
        lines += [f"## {then['instruction']}\n", "### M_0\n", "```", then["output"], "```\n",
                  f"### M_{iterations} (win against M_0: {now['win_against_first']})\n", "```",
                  now["output"], "```\n"]
    lines.append("# Training pairs of iteration 0\n")
    for pair in pairs[:3]:
        lines += [f"## {pair['instruction']} (rejected: {pair['rejected_reason']})\n",
                  "### chosen\n", "```", pair["chosen"], "```\n", "### rejected\n", "```",
                  pair["rejected"], "```\n"]
    out.write_text("\n".join(lines))
    print(f"samples: {out}")


def main(run_dir: str) -> None:
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(config["run"]["policy"])
    store = IterationStore(run_dir / "stages")
    rollout_summary(store.read(0, "rollouts"), tokenizer)
    pairs = store.read(0, "pairs")
    pair_summary(pairs)
    training_summary(run_dir)
    heldout_samples(store, config["run"]["iterations"], run_dir / "samples.md", pairs)


if __name__ == "__main__":
    main(sys.argv[1])
