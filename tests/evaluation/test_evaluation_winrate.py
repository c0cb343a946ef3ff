"""tpo-eval's AlpacaEval numbers equal AlpacaEval's own (alpaca-eval 0.6.6, the test extra).

AlpacaEval's public LC wrapper downloads precomputed data at call time; its win rate
(``get_winrate``) and the GLM fitting it uses (``make_dmatrix_for_model``,
``fit_LogisticRegressionCV``) do not, so they are called here on annotations built in the
test, featurized as ``_get_featurized_data`` does for the minimal and no-regularisation
formulas.
"""

import math

import numpy as np
import pytest

from megatron_tpo.evaluation.heldout import heldout_metrics, lc_win_rate_vs_first
from megatron_tpo.evaluation.winrate import length_controlled_win_rate, win_rate

from eval_fixtures import alpaca_eval_metrics as _alpaca_eval


def _annotations(count=120, seed=0):
    """Preferences with ties (1.5 and the legacy 0), weighted ones and undecided (NaN)."""
    rng = np.random.default_rng(seed)
    reference_lengths = rng.integers(50, 1500, count)
    model_lengths = rng.integers(200, 2500, count)   # longer on average
    # The longer answer tends to win, so the GLM's length term has something to take out.
    longer = model_lengths > reference_lengths
    preference = np.where(rng.random(count) < np.where(longer, 0.75, 0.3), 2.0, 1.0)
    others = rng.random(count)
    preference[others < 0.25] = rng.choice([1.5, 0.0, 1.25, 1.75], size=int((others < 0.25).sum()))
    preference[[3, 17, 40]] = np.nan
    difficulty = rng.normal(size=count)
    return preference, reference_lengths, model_lengths, difficulty


def _their_lc(glm_winrate, preference, reference_lengths, model_lengths, difficulty, formula):
    import pandas as pd

    frame = pd.DataFrame({"preference": preference,
                          "output_1": ["a" * int(n) for n in reference_lengths],
                          "output_2": ["b" * int(n) for n in model_lengths]}).reset_index()
    delta = frame["output_1"].str.len() - frame["output_2"].str.len()
    features = frame[["preference", "index"]].copy()
    features["std_delta_len"] = delta / delta.std()
    features["preference"] = features["preference"].astype(float).replace({0.0: 1.5}) - 1
    features["instruction_difficulty"] = difficulty
    features["not_gamed_baseline"] = True
    test = features[["instruction_difficulty", "not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0
    train, test = glm_winrate.make_dmatrix_for_model(
        features, test, formula=glm_winrate.GLM_INFO[formula]["formula"])
    train = train[train["preference"].notna()]
    model = glm_winrate.fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True,
                                                 **glm_winrate.GLM_INFO[formula]["kwargs"])
    predicted = model.predict_proba(test)[:, 1]
    return predicted.mean() * 100, pd.Series(predicted).sem() * 100


def test_win_rate_and_standard_error_equal_alpaca_evals_get_winrate():
    winrate, _ = _alpaca_eval()
    preference, *_ = _annotations()
    theirs = winrate.get_winrate([{"preference": p} for p in preference])
    ours = win_rate(preference.tolist())
    for key in ("win_rate", "standard_error", "discrete_win_rate"):
        assert ours[key] == pytest.approx(float(theirs[key]), rel=1e-12), key
    for key in ("n_wins", "n_wins_base", "n_draws", "n_total"):
        assert ours[key] == int(theirs[key]), key
    assert ours["n_undecided"] == 3


@pytest.mark.parametrize("formula", ["length_controlled_minimal", "length_controlled_noreg"])
def test_length_controlled_win_rate_equals_alpaca_evals_glm(formula):
    _, glm_winrate = _alpaca_eval()
    preference, reference_lengths, model_lengths, difficulty = _annotations(seed=1)
    with_difficulty = formula == "length_controlled_noreg"
    theirs, their_error = _their_lc(glm_winrate, preference, reference_lengths, model_lengths,
                                    difficulty, formula)
    ours = length_controlled_win_rate(preference.tolist(), reference_lengths, model_lengths,
                                      difficulty if with_difficulty else None)
    assert ours["length_controlled_winrate"] == pytest.approx(theirs, abs=1e-9)
    assert ours["lc_standard_error"] == pytest.approx(their_error, abs=1e-9)
    # The fit is not trivial: the length term carries weight, and the LC rate moved.
    assert abs(ours["glm_weights"]["length"]) > 0.05
    assert ours["length_controlled_winrate"] != pytest.approx(win_rate(preference)["win_rate"], abs=0.5)


def test_a_judge_that_only_prefers_the_longer_answer_is_not_rewarded_by_lc():
    rng = np.random.default_rng(0)
    count = 2000
    reference_lengths = rng.integers(100, 900, count)
    # The model writes longer answers, and the judge's preference follows the length
    # difference alone (a logistic curve in it): nothing else about the answers counts.
    model_lengths = (reference_lengths * rng.uniform(0.8, 2.5, count)).astype(int)
    delta = model_lengths - reference_lengths
    prefers_model = 1 / (1 + np.exp(-3 * np.tanh(delta / delta.std())))
    preference = np.where(rng.random(count) < prefers_model, 2.0, 1.0)
    raw = win_rate(preference)["win_rate"]
    lc = length_controlled_win_rate(preference, reference_lengths, model_lengths)
    assert raw > 75
    assert abs(lc["length_controlled_winrate"] - 50) < 2


def test_heldout_lc_win_rate_is_the_glm_on_held_out_rows():
    rng = np.random.default_rng(3)
    first = [{"instruction": f"q{i}", "response": "x" * int(rng.integers(5, 80)),
              "parse_ok": True} for i in range(40)]
    rows = []
    for i, then in enumerate(first):
        parse_ok = i % 10 != 0
        response = "y" * int(rng.integers(5, 160)) if parse_ok else None
        outcome = 0.0 if not parse_ok else float(len(response) > len(then["response"]))
        rows.append({"instruction": then["instruction"], "response": response, "parse_ok": parse_ok,
                     "score": outcome, "win_against_first": outcome})
    expected = length_controlled_win_rate(
        [1 + r["win_against_first"] for r in rows], [len(f["response"]) for f in first],
        [len(r["response"]) if r["parse_ok"] else 0 for r in rows])["length_controlled_winrate"]
    metrics = heldout_metrics(rows, first)
    assert metrics["heldout/lc_win_rate_vs_m0"] == pytest.approx(expected / 100)
    assert lc_win_rate_vs_first(rows, first) == pytest.approx(expected / 100)
    # M_0 against itself: every outcome a tie, the LC rate one half.
    ties = [dict(f, score=0.0, win_against_first=0.5) for f in first]
    assert heldout_metrics(ties, first)["heldout/lc_win_rate_vs_m0"] == pytest.approx(0.5, abs=1e-6)
    assert "heldout/lc_win_rate_vs_m0" not in heldout_metrics(rows)
    assert math.isfinite(metrics["heldout/win_rate_vs_m0"])
