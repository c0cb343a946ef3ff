"""Arena-Hard-style Bradley-Terry scores (evaluation/arena.py) against independent
computations: a direct maximum-likelihood fit in float64 (Newton's method), the loop's
minorise-maximise fit (judge/tournament.py), and the bootstrap redone by hand."""

import math

import numpy as np
import pytest

from megatron_tpo.evaluation.arena import (ELO_INITIAL, Game, bootstrap_indices,
                                           bradley_terry_scores, markdown_counts)
from megatron_tpo.judge.tournament import bradley_terry

MODELS = ["base", "m1", "m2", "m3"]
STRENGTH = {"base": 0.0, "m1": 0.8, "m2": -0.5, "m3": 0.3}   # natural log-strengths


def _games(count=600, seed=0):
    rng = np.random.default_rng(seed)
    games = []
    for _ in range(count):
        a, b = rng.choice(len(MODELS), size=2, replace=False)
        a, b = MODELS[a], MODELS[b]
        p = 1 / (1 + math.exp(STRENGTH[b] - STRENGTH[a]))
        draw = rng.random()
        winner = "tie" if draw < 0.1 else "a" if draw < 0.1 + 0.9 * p else "b"
        games.append(Game(a, b, winner))
    return games


def _newton_strengths(games, models=MODELS):
    """Maximum likelihood of P(a beats b) = sigmoid(s_a - s_b), a tie half a win each way,
    s_base = 0; Newton's method in float64."""
    index = {m: i for i, m in enumerate(models)}
    free = len(models) - 1          # s_0 (the baseline, first) is fixed at 0
    s = np.zeros(len(models))
    for _ in range(50):
        gradient, hessian = np.zeros(len(models)), np.zeros((len(models), len(models)))
        for game in games:
            a, b = index[game.model_a], index[game.model_b]
            won = {"a": 1.0, "b": 0.0, "tie": 0.5}[game.winner]
            p = 1 / (1 + math.exp(-(s[a] - s[b])))
            gradient[a] += won - p
            gradient[b] -= won - p
            w = p * (1 - p)
            hessian[a, a] -= w
            hessian[b, b] -= w
            hessian[a, b] += w
            hessian[b, a] += w
        step = np.linalg.solve(hessian[1:, 1:], gradient[1:])
        s[1:] -= step
        if np.max(np.abs(step)) < 1e-13:
            break
    assert free == len(s) - 1
    return s


def _win_rate(strength):
    return 100 / (1 + math.exp(-strength))


def test_plain_fit_equals_a_direct_float64_maximum_likelihood_fit():
    games = _games()
    scores = bradley_terry_scores(games, "base", rounds=0)
    strengths = _newton_strengths(games)
    for model, strength in zip(MODELS, strengths):
        assert scores[model]["score"] == pytest.approx(_win_rate(strength), abs=1e-4), model
    assert scores["base"]["score"] == pytest.approx(50.0)
    assert scores["m1"]["score"] > 60 and scores["m2"]["score"] < 45   # the planted order


def test_plain_fit_equals_the_loops_minorise_maximise_fit():
    games = _games(seed=1)
    wins = np.zeros((len(MODELS), len(MODELS)))
    for game in games:
        a, b = MODELS.index(game.model_a), MODELS.index(game.model_b)
        if game.winner == "tie":
            wins[a, b] += 0.5
            wins[b, a] += 0.5
        else:
            wins[(a, b) if game.winner == "a" else (b, a)] += 1
    log_strength = bradley_terry(wins, prior=1e-9)
    scores = bradley_terry_scores(games, "base", rounds=0)
    for i, model in enumerate(MODELS):
        relative = log_strength[i] - log_strength[0]
        assert scores[model]["score"] == pytest.approx(_win_rate(relative), abs=1e-4), model


def test_bootstrap_interval_is_the_percentiles_of_refits_on_resampled_games():
    games = _games(count=300, seed=2)
    rounds, seed = 20, 7
    scores = bradley_terry_scores(games, "base", rounds=rounds, seed=seed)
    elos = []
    for indices in bootstrap_indices(len(games), rounds, seed):
        strengths = _newton_strengths([games[i] for i in indices])
        elos.append(ELO_INITIAL + 400 * strengths / math.log(10))
    elos = np.array(elos)
    for column, model in enumerate(MODELS):
        low, high = np.percentile(elos[:, column], [2.5, 97.5])
        assert scores[model]["lower"] == pytest.approx(100 / (1 + 10 ** ((ELO_INITIAL - low) / 400)), abs=1e-3)
        assert scores[model]["upper"] == pytest.approx(100 / (1 + 10 ** ((ELO_INITIAL - high) / 400)), abs=1e-3)
        assert scores[model]["lower"] <= scores[model]["score"] <= scores[model]["upper"]
    assert scores == bradley_terry_scores(games, "base", rounds=rounds, seed=seed)
    other = bradley_terry_scores(games, "base", rounds=rounds, seed=seed + 1)
    assert other["m1"]["lower"] != scores["m1"]["lower"]


def test_two_models_score_the_share_of_games_won_ties_halved():
    games = [Game("ref", "m", w) for w in ["b"] * 13 + ["a"] * 5 + ["tie"] * 2]
    scores = bradley_terry_scores(games, "ref", rounds=0)
    assert scores["m"]["score"] == pytest.approx(100 * (13 + 1) / 20, abs=1e-4)


def test_a_model_that_won_every_game_gets_a_bounded_score():
    scores = bradley_terry_scores([Game("ref", "m", "b")] * 6, "ref", rounds=5)
    assert scores["m"]["score"] == pytest.approx(99.5, abs=0.05)
    assert scores["m"]["lower"] == scores["m"]["upper"] == scores["m"]["score"]
    lost = bradley_terry_scores([Game("ref", "m", "a", [1, 0, 0, 0], [2, 0, 0, 0])] * 6, "ref",
                                style_control=True, rounds=5)
    assert lost["m"]["score"] == pytest.approx(0.5, abs=0.05)


def test_style_control_takes_out_a_preference_for_length():
    rng = np.random.default_rng(3)
    games = []
    for _ in range(400):
        # The model (b) writes longer answers; the judge prefers length and nothing else.
        tokens_a = float(rng.integers(100, 800))
        tokens_b = float(rng.integers(100, 800)) * 1.6
        prefers_b = 1 / (1 + math.exp(-4 * (tokens_b - tokens_a) / (tokens_a + tokens_b)))
        winner = "b" if rng.random() < prefers_b else "a"
        games.append(Game("ref", "m", winner, [tokens_a, 0, 0, 0], [tokens_b, 0, 0, 0]))
    plain = bradley_terry_scores(games, "ref", rounds=0)
    styled = bradley_terry_scores(games, "ref", style_control=True, rounds=0)
    assert plain["m"]["score"] > 65
    assert abs(styled["m"]["score"] - 50) < 8
    assert styled["_style"]["token_len"] > 0.5


def test_markdown_counts_follow_arena_hard_and_skip_code_blocks():
    text = ("# Title\n## Part\nSome **bold** and __also__ text.\n1. one\n2. two\n- item\n"
            "* item\n```\n# not a header\n- not an item\n```\n")
    counts = markdown_counts(text)
    assert counts["header_count"] == {"h1": 1, "h2": 1, "h3": 0, "h4": 0, "h5": 0, "h6": 0}
    assert counts["list_count"] == {"ordered": 2, "unordered": 2}
    assert counts["bold_count"] == {"**": 1, "__": 1}
