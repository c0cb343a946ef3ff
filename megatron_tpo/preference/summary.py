"""One iteration's data in a few numbers, for metrics and plots.

``mean_length_margin`` is the one to watch when tuning length control: the paper raises
rho until chosen responses are, on average, not longer than rejected ones.
"""

from typing import Dict, Optional, Sequence

import numpy as np

from megatron_tpo.preference.iteration import IterationData


def _mean(values: Sequence[Optional[float]]) -> float:
    """Mean of the known values (a pair against an invalid output has no margins)."""
    known = [value for value in values if value is not None]
    return float(np.mean(known)) if known else float("nan")


def iteration_summary(data: IterationData) -> Dict[str, float]:
    parsed = [row for row in data.rollouts if row["parse_ok"]]
    return {
        "samples": float(len(data.rollouts)),
        "parse_rate": len(parsed) / len(data.rollouts) if data.rollouts else float("nan"),
        "mean_score": _mean([row["score"] for row in data.judgments]),
        "mean_response_length": _mean([row["response_length"] for row in data.judgments]),
        "mean_thought_chars": _mean([len(row["thought"]) for row in parsed]),
        "pairs": float(len(data.pairs)),
        "mean_score_margin": _mean([row["score_margin"] for row in data.pairs]),
        "mean_length_margin": _mean([row["length_margin"] for row in data.pairs]),
    }
