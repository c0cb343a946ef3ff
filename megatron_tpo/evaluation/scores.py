"""The numbers of one evaluation set: AlpacaEval's win rate, standard error and
length-controlled win rate, Arena-Hard-style Bradley-Terry scores with and without style
control, the same per category, and the hidden thoughts' parse rate and lengths.

Rates are in percent, as AlpacaEval and Arena-Hard print them.
"""

import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_tpo.evaluation.annotations import preferences
from megatron_tpo.evaluation.arena import Game, bradley_terry_scores, style_vector
from megatron_tpo.evaluation.winrate import length_controlled_win_rate, win_rate

_WINNER = {1.0: "a", 2.0: "b", 1.5: "tie"}


def alpaca_metrics(rows: Sequence[dict], difficulty: Optional[Sequence[float]] = None) -> dict:
    """Win rate, its standard error and the length-controlled win rate of annotations."""
    values = preferences(rows)
    metrics = {"n": len(rows), **win_rate(values)}
    metrics.update(length_controlled_win_rate(values, [len(r["output_1"]) for r in rows],
                                              [len(r["output_2"]) for r in rows], difficulty))
    return metrics


def games(rows: Sequence[dict], reference_tokens: Sequence[int],
          model_tokens: Sequence[int]) -> List[Game]:
    """Every judged game of the annotations, the reference as model A (the baseline)."""
    played = []
    for row, tokens_a, tokens_b in zip(rows, reference_tokens, model_tokens):
        style_a = style_vector(tokens_a, row["output_1"])
        style_b = style_vector(tokens_b, row["output_2"])
        for game in row["games"]:
            played.append(Game(row["generator_1"], row["generator_2"],
                               _WINNER.get(float(game), "tie"), style_a, style_b))
    return played


def arena_metrics(rows: Sequence[dict], reference_tokens: Sequence[int],
                  model_tokens: Sequence[int], rounds: int, seed: int) -> dict:
    """The model's Bradley-Terry score against the reference (percent, 95% interval), plain
    and with style control (length and markdown counts as covariates)."""
    played = games(rows, reference_tokens, model_tokens)
    if not played:
        return {}
    model, baseline = rows[0]["generator_2"], rows[0]["generator_1"]
    plain = bradley_terry_scores(played, baseline, rounds=rounds, seed=seed)
    styled = bradley_terry_scores(played, baseline, style_control=True, rounds=rounds, seed=seed)
    return {"games": len(played), "bradley_terry": plain[model],
            "bradley_terry_style_controlled": {**styled[model],
                                               "style_coefficients": styled["_style"]}}


def thought_metrics(answers: Sequence[dict]) -> dict:
    """Parse rate, truncation and mean lengths (tokens) of a model's answers."""
    parsed = [row for row in answers if row["parse_ok"]]

    def mean(values) -> float:
        values = list(values)
        return float(np.mean(values)) if values else math.nan

    return {
        "parse_rate": len(parsed) / len(answers) if answers else math.nan,
        "truncated_rate": mean(row["finish_reason"] == "length" for row in answers),
        "prompt_too_long": sum(row["parse_failure"] == "prompt_too_long" for row in answers),
        "mean_thought_tokens": mean(row["thought_tokens"] for row in parsed),
        "mean_response_tokens": mean(row["response_tokens"] for row in parsed),
        "mean_output_tokens": mean(row["output_tokens"] for row in answers),
    }


def by_category(rows: Sequence[dict], difficulty: Optional[Sequence[float]]) -> Dict[str, dict]:
    groups = defaultdict(list)
    for index, row in enumerate(rows):
        groups[row["dataset"] or "(none)"].append(index)
    result = {}
    for category, indices in sorted(groups.items()):
        subset = [rows[i] for i in indices]
        part = None if difficulty is None else [difficulty[i] for i in indices]
        metrics = alpaca_metrics(subset, part)
        result[category] = {key: metrics[key] for key in
                            ("n", "win_rate", "standard_error", "length_controlled_winrate")}
    return result


def set_metrics(rows: Sequence[dict], model_answers: Sequence[dict],
                reference_answers: Optional[Sequence[dict]], reference_tokens: Sequence[int],
                difficulty: Optional[Sequence[float]] = None, rounds: int = 100,
                seed: int = 0) -> dict:
    """Everything ``tpo-eval`` reports for one set (see the module docstring)."""
    metrics = alpaca_metrics(rows, difficulty)
    metrics["categories"] = by_category(rows, difficulty)
    metrics.update(arena_metrics(rows, reference_tokens,
                                 [r["response_tokens"] for r in model_answers], rounds, seed))
    metrics["judge"] = {
        "verdicts_written": sum(len(r["raw_completion"]) for r in rows),
        "verdicts_unreadable": sum(len(r["raw_completion"]) - len(r["games"]) for r in rows
                                   if r["raw_completion"]),
        "undecided": sum(r["preference"] is None for r in rows),
        "unjudged_parse_failures": sum(not (r["parse_ok_1"] and r["parse_ok_2"]) for r in rows),
    }
    metrics["thoughts"] = {"model": thought_metrics(model_answers)}
    if reference_answers is not None:
        metrics["thoughts"]["reference"] = thought_metrics(reference_answers)
    return metrics
