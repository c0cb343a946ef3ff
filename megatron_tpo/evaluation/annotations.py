"""A model's answers judged against a reference, written in AlpacaEval's annotation format.

Each annotation: ``instruction``, ``output_1`` / ``generator_1`` (the reference),
``output_2`` / ``generator_2`` (the model), ``preference`` (1 = the reference wins, 2 = the
model wins, 1.5 = a tie, in between for a split decision, null when the judge could not
decide), ``annotator``; plus ``id``, ``dataset`` (the category), ``games`` (each judged
game as 1, 1.5 or 2, for Bradley-Terry), ``raw_completion`` (what a pairwise judge wrote,
both orders) and ``parse_ok_1`` / ``parse_ok_2``. AlpacaEval's own code reads the file.

Only responses reach the judge. An answer that did not parse is never shown to it: it
loses to a reference that parsed (both failed: a tie), its output is written empty, and
it counts as lost games; its judged score is ``failure_score`` (as in the loop's
held-out evaluation).

A pairwise judge sees each pair in both orders; the preference is the share of readable
verdicts the model won, plus one. A scoring judge (reward model, rule) scores both
responses; the higher wins.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.judge.base import Judge
from megatron_tpo.judge.pairwise import PairwiseJudge

REFERENCE_WINS, MODEL_WINS, TIE = 1.0, 2.0, 1.5


class UnreadableJudgeError(ConfigError):
    """The judge answered, but none of its verdicts could be read (a judge model or prompt
    that does not fit the verdict form): a setting to fix, reported as one."""


@dataclass(frozen=True)
class Side:
    """One side of a comparison: who answered and their (parsed) responses, per item."""

    generator: str
    responses: Sequence[Optional[str]]      # None where the answer did not parse


def _preference_from_scores(reference: float, model: float) -> float:
    return MODEL_WINS if model > reference else REFERENCE_WINS if model < reference else TIE


def _judge_pairs(judge: Judge, instructions: List[str], references: List[str],
                 answers: List[str]):
    """(preference, games, raw judge texts, scores) for each pair both sides answered."""
    if isinstance(judge, PairwiseJudge):
        # The verdicts themselves, not the judge's per-response scores: an unreadable
        # verdict is left out here (AlpacaEval drops undecided annotations) where the
        # training loop counts it as a tie.
        games = [[] for _ in instructions]
        texts = [[] for _ in instructions]
        for p, first, _, verdict, text in judge.verdicts(
                instructions, [[r, a] for r, a in zip(references, answers)]):
            texts[p].append(text)
            if verdict is not None:
                model_first = first == 1
                model_won = (verdict == "A") == model_first
                games[p].append(MODEL_WINS if model_won else REFERENCE_WINS)
        return [(sum(g) / len(g) if g else None, g, t, None) for g, t in zip(games, texts)]
    scores = judge.judge(instructions, [[r, a] for r, a in zip(references, answers)]).scores
    results = []
    for reference_score, model_score in scores:
        preference = _preference_from_scores(reference_score, model_score)
        results.append((preference, [preference], [], (reference_score, model_score)))
    return results


def annotate(judge: Judge, annotator: str, items, reference: Side, model: Side,
             failure_score: float) -> List[dict]:
    """Annotations of ``items`` (``EvalItem``s): ``model`` against ``reference``."""
    games_per_failure = 2 if isinstance(judge, PairwiseJudge) else 1
    judged = [i for i, (r, m) in enumerate(zip(reference.responses, model.responses))
              if r is not None and m is not None]
    outcomes = dict(zip(judged, _judge_pairs(
        judge, [items[i].instruction for i in judged],
        [reference.responses[i] for i in judged], [model.responses[i] for i in judged])))
    rows = []
    for index, item in enumerate(items):
        ref, answer = reference.responses[index], model.responses[index]
        if index in outcomes:
            preference, games, texts, scores = outcomes[index]
        else:   # at least one side failed to parse: decided without the judge
            preference = TIE if ref is None and answer is None else \
                REFERENCE_WINS if answer is None else MODEL_WINS
            games, texts, scores = [preference] * games_per_failure, [], None
        rows.append({
            "instruction": item.instruction, "output_1": ref or "",
            "generator_1": reference.generator, "output_2": answer or "",
            "generator_2": model.generator, "preference": preference, "annotator": annotator,
            "id": item.id, "dataset": item.category, "games": games, "raw_completion": texts,
            "parse_ok_1": ref is not None, "parse_ok_2": answer is not None,
            "score_1": failure_score if ref is None else (scores[0] if scores else None),
            "score_2": failure_score if answer is None else (scores[1] if scores else None),
        })
    return rows


def check_verdicts_readable(rows: Sequence[dict]) -> None:
    """Refuse a pairwise judge none of whose verdicts could be read, showing one."""
    written = [text for row in rows for text in row["raw_completion"]]
    readable = sum(len(row["games"]) for row in rows if row["raw_completion"])
    if written and readable == 0:
        example = written[0].strip().replace("\n", " ")[:300]
        raise UnreadableJudgeError(
            f"the judge returned no parseable verdict: 0 of {len(written)} verdicts readable "
            f"(expected [[A]] or [[B]]); one of them: {example!r}")


def preferences(rows: Sequence[dict]) -> List[float]:
    return [math.nan if row["preference"] is None else row["preference"] for row in rows]
