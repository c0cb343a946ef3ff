"""Arena-Hard-style scores: a Bradley-Terry fit of pairwise games against a baseline,
with bootstrap 95% intervals, with and without style control.

Read against arena-hard-auto's v0.1 scoring (``show_result.py`` and ``utils_math.py`` at
commit 0489bf3: ``compute_mle_elo``, ``get_bootstrap_result``, ``construct_style_matrices``,
``fit_bt``, ``get_bootstrap_result_style_control``; ``add_markdown_info.py``
``count_markdown_elements``), which TPO's Arena-Hard numbers used:

- every game is a row; a model's column holds +ln(10) when it is model A and -ln(10) when
  it is model B; the rows are doubled, and a tie is one win for A in the first copy and
  one for B in the second; logistic regression without intercept gives coefficients c,
  Elo = 400 c + 1000, anchored so the baseline is 1000; a model's score is its
  predicted win rate against the baseline, 1 / (1 + 10 ** ((Elo_baseline - Elo) / 400));
- plain: unpenalised (scikit-learn, tol 1e-8); style control: four more columns
  (response tokens, markdown headers, list items, bold spans), each A's count minus B's
  over their sum plus one, divided by its standard deviation, in a default (L2, C=1)
  logistic regression, as ``fit_bt`` has it. One deliberate difference: arena-hard also
  centres each column on its mean over all games. Its leaderboard fits many models
  against one baseline, and the mean is the average model's style; tpo-eval fits one
  model against its reference, where centring would leave that model's whole style
  difference inside its score. Uncentred, the score is the model's predicted win rate
  at no style difference, as AlpacaEval's LC rate is at no length difference;
- the bootstrap resamples games with replacement, refits, and takes the 2.5 and 97.5
  percentiles of each model's Elo, turned into win rates.

Games here come from the pairwise judge's two orders of each instruction (or one game
per instruction from a scoring judge); markdown counts are of the response only, with
code blocks removed first, as arena-hard counts them. Token lengths are counted with the
policy's tokenizer (arena-hard used tiktoken's gpt-3.5 encoding, which cannot be fetched
offline).
"""

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

LOG_BASE = math.log(10.0)
ELO_SCALE, ELO_INITIAL = 400.0, 1000.0
STYLE_FEATURES = ("token_len", "header_count", "list_count", "bold_count")
_CODE_BLOCK = re.compile(r"```([^`]*)```")


@dataclass(frozen=True)
class Game:
    """One judged game: ``winner`` is "a", "b" or "tie"; ``style_a`` / ``style_b`` are the
    responses' STYLE_FEATURES counts (needed for style control only)."""

    model_a: str
    model_b: str
    winner: str
    style_a: Optional[Sequence[float]] = None
    style_b: Optional[Sequence[float]] = None


def markdown_counts(text: str) -> Dict[str, Dict[str, int]]:
    """Headers (h1..h6), list items (ordered, unordered) and bold spans (``**``, ``__``) of
    ``text`` after its fenced code blocks are removed: arena-hard's ``conv_metadata``."""
    for block in _CODE_BLOCK.findall(text):
        text = text.replace(block, "")
    return {
        "header_count": {f"h{level}": len(re.findall(rf"^#{{{level}}}\s", text, re.MULTILINE))
                         for level in range(1, 7)},
        "list_count": {"ordered": len(re.findall(r"^\s*\d+\.\s", text, re.MULTILINE)),
                       "unordered": len(re.findall(r"^\s*[-*+]\s", text, re.MULTILINE))},
        "bold_count": {"**": len(re.findall(r"\*\*[^*\n]+\*\*", text)),
                       "__": len(re.findall(r"__[^_\n]+__", text))},
    }


def style_vector(token_len: int, text: str) -> List[float]:
    counts = markdown_counts(text)
    return [float(token_len)] + [float(sum(counts[name].values())) for name in STYLE_FEATURES[1:]]


def _models(games: Sequence[Game], baseline: str) -> List[str]:
    return sorted({g.model_a for g in games} | {g.model_b for g in games} | {baseline})


def _doubled_design(games: Sequence[Game], models: List[str], style: bool):
    """Rows and targets as arena-hard builds them: every game twice, a tie split."""
    index = {m: i for i, m in enumerate(models)}
    count = len(games)
    columns = len(models) + (len(STYLE_FEATURES) if style else 0)
    design = np.zeros((2 * count, columns))
    for row, game in enumerate(games):
        for copy in (row, row + count):
            design[copy, index[game.model_a]] = +LOG_BASE
            design[copy, index[game.model_b]] = -LOG_BASE
    if style:
        a = np.array([g.style_a for g in games], dtype=np.float64)
        b = np.array([g.style_b for g in games], dtype=np.float64)
        ratio = (a - b) / (a + b + 1.0)
        spread = ratio.std(axis=0)
        standardised = np.divide(ratio, spread, out=np.zeros_like(ratio), where=spread > 0)
        design[:, len(models):] = np.concatenate([standardised, standardised])
    winners = np.array([g.winner for g in games])
    target = np.zeros(2 * count)
    target[:count][winners != "b"] = 1.0          # a win, or the first half of a tie
    target[count:][winners == "a"] = 1.0
    return design, target


# The Elo distance standing for "won (or lost) every game": when every game went one
# way the likelihood has no maximum (arena-hard's fit stops with an error); this puts
# such a model at a 0.5% / 99.5% win rate instead.
ELO_UNDEFEATED = 920.0


def _fit(design: np.ndarray, target: np.ndarray, style: bool, model_columns: int) -> np.ndarray:
    import warnings

    from sklearn.linear_model import LogisticRegression

    if np.all(target == target[0]):
        # Winners half the distance up, losers half down; style plays no part.
        won = np.sign((design * (2 * target[:, None] - 1)).sum(axis=0))
        won[model_columns:] = 0.0
        return won * ELO_UNDEFEATED / 2 / ELO_SCALE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # Unpenalised for the plain fit (compute_mle_elo); fit_bt's default L2 with style.
        model = (LogisticRegression(fit_intercept=False) if style else
                 LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-8))
        model.fit(design, target)
    return model.coef_[0]


def _elo(coefficients: np.ndarray, models: List[str], baseline: str) -> np.ndarray:
    elo = ELO_SCALE * coefficients[:len(models)] + ELO_INITIAL
    return elo - elo[models.index(baseline)] + ELO_INITIAL


def win_rate_against(elo: np.ndarray, baseline_elo: float) -> np.ndarray:
    return 1.0 / (1.0 + 10.0 ** ((baseline_elo - elo) / ELO_SCALE))


def bootstrap_indices(count: int, rounds: int, seed: int) -> np.ndarray:
    """``rounds`` resamples of ``count`` games, with replacement, from ``seed``."""
    return np.random.default_rng(seed).integers(0, count, size=(rounds, count))


def bradley_terry_scores(games: Sequence[Game], baseline: str, style_control: bool = False,
                         rounds: int = 100, seed: int = 0) -> Dict[str, dict]:
    """Per model (the baseline included): ``score`` (win rate against the baseline, in
    percent), ``lower`` and ``upper`` (the bootstrap's 95% interval), ``elo``; with style
    control also the style coefficients (under ``"_style"``)."""
    if not games:
        return {}
    models = _models(games, baseline)
    design, target = _doubled_design(games, models, style_control)
    coefficients = _fit(design, target, style_control, len(models))
    elo = _elo(coefficients, models, baseline)
    count = len(games)
    resampled = []
    for indices in bootstrap_indices(count, rounds, seed):
        rows = np.concatenate([indices, indices + count])
        resampled.append(_elo(_fit(design[rows], target[rows], style_control, len(models)),
                              models, baseline))
    resampled = np.array(resampled).reshape(len(resampled), len(models))
    scores = {}
    for column, model in enumerate(models):
        low, high = (np.percentile(resampled[:, column], q) for q in (2.5, 97.5)) \
            if rounds else (elo[column], elo[column])
        scores[model] = {
            "score": float(win_rate_against(elo[column], ELO_INITIAL) * 100),
            "lower": float(win_rate_against(low, ELO_INITIAL) * 100),
            "upper": float(win_rate_against(high, ELO_INITIAL) * 100),
            "elo": float(elo[column]),
        }
    if style_control:
        scores["_style"] = dict(zip(STYLE_FEATURES, coefficients[len(models):].tolist()))
    return scores
