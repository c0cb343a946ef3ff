"""Turning pairwise verdicts among K responses into one score per response.

``wins[m, n]`` counts how often response m beat response n (a tie adds 0.5 to both).
"""

import numpy as np


def win_rates(wins: np.ndarray) -> np.ndarray:
    """Each response's share of its games won; 0.5 for one that played none."""
    wins = np.asarray(wins, dtype=np.float64)
    played = wins.sum(axis=1) + wins.sum(axis=0)
    return np.divide(wins.sum(axis=1), played, out=np.full(len(wins), 0.5), where=played > 0)


def bradley_terry(wins: np.ndarray, prior: float = 0.5, tolerance: float = 1e-10,
                  max_iterations: int = 10_000) -> np.ndarray:
    """Log-strengths (mean 0) maximising the Bradley-Terry likelihood of ``wins``.

    ``prior`` adds that many virtual wins to each side of every pair (a symmetric Beta-like
    prior): without it an undefeated response's maximum-likelihood strength is infinite.
    Solved by Hunter's (2004) minorise-maximise update
    p_m <- W_m / sum_n N_mn / (p_m + p_n), which raises the likelihood at every step.
    """
    wins = np.asarray(wins, dtype=np.float64)
    count = len(wins)
    if count < 2:
        return np.zeros(count)
    off_diagonal = ~np.eye(count, dtype=bool)
    wins = np.where(off_diagonal, wins + prior, 0.0)
    games = wins + wins.T
    total_wins = wins.sum(axis=1)
    if np.any(total_wins <= 0):
        raise ValueError("bradley_terry needs prior > 0 or at least one win per response")
    strength = np.ones(count)
    for _ in range(max_iterations):
        denominator = (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        updated = total_wins / denominator
        updated /= np.exp(np.log(updated).mean())   # fix the scale: geometric mean 1
        if np.max(np.abs(np.log(updated) - np.log(strength))) < tolerance:
            strength = updated
            break
        strength = updated
    log_strength = np.log(strength)
    return log_strength - log_strength.mean()
