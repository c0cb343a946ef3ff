"""Held-out evaluation of M_t: its judged score and its win rate against M_0."""

from megatron_tpo.evaluation.heldout import heldout_metrics, score_heldout

__all__ = ["heldout_metrics", "score_heldout"]
