"""Win rates as AlpacaEval computes them: the raw rate, its standard error, and the
length-controlled rate of AlpacaEval 2.

Preferences use AlpacaEval's encoding: 1 when the reference (``output_1``) wins, 2 when
the model (``output_2``) wins, 1.5 for a tie (0 is read as a tie too, as AlpacaEval reads
old files), anything between for a weighted preference, and NaN (``None``) for an
annotation the judge could not decide; those are left out, as AlpacaEval leaves them.

Read against alpaca_eval 0.6.6 (``metrics/helpers.py`` ``BaseScoringRule.describe_head2head``,
``metrics/glm_winrate.py`` ``get_length_controlled_winrate``, ``_get_featurized_data``,
``fit_LogisticRegressionCV``); ``tests/evaluation/test_evaluation_winrate.py`` checks the numbers
against those functions themselves.

The length-controlled rate is the logistic GLM of the preference on tanh of the
standardised length difference (reference minus model, in characters), plus each
instruction's difficulty when one is given, fitted by cross-validated L1 logistic
regression on the preference as a probability, then predicted with no length difference
and averaged. AlpacaEval 2's leaderboard form (``length_controlled_v1``) also regularises
towards annotations of two gamed baselines that it downloads at run time; those are not
available offline, so this is its ``length_controlled_minimal`` form (no difficulty) or
``length_controlled_noreg`` (with difficulty).
"""

import math
import warnings
from typing import Dict, Optional, Sequence

import numpy as np

# AlpacaEval's GLM settings: 5 group folds, L1, liblinear, no intercept (the baseline
# column is the intercept), a fixed random state for liblinear's coordinate order.
GLM_FOLDS = 5
GLM_RANDOM_STATE = 123


def preference_array(preferences: Sequence[Optional[float]]) -> np.ndarray:
    """Preferences as floats, 0 read as a tie (1.5) and ``None`` as NaN."""
    values = np.array([np.nan if p is None else float(p) for p in preferences], dtype=np.float64)
    values[values == 0.0] = 1.5
    return values


def _decided(values: np.ndarray) -> np.ndarray:
    """Which preferences count: within [1, 2]; NaN and anything else is dropped."""
    return (values >= 1.0) & (values <= 2.0)


def win_rate(preferences: Sequence[Optional[float]]) -> Dict[str, float]:
    """``win_rate`` and ``standard_error`` in percent (mean and standard error of the mean
    of preference - 1, sample standard deviation), the counts, and the discrete rate
    (each preference rounded to a win, a loss or a tie)."""
    values = preference_array(preferences)
    kept = values[_decided(values)] - 1.0
    count = len(kept)
    ties = (kept == 0.5)
    discrete = np.where(ties, 0.5, np.round(kept))
    return {
        "win_rate": float(kept.mean() * 100) if count else math.nan,
        "standard_error": (float(kept.std(ddof=1) / math.sqrt(count) * 100) if count > 1
                           else math.nan),
        "n_wins": int((kept > 0.5).sum()),
        "n_wins_base": int((kept < 0.5).sum()),
        "n_draws": int(ties.sum()),
        "n_total": count,
        "n_undecided": int(len(values) - count),
        "discrete_win_rate": float(discrete.mean() * 100) if count else math.nan,
    }


def _continuous_log_loss(y_true, y_pred, true_prob, true_sample_weight=None):
    """Log loss of predicted probabilities against the preference as a probability.

    The rows come duplicated (label 1 weighted by p, label 0 by 1 - p), so the binary
    label and the row's p give back the target that row stands for."""
    target = np.where(np.asarray(y_true) == 1, true_prob, 1 - np.asarray(true_prob))
    predicted = np.clip(y_pred, 1e-15, 1 - 1e-15)
    losses = target * np.log(predicted) + (1 - target) * np.log(1 - predicted)
    if true_sample_weight is not None:
        losses = losses * true_sample_weight
    return -np.mean(losses)


def _fit_preference_glm(features: np.ndarray, probability: np.ndarray):
    """Cross-validated L1 logistic regression of a probability target (scikit-learn).

    Each annotation becomes two rows, label 1 weighted by p and label 0 by 1 - p, grouped
    so both rows of an annotation fall in the same fold; the folds are scored by the log
    loss against p itself."""
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    count = len(probability)
    rows = np.concatenate([features, features])
    labels = np.concatenate([np.ones(count), np.zeros(count)])
    row_probability = np.concatenate([probability, 1 - probability])
    groups = np.concatenate([np.arange(count), np.arange(count)])
    # The scorer needs each test row's probability: scikit-learn routes it as metadata.
    with sklearn.config_context(enable_metadata_routing=True), warnings.catch_warnings():
        # scikit-learn 1.8+ warns about attributes and defaults this fit does not use;
        # liblinear stopping at AlpacaEval's iteration limit on a few annotations is
        # AlpacaEval's behaviour too.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        scorer = make_scorer(_continuous_log_loss, response_method="predict_proba",
                             greater_is_better=False).set_score_request(true_prob=True)
        model = LogisticRegressionCV(cv=GroupKFold(n_splits=min(GLM_FOLDS, count)),
                                     scoring=scorer, l1_ratios=(1.0,), solver="liblinear",
                                     fit_intercept=False, random_state=GLM_RANDOM_STATE)
        model.set_fit_request(sample_weight=True)
        model.fit(rows, labels, sample_weight=row_probability, groups=groups,
                  true_prob=row_probability)
    return model


def glm_design(reference_lengths: Sequence[float], model_lengths: Sequence[float],
               difficulty: Optional[Sequence[float]] = None) -> np.ndarray:
    """The GLM's columns, in AlpacaEval's order: tanh of the length difference (reference
    minus model) over its sample standard deviation, the difficulty when given, and the
    baseline indicator (a column of ones, the intercept)."""
    delta = (np.asarray(reference_lengths, dtype=np.float64)
             - np.asarray(model_lengths, dtype=np.float64))
    spread = delta.std(ddof=1) if len(delta) > 1 else 0.0
    # Equal lengths everywhere carry no length signal: the difference column is zero
    # (AlpacaEval would divide by zero here).
    standardised = delta / spread if spread > 0 else np.zeros_like(delta)
    columns = [np.tanh(standardised)]
    if difficulty is not None:
        columns.append(np.asarray(difficulty, dtype=np.float64))
    columns.append(np.ones_like(delta))
    return np.stack(columns, axis=1)


def length_controlled_win_rate(preferences: Sequence[Optional[float]],
                               reference_lengths: Sequence[float], model_lengths: Sequence[float],
                               difficulty: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """``length_controlled_winrate`` and ``lc_standard_error`` in percent, and the GLM's
    weights. Lengths are those of ``output_1`` (reference) and ``output_2`` (model);
    undecided preferences are left out of the fit, as AlpacaEval leaves them out."""
    values = preference_array(preferences)
    design = glm_design(reference_lengths, model_lengths, difficulty)
    # The difference is standardised over every annotation, the fit uses the decided ones.
    kept = _decided(values)
    probability = values[kept] - 1.0
    test = design.copy()
    test[:, 0] = 0.0                  # tanh(0): no length difference
    names = (["length"] + (["instruction_difficulty"] if difficulty is not None else [])
             + ["baseline"])
    if len(probability) < 2:
        predicted = np.full(len(values), probability.mean() if len(probability) else np.nan)
        weights = dict.fromkeys(names, math.nan)
    else:
        model = _fit_preference_glm(design[kept], probability)
        predicted = model.predict_proba(test)[:, 1]
        weights = dict(zip(names, model.coef_[0].tolist()))
    return {
        "length_controlled_winrate": float(np.mean(predicted) * 100),
        "lc_standard_error": float(np.std(predicted, ddof=1) / math.sqrt(len(predicted)) * 100)
        if len(predicted) > 1 else math.nan,
        "glm_weights": weights,
    }
