"""Evaluation: the loop's held-out score and win rates of M_t against M_0 (``heldout``),
and ``tpo-eval``'s pieces: sets, fetch, models, answers, annotations, winrate (AlpacaEval),
arena (Bradley-Terry), scores, exports, chunks (stored, resumable work) and suite."""

from megatron_tpo.evaluation.heldout import heldout_metrics, score_heldout

__all__ = ["heldout_metrics", "score_heldout"]
