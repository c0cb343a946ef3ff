"""The per-iteration PNG: what a person looks at to see whether thinking is paying off."""

from pathlib import Path
from typing import Dict, List, Optional

PANELS = (
    ("heldout/score", "held-out judged score (M_t)"),
    ("mean_score", "judged score of rollouts"),
    ("mean_response_length", "response length"),
    ("mean_thought_chars", "thought length (chars)"),
    ("parse_rate", "parse rate"),
    ("mean_score_margin", "pair score margin"),
)


def plot_iterations(runs: Dict[str, List[dict]], path: Path,
                    heldout_scores: Optional[Dict[str, List[float]]] = None) -> Path:
    """One panel per figure of PANELS, one line per run (e.g. TPO and the baseline), the
    iteration records as written to metrics.jsonl. ``heldout_scores`` (M_0..M_T per run,
    from the summary) also shows the model the last iteration produced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(13, 7))
    for axis, (key, title) in zip(axes.flat, PANELS):
        for name, records in runs.items():
            points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
            if key == "heldout/score" and heldout_scores is not None:
                points = list(enumerate(heldout_scores[name]))
            if points:
                axis.plot(*zip(*points), marker="o", label=name)
        axis.set_title(title)
        axis.set_xlabel("iteration t")
        axis.grid(alpha=0.3)
    axes.flat[0].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
