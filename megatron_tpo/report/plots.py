"""The per-iteration PNG: what a person looks at to see whether thinking is paying off.

Each panel's y-axis is bounded by what its figure is (``Scale``), not autoscaled to the
data: autoscaling stretches any wobble over the whole panel, so a response length moving
by 0.02% (17.988 to 17.992 characters) looked like a trend. Lengths start at zero, rates
span at least a fifth of [0, 1], other figures at least a fifth of their magnitude.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Scale:
    """How a panel's y-axis is bounded, so that noise cannot fill it."""

    from_zero: bool = False          # a length or a count: the axis starts at 0
    lower: Optional[float] = None    # values cannot go below (a rate: 0)
    upper: Optional[float] = None    # values cannot go above (a rate: 1)
    min_span: float = 0.0            # the axis spans at least this much
    min_relative_span: float = 0.0   # ... and at least this share of the largest |value|


LENGTH = Scale(from_zero=True)
RATE = Scale(lower=0.0, upper=1.0, min_span=0.2)
SCORE = Scale(min_span=0.05, min_relative_span=0.2)
PADDING = 0.08  # of the span, above and below the data


def y_limits(values: Sequence[float], scale: Scale) -> Optional[Tuple[float, float]]:
    """The y-axis limits of a panel showing ``values`` (NaN, as a margin of an iteration
    without pairs, is not drawn); None when there is nothing to show."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return None
    low, high = min(values), max(values)
    if scale.from_zero and low >= 0:
        return 0.0, max(high * (1 + PADDING), scale.min_span, 1e-9)
    span = max(high - low, scale.min_span, scale.min_relative_span * max(abs(low), abs(high)))
    middle, half = (low + high) / 2, span * (1 + 2 * PADDING) / 2
    bottom, top = middle - half, middle + half
    if scale.lower is not None and bottom < scale.lower:   # slide the window inside the bounds
        bottom, top = scale.lower, top + (scale.lower - bottom)
    if scale.upper is not None and top > scale.upper:
        bottom, top = bottom - (top - scale.upper), scale.upper
        if scale.lower is not None:
            bottom = max(bottom, scale.lower)
    if top == bottom:
        top, bottom = top + 0.5, bottom - 0.5
    return bottom, top


def bound_axis(axis, scale: Scale) -> None:
    """Set ``axis``'s y-limits from the lines drawn on it."""
    values = [y for line in axis.get_lines() for y in line.get_ydata()]
    limits = y_limits(values, scale)
    if limits is not None:
        axis.set_ylim(*limits)


def finish_iteration_panel(axis, title: str, scale: Scale) -> None:
    """How every per-iteration panel of the reports looks: y-limits from its lines, its
    title, the iteration axis and a light grid."""
    bound_axis(axis, scale)
    axis.set_title(title)
    axis.set_xlabel("iteration t")
    axis.grid(alpha=0.3)


PANELS = (
    ("heldout/score", "held-out judged score (M_t)", SCORE),
    ("mean_score", "judged score of rollouts", SCORE),
    ("mean_response_length", "response length", LENGTH),
    ("mean_thought_chars", "thought length (chars)", LENGTH),
    ("parse_rate", "parse rate", RATE),
    ("mean_score_margin", "pair score margin", SCORE),
)


def iterations_figure(runs: Dict[str, List[dict]],
                      heldout_scores: Optional[Dict[str, List[float]]] = None):
    """The figure ``plot_iterations`` saves (matplotlib's, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(13, 7))
    for axis, (key, title, scale) in zip(axes.flat, PANELS):
        for name, records in runs.items():
            points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
            if key == "heldout/score" and heldout_scores is not None:
                points = list(enumerate(heldout_scores[name]))
            if points:
                axis.plot(*zip(*points), marker="o", label=name)
        finish_iteration_panel(axis, title, scale)
    axes.flat[0].legend()
    figure.tight_layout()
    return figure


def save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_iterations(runs: Dict[str, List[dict]], path: Path,
                    heldout_scores: Optional[Dict[str, List[float]]] = None) -> Path:
    """One panel per figure of PANELS, one line per run (e.g. TPO and the baseline), the
    iteration records as written to metrics.jsonl. ``heldout_scores`` (M_0..M_T per run,
    from the summary) also shows the model the last iteration produced."""
    return save_figure(iterations_figure(runs, heldout_scores), Path(path))
