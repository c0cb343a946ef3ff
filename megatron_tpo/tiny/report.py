"""The tiny run's own report: which thoughts each arm samples, and how both arms score.

Everything is read back from the two run directories' stores
(``<run.dir>/stages/iteration_<t>/{rollouts,judgments,heldout}.parquet``), so the report
of a finished run can be rebuilt without running anything:

    report = tiny_report({"tpo": Path("runs/tiny/tpo"), "baseline": Path("runs/tiny/baseline")})
    report["tpo"]["sampled_kinds"][t]    # share of each thought kind among M_t's samples
    report["tpo_vs_baseline_win_rate"]   # per t, TPO's M_t against the baseline's M_t

Kinds are those of ``tiny/thoughts.py``, classified from each thought's text and its
instruction; the baseline's outputs have no thought ("none").
"""

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from megatron_tpo.data.storage import IterationStore
from megatron_tpo.report.plots import LENGTH, RATE, finish_iteration_panel, save_figure
from megatron_tpo.tiny.task import SumProblem
from megatron_tpo.tiny.thoughts import CLASSIFIED_KINDS, classify_thought, kind_shares


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def classify_rows(rows: Sequence[Mapping]) -> List[str]:
    """The thought kind of every rollout or held-out row (None thought: unparsed)."""
    return [classify_thought(SumProblem.from_instruction(row["instruction"]),
                             row["thought"] if row["parse_ok"] else None) for row in rows]


def sampled_iteration(store: IterationStore, t: int) -> dict:
    """M_t's training samples: kind shares, the judge's mean score per kind (an unjudged,
    unparsed sample scores 0, as it would in a pair), thought and response lengths."""
    rollouts = store.read(t, "rollouts")
    scores = {(row["prompt_id"], row["sample_index"]): row["score"]
              for row in store.read(t, "judgments")}
    kinds = classify_rows(rollouts)
    score_of = [scores.get((row["prompt_id"], row["sample_index"]), 0.0) for row in rollouts]
    parsed = [row for row in rollouts if row["parse_ok"]]
    record = {
        "kinds": kind_shares(kinds),
        "score_by_kind": {kind: _mean([s for k, s in zip(kinds, score_of) if k == kind])
                          for kind in CLASSIFIED_KINDS},
        "mean_score": _mean(score_of),
        "mean_thought_chars": _mean([len(row["thought"]) for row in parsed]),
        "mean_response_chars": _mean([len(row["response"]) for row in parsed]),
        "mean_output_tokens": _mean([len(row["output_token_ids"]) for row in rollouts]),
    }
    if store.is_finished(t, "pairs"):
        # What DPO is pushed towards and away from: the kinds of the chosen and rejected
        # outputs, picked by the judge from the responses alone.
        kind_of = {(row["prompt_id"], row["sample_index"]): kind
                   for row, kind in zip(rollouts, kinds)}
        pairs = store.read(t, "pairs")
        for side in ("chosen", "rejected"):
            record[f"{side}_kinds"] = kind_shares(
                [kind_of[(pair["prompt_id"], pair[f"{side}_index"])] for pair in pairs])
        record["pairs"] = len(pairs)
    return record


def heldout_iteration(store: IterationStore, t: int) -> dict:
    """M_t's greedy held-out answers: kind shares, score per kind, lengths."""
    rows = store.read(t, "heldout")
    kinds = classify_rows(rows)
    parsed = [row for row in rows if row["parse_ok"]]
    return {
        "kinds": kind_shares(kinds),
        "score_by_kind": {kind: _mean([row["score"] for k, row in zip(kinds, rows) if k == kind])
                          for kind in CLASSIFIED_KINDS},
        "mean_thought_chars": _mean([len(row["thought"]) for row in parsed]),
        "mean_response_chars": _mean([len(row["response"]) for row in parsed]),
    }


def head_to_head(first: Sequence[Mapping], second: Sequence[Mapping]) -> float:
    """Win rate of ``first``'s held-out answers over ``second``'s on the same instructions
    (1 a win, 0.5 a tie), by the scores each run's judge gave."""
    by_instruction = {row["instruction"]: row["score"] for row in second}
    outcomes = [1.0 if row["score"] > by_instruction[row["instruction"]] else
                0.5 if row["score"] == by_instruction[row["instruction"]] else 0.0
                for row in first]
    return sum(outcomes) / max(len(outcomes), 1)


def _iterations(store: IterationStore, stage: str) -> List[int]:
    t, found = 0, []
    while store.is_finished(t, stage):
        found.append(t)
        t += 1
    return found


def tiny_report(run_dirs: Mapping[str, Path]) -> dict:
    """Per arm: sampled and held-out thought kinds and lengths per iteration; both arms'
    head-to-head held-out win rate; what M_0 does with each prompt."""
    stores = {name: IterationStore(Path(path) / "stages") for name, path in run_dirs.items()}
    report: Dict[str, object] = {}
    for name, store in stores.items():
        report[name] = {
            "sampled": [sampled_iteration(store, t) for t in _iterations(store, "rollouts")],
            "heldout": [heldout_iteration(store, t) for t in _iterations(store, "heldout")],
        }
    if {"tpo", "baseline"} <= set(stores):
        common = min(len(_iterations(stores["tpo"], "heldout")),
                     len(_iterations(stores["baseline"], "heldout")))
        report["tpo_vs_baseline_win_rate"] = [
            head_to_head(stores["tpo"].read(t, "heldout"), stores["baseline"].read(t, "heldout"))
            for t in range(common)]
        report["m0"] = m0_report(report)
    return report


def m0_report(report: Mapping) -> dict:
    """What the one M_0 does with the thought prompt and with the bare instruction."""
    tpo, baseline = report["tpo"], report["baseline"]
    m0 = {"thought_prompt": {}, "direct_prompt": {}}
    if tpo["heldout"]:
        m0["thought_prompt"]["greedy_kinds"] = tpo["heldout"][0]["kinds"]
    if tpo["sampled"]:
        m0["thought_prompt"]["sampled_kinds"] = tpo["sampled"][0]["kinds"]
        m0["thought_prompt"]["sampled_score_by_kind"] = tpo["sampled"][0]["score_by_kind"]
        m0["thought_prompt"]["sampled_score"] = tpo["sampled"][0]["mean_score"]
    if baseline["sampled"]:
        m0["direct_prompt"]["sampled_score"] = baseline["sampled"][0]["mean_score"]
    return m0


SHOWN_KINDS = ("columns", "wrong_sums", "restate", "unrelated", "other", "unparsed")


def _cell(value: Optional[float], spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def pair_lines(report: Mapping) -> List[str]:
    """Per iteration, the kinds of TPO's chosen and rejected thoughts."""
    lines = []
    for t, sampled in enumerate(report["tpo"]["sampled"]):
        if "chosen_kinds" in sampled:
            lines.append(f"TPO pairs at t={t} ({sampled['pairs']}), " + " / ".join(SHOWN_KINDS)
                         + ": chosen " + " / ".join(f"{sampled['chosen_kinds'][k]:.2f}"
                                                    for k in SHOWN_KINDS)
                         + ", rejected " + " / ".join(f"{sampled['rejected_kinds'][k]:.2f}"
                                                      for k in SHOWN_KINDS))
    return lines


def report_table(summaries: Mapping[str, dict], report: Mapping) -> str:
    """Per iteration t: both arms' held-out score and win rate against their M_0, TPO's
    M_t against the baseline's, the kinds of TPO's sampled thoughts, and the lengths."""
    tpo, baseline = summaries["tpo"], summaries["baseline"]
    header = ("| M_t | TPO score | TPO win vs M_0 | baseline score | baseline win vs M_0 "
              "| TPO vs baseline | TPO sampled thoughts: " + " / ".join(SHOWN_KINDS)
              + " | TPO thought chars | TPO response chars | baseline response chars |")
    lines = [header, "|" + "---|" * 10]
    rows = max(len(tpo["heldout_score"]), len(baseline["heldout_score"]))
    for t in range(rows):
        def pick(values, index=t):
            return values[index] if index < len(values) else None
        sampled = pick(report["tpo"]["sampled"])
        base_sampled = pick(report["baseline"]["sampled"])
        kinds = (" / ".join(f"{sampled['kinds'][k]:.2f}" for k in SHOWN_KINDS)
                 if sampled else "(none sampled: last model)")
        lines.append("| " + " | ".join([
            f"M_{t}", _cell(pick(tpo["heldout_score"])),
            _cell(pick(tpo["heldout_win_rate_vs_m0"])), _cell(pick(baseline["heldout_score"])),
            _cell(pick(baseline["heldout_win_rate_vs_m0"])),
            _cell(pick(report.get("tpo_vs_baseline_win_rate", []))), kinds,
            _cell(sampled and sampled["mean_thought_chars"], ".1f"),
            _cell(sampled and sampled["mean_response_chars"], ".1f"),
            _cell(base_sampled and base_sampled["mean_response_chars"], ".1f")]) + " |")
    return "\n".join(lines)


def report_figure(summaries: Mapping[str, dict], report: Mapping):
    """The figure ``plot_report`` saves: six panels, each y-axis bounded by what its figure
    is (``report.plots.Scale``), so a wobble of a length does not fill its panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    (score, wins, sampled_kinds), (greedy_kinds, thought_len, response_len) = axes
    for name, summary in summaries.items():
        score.plot(summary["heldout_score"], marker="o", label=name)
        wins.plot(summary["heldout_win_rate_vs_m0"], marker="o", label=f"{name} vs its M_0")
    if report.get("tpo_vs_baseline_win_rate"):
        wins.plot(report["tpo_vs_baseline_win_rate"], marker="s", linestyle="--",
                  label="TPO vs baseline")
    for axis, key in ((sampled_kinds, "sampled"), (greedy_kinds, "heldout")):
        records = report["tpo"][key]
        for kind in SHOWN_KINDS:
            axis.plot([r["kinds"][kind] for r in records], marker="o", label=kind)
    for name in summaries:
        sampled = report[name]["sampled"]
        if name == "tpo":
            thought_len.plot([r["mean_thought_chars"] for r in sampled], marker="o", label=name)
        response_len.plot([r["mean_response_chars"] for r in sampled], marker="o", label=name)
    titles = ("held-out score (greedy, M_t)", "held-out win rate",
              "TPO: kinds of sampled thoughts", "TPO: kinds of held-out (greedy) thoughts",
              "thought length of samples (chars)", "response length of samples (chars)")
    scales = (RATE, RATE, RATE, RATE, LENGTH, LENGTH)
    for axis, title, scale in zip(axes.flat, titles, scales):
        finish_iteration_panel(axis, title, scale)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot_report(summaries: Mapping[str, dict], report: Mapping, path: Path) -> Path:
    """Six panels: held-out score, win rates, TPO's sampled and greedy thought kinds,
    thought and response lengths; one line per arm (or per kind)."""
    return save_figure(report_figure(summaries, report), Path(path))
