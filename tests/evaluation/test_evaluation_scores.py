"""evaluation/scores.py: a set's numbers from hand-built annotations and answers, against
the same numbers computed here (percent, sample standard deviation)."""

import math

import numpy as np
import pytest

from megatron_tpo.evaluation.arena import style_vector
from megatron_tpo.evaluation.scores import by_category, games, set_metrics, thought_metrics


def _annotation(preference, dataset, games_=(2,), output_1="ref", output_2="model answer",
                parse_ok=(True, True)):
    return {"preference": preference, "dataset": dataset, "output_1": output_1,
            "output_2": output_2, "generator_1": "reference", "generator_2": "mine",
            "games": list(games_), "raw_completion": ["v"] * max(len(games_), 1),
            "parse_ok_1": parse_ok[0], "parse_ok_2": parse_ok[1]}


def _answer(parse_ok, thought_tokens, response_tokens, output_tokens, finish="stop",
            failure=None):
    return {"parse_ok": parse_ok, "thought_tokens": thought_tokens,
            "response_tokens": response_tokens, "output_tokens": output_tokens,
            "finish_reason": finish, "parse_failure": failure}


def test_thought_metrics_by_hand():
    answers = [_answer(True, 10, 4, 16), _answer(True, 20, 6, 30),
               _answer(False, 0, 0, 40, finish="length", failure="no_response_marker"),
               _answer(False, 0, 0, 0, finish="length", failure="prompt_too_long")]
    assert thought_metrics(answers) == {
        "parse_rate": 0.5, "truncated_rate": 0.5, "prompt_too_long": 1,
        "mean_thought_tokens": 15.0, "mean_response_tokens": 5.0, "mean_output_tokens": 21.5}
    empty = thought_metrics([])
    assert math.isnan(empty["parse_rate"]) and math.isnan(empty["mean_output_tokens"])


def test_win_rates_overall_and_per_category_by_hand():
    preferences = [2.0, 1.0, 2.0, 1.5, 2.0, 1.0, 1.8]
    datasets = ["a", "a", "a", "b", "b", "b", None]
    rows = [_annotation(p, d, output_2="x" * (5 + i)) for i, (p, d) in
            enumerate(zip(preferences, datasets))]
    rows.append(_annotation(None, "b", games_=()))   # undecided: left out of the rates
    metrics = set_metrics(rows, [_answer(True, 1, 3, 5)] * len(rows), None,
                          [4] * len(rows), rounds=4, seed=0)
    kept = np.array(preferences) - 1
    assert metrics["n"] == 8
    assert metrics["win_rate"] == pytest.approx(kept.mean() * 100)
    assert metrics["standard_error"] == pytest.approx(kept.std(ddof=1) / math.sqrt(7) * 100)
    categories = metrics["categories"]
    assert list(categories) == ["(none)", "a", "b"]
    assert categories["a"]["n"] == 3
    assert categories["a"]["win_rate"] == pytest.approx(100 * 2 / 3)
    assert categories["b"]["n"] == 4   # the undecided row is counted, not rated
    assert categories["b"]["win_rate"] == pytest.approx(100 * 1.5 / 3)
    assert categories["(none)"]["win_rate"] == pytest.approx(80.0)
    assert set(categories["a"]) == {"n", "win_rate", "standard_error",
                                    "length_controlled_winrate"}
    assert by_category(rows, None) == categories


def test_judge_counts_and_games():
    rows = [_annotation(2.0, "a", games_=(2, 1)), _annotation(1.0, "a", games_=(1.5,)),
            _annotation(None, "a", games_=()), _annotation(None, "a", games_=(),
                                                           parse_ok=(True, False))]
    rows[2]["raw_completion"] = ["unreadable", "also"]
    metrics = set_metrics(rows, [_answer(True, 1, 7, 9)] * 4, [_answer(True, 2, 3, 5)] * 4,
                          [4] * 4, rounds=4, seed=0)
    assert metrics["judge"] == {"verdicts_written": 6, "verdicts_unreadable": 3,
                                "undecided": 2, "unjudged_parse_failures": 1}
    assert metrics["games"] == 3
    assert set(metrics["thoughts"]) == {"model", "reference"}
    assert metrics["thoughts"]["reference"]["mean_response_tokens"] == 3.0
    played = games(rows, [4] * 4, [7] * 4)
    assert [g.winner for g in played] == ["b", "a", "tie"]
    assert played[0].model_a == "reference" and played[0].model_b == "mine"
    assert played[0].style_a == style_vector(4, "ref")
    assert played[0].style_b == style_vector(7, "model answer")
