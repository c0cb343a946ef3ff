"""Score M_t's held-out answers and set them against M_0's, under the run's own judge.

This is the paper's AlpacaEval-style view of progress: the same instructions every
iteration, one greedy answer each, the judge comparing M_t's response with M_0's (in
one judge call per instruction, so a pairwise judge really compares the two). An answer
that does not parse is never shown to the judge: it scores ``failure_score`` and loses
to any answer that parses.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_tpo.judge.base import Judge


def _judged_scores(answers: Sequence[dict], first: Sequence[dict], judge: Judge
                   ) -> List[List[Optional[float]]]:
    """Per instruction, [score of M_t, score of M_0], None where the answer did not parse."""
    groups = [[row for row in (now, then) if row["parse_ok"]] for now, then in zip(answers, first)]
    judgment = judge.judge([row["instruction"] for row in answers],
                           [[row["response"] for row in group] for group in groups])
    scores = []
    for (now, then), group, values in zip(zip(answers, first), groups, judgment.scores):
        by_row = {id(row): value for row, value in zip(group, values)}
        scores.append([by_row.get(id(now)), by_row.get(id(then))])
    return scores


def _outcome(now: Optional[float], then: Optional[float]) -> float:
    """1 for a win of M_t, 0.5 for a tie, 0 for a loss; an unparsed answer loses."""
    now = float("-inf") if now is None else now
    then = float("-inf") if then is None else then
    return 1.0 if now > then else 0.5 if now == then else 0.0


def score_heldout(answers: Sequence[dict], first: Sequence[dict], judge: Judge,
                  failure_score: float) -> List[dict]:
    """``answers`` and ``first`` are rollout rows of M_t and M_0 for the same instructions."""
    if [a["instruction"] for a in answers] != [f["instruction"] for f in first]:
        raise ValueError("held-out answers of M_t and M_0 are for different instructions")
    rows = []
    for answer, (now, then) in zip(answers, _judged_scores(answers, first, judge)):
        rows.append({
            "prompt_id": answer["prompt_id"], "instruction": answer["instruction"],
            "output": answer["output"], "response": answer["response"],
            "thought": answer["thought"], "parse_ok": answer["parse_ok"],
            "finish_reason": answer["finish_reason"],
            "output_tokens": len(answer["output_token_ids"]),
            "score": failure_score if now is None else now,
            "first_score": failure_score if then is None else then,
            "win_against_first": _outcome(now, then),
        })
    return rows


def _shown_length(row: dict) -> int:
    """Characters of the response the judge saw; an answer that did not parse showed none."""
    return len(row["response"]) if row["parse_ok"] and row["response"] else 0


def lc_win_rate_vs_first(rows: Sequence[dict], first: Sequence[dict]) -> float:
    """AlpacaEval 2's length-controlled win rate of M_t (``rows``) against M_0 (``first``,
    iteration 0's held-out rows), as a fraction: the win/tie/loss outcomes as preferences,
    response lengths in characters (evaluation/winrate.py)."""
    from megatron_tpo.evaluation.winrate import length_controlled_win_rate

    by_instruction = {row["instruction"]: row for row in first}
    pairs = [(row, by_instruction[row["instruction"]]) for row in rows
             if row["instruction"] in by_instruction]
    if not pairs:
        return float("nan")
    preferences = [1.0 + row["win_against_first"] for row, _ in pairs]
    result = length_controlled_win_rate(preferences, [_shown_length(then) for _, then in pairs],
                                        [_shown_length(now) for now, _ in pairs])
    return result["length_controlled_winrate"] / 100


def heldout_metrics(rows: Sequence[dict], first: Optional[Sequence[dict]] = None
                    ) -> Dict[str, float]:
    """The held-out record of M_t; with ``first`` (M_0's held-out rows, iteration 0's) also
    its length-controlled win rate against M_0."""
    count = max(len(rows), 1)
    metrics = {
        "heldout/score": sum(r["score"] for r in rows) / count,
        "heldout/win_rate_vs_m0": sum(r["win_against_first"] for r in rows) / count,
        "heldout/parse_rate": sum(r["parse_ok"] for r in rows) / count,
    }
    if first is not None:
        metrics["heldout/lc_win_rate_vs_m0"] = float(np.nan_to_num(
            lc_win_rate_vs_first(rows, first), nan=0.5))
    return metrics
