"""The plots do not make noise look like signal: a length that wobbles by 0.02% is a flat
line on an axis from zero, while a real change still fills much of its panel."""

import pytest

from megatron_tpo.report.plots import LENGTH, RATE, SCORE, iterations_figure, y_limits
from megatron_tpo.tiny.report import SHOWN_KINDS, report_figure


def share_of_panel(axis, values) -> float:
    """The fraction of the panel's height the values' spread takes."""
    bottom, top = axis.get_ylim()
    return (max(values) - min(values)) / (top - bottom)


def panel(figure, title: str):
    return next(axis for axis in figure.axes if axis.get_title() == title)


# A tiny run's tpo_vs_baseline.png (issue 31): its length panels were autoscaled to these.
THOUGHT_CHARS = [42.4, 42.9, 42.6]
RESPONSE_CHARS = [17.988, 17.992, 17.990]


def tiny_report(thought_chars, response_chars):
    kinds = {kind: 1 / len(SHOWN_KINDS) for kind in SHOWN_KINDS}
    sampled = [{"kinds": kinds, "mean_thought_chars": t, "mean_response_chars": r}
               for t, r in zip(thought_chars, response_chars)]
    summaries = {name: {"heldout_score": [0.29, 0.31, 0.35, 0.37],
                        "heldout_win_rate_vs_m0": [0.5, 0.55, 0.6, 0.62]}
                 for name in ("tpo", "baseline")}
    report = {"tpo": {"sampled": sampled, "heldout": sampled},
              "baseline": {"sampled": sampled}, "tpo_vs_baseline_win_rate": [0.5, 0.6, 0.7, 0.7]}
    return summaries, report


def test_the_tiny_runs_length_panels_show_a_wobble_as_a_flat_line():
    figure = report_figure(*tiny_report(THOUGHT_CHARS, RESPONSE_CHARS))
    thought = panel(figure, "thought length of samples (chars)")
    response = panel(figure, "response length of samples (chars)")
    assert thought.get_ylim()[0] == 0 and response.get_ylim()[0] == 0
    assert share_of_panel(thought, THOUGHT_CHARS) < 0.02
    assert share_of_panel(response, RESPONSE_CHARS) < 0.001
    assert max(THOUGHT_CHARS) < thought.get_ylim()[1] < 1.2 * max(THOUGHT_CHARS)


def test_a_real_change_in_length_still_fills_much_of_its_panel():
    figure = report_figure(*tiny_report([40.0, 60.0, 80.0], [18.0, 30.0, 36.0]))
    assert share_of_panel(panel(figure, "thought length of samples (chars)"),
                          [40.0, 80.0]) > 0.4
    assert share_of_panel(panel(figure, "response length of samples (chars)"),
                          [18.0, 36.0]) > 0.4


def test_a_runs_iterations_png_bounds_every_panel_by_what_its_figure_is():
    records = [{"iteration": t, "mean_response_length": 17.988 + 0.002 * (t % 2),
                "mean_thought_chars": THOUGHT_CHARS[t], "parse_rate": 0.995 + 0.001 * t,
                "mean_score": 0.31 + 0.0001 * t, "mean_score_margin": 0.8,
                "heldout/score": 0.3} for t in range(3)]
    figure = iterations_figure({"generic": records})
    assert share_of_panel(panel(figure, "response length"), [17.988, 17.990]) < 0.001
    assert panel(figure, "thought length (chars)").get_ylim()[0] == 0
    parse = panel(figure, "parse rate")
    assert parse.get_ylim()[1] == 1.0 and share_of_panel(parse, [0.995, 0.997]) < 0.02
    assert share_of_panel(panel(figure, "judged score of rollouts"), [0.31, 0.3102]) < 0.01


@pytest.mark.parametrize("values, scale, limits", [
    ([0.95, 1.0], RATE, (0.768, 1.0)),      # slid down inside [0, 1], 0.2 wide at least, padded
    ([0.0, 0.01], RATE, (0.0, 0.232)),
    ([0.2, 0.8], RATE, (0.152, 0.848)),     # wider than 0.2: the data's own span, padded
    ([5.0, 5.0], SCORE, (4.42, 5.58)),      # a constant: a fifth of its magnitude, padded
    ([3.0, 6.0], LENGTH, (0.0, 6.48)),
])
def test_y_limits(values, scale, limits):
    assert y_limits(values, scale) == pytest.approx(limits)
    # NaN (a margin of an iteration without pairs) is not drawn; nothing at all: no limits.
    assert y_limits(values + [float("nan")], scale) == pytest.approx(limits)
    assert y_limits([], scale) is None and y_limits([float("nan")], scale) is None


def test_an_iteration_without_pairs_still_plots():
    records = [{"iteration": t, "mean_score_margin": float("nan"), "mean_response_length": 5.0,
                "heldout/score": 0.5}
               for t in range(2)]
    figure = iterations_figure({"generic": records})
    assert panel(figure, "response length").get_ylim()[0] == 0
