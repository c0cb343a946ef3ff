"""The numbers of a run: one record per iteration, and ``summary.json`` at the end.

Everything here is read back from the store and ``metrics.jsonl``, so a resumed run
reports the same as an uninterrupted one.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

from megatron_tpo.data.storage import IterationStore
from megatron_tpo.evaluation.heldout import heldout_metrics
from megatron_tpo.preference.iteration import IterationData
from megatron_tpo.preference.summary import iteration_summary


def iteration_record(store: IterationStore, t: int, sync: Optional[dict] = None) -> dict:
    """Data summary of iteration t (rollouts, judgments, pairs), M_t's held-out metrics and
    the weight sync's figures."""
    rollouts = store.read(t, "rollouts")
    data = IterationData(rollouts=rollouts, judgments=store.read(t, "judgments"),
                         pairs=store.read(t, "pairs"))
    record = dict(iteration_summary(data))
    record["truncated_rate"] = (sum(r["finish_reason"] == "length" for r in rollouts)
                                / max(len(rollouts), 1))
    record["mean_prompt_tokens"] = (sum(len(r["prompt_token_ids"]) for r in rollouts)
                                    / max(len(rollouts), 1))
    record["mean_completion_tokens"] = (sum(len(r["output_token_ids"]) for r in rollouts)
                                        / max(len(rollouts), 1))
    if store.is_finished(t, "heldout"):
        record.update(heldout_metrics(store.read(t, "heldout"), _first_heldout(store)))
    record.update({f"weight_sync/{k}": v for k, v in (sync or {}).items()})
    return record


def _first_heldout(store: IterationStore) -> Optional[List[dict]]:
    """M_0's held-out rows (iteration 0's), which every M_t's rows are set against."""
    return store.read(0, "heldout") if store.is_finished(0, "heldout") else None


def last_per_iteration(records: List[dict]) -> List[dict]:
    """A redone iteration (after a crash) logged twice; its last record counts."""
    latest: Dict[int, dict] = {}
    for record in records:
        latest[record["iteration"]] = record
    return [latest[t] for t in sorted(latest)]


def run_summary(store: IterationStore, iteration_records: List[dict], iterations: int,
                thought: str) -> dict:
    first = _first_heldout(store)
    heldout = [heldout_metrics(store.read(t, "heldout"), first) for t in range(iterations + 1)
               if store.is_finished(t, "heldout")]
    return {
        "thought": thought,
        "heldout_score": [h["heldout/score"] for h in heldout],
        "heldout_win_rate_vs_m0": [h["heldout/win_rate_vs_m0"] for h in heldout],
        "heldout_parse_rate": [h["heldout/parse_rate"] for h in heldout],
        "heldout_lc_win_rate_vs_m0": [h.get("heldout/lc_win_rate_vs_m0") for h in heldout],
        "iterations": last_per_iteration(iteration_records),
    }


def write_summary(summary: dict, path: Path) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(summary, indent=2))
    temporary.replace(path)


def summary_table(summaries: Dict[str, dict]) -> str:
    """Held-out score per iteration, one column per run (M_0 first)."""
    names = list(summaries)
    rows = max(len(s["heldout_score"]) for s in summaries.values())
    header = "| model | " + " | ".join(f"{n} score | {n} win vs M_0" for n in names) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(names))]
    for t in range(rows):
        cells = []
        for name in names:
            scores = summaries[name]["heldout_score"]
            wins = summaries[name]["heldout_win_rate_vs_m0"]
            cells += [f"{scores[t]:.3f}" if t < len(scores) else "",
                      f"{wins[t]:.3f}" if t < len(wins) else ""]
        lines.append(f"| M_{t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_shares(iteration_records: List[dict]) -> Dict[str, float]:
    """Each stage's share of the run's staged wall time (``timing/*``, all iterations)."""
    totals: Dict[str, float] = {}
    for record in iteration_records:
        for key, value in record.items():
            if key.startswith("timing/"):
                totals[key[len("timing/"):]] = totals.get(key[len("timing/"):], 0.0) + value
    whole = sum(totals.values()) or 1.0
    return {stage: seconds / whole for stage, seconds in sorted(totals.items(),
                                                               key=lambda item: -item[1])}
