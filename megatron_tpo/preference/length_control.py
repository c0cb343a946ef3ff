"""Length control: judges favour long responses, so the score is penalised by length.

Both score and length are z-normalised within one prompt's samples, which puts them on
one scale whatever the judge's units: controlled = z(score) - rho * z(length).
"""

from typing import Sequence

import numpy as np


def z_normalise(values: Sequence[float]) -> np.ndarray:
    """(x - mean) / population std; a zero std counts as 1 so equal values give zeros."""
    array = np.asarray(values, dtype=np.float64)
    std = array.std()
    return (array - array.mean()) / (std if std > 0 else 1.0)


def length_controlled_scores(scores: Sequence[float], lengths: Sequence[float],
                             rho: float) -> np.ndarray:
    """One prompt's K samples: z(score) - rho * z(length)."""
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores but {len(lengths)} lengths")
    return z_normalise(scores) - rho * z_normalise(lengths)
