"""Preference pairs: per prompt, the best and the worst of its samples after length control."""

from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_tpo.data.storage import JudgmentRow, PairRow, RolloutRow
from megatron_tpo.preference.config import PreferenceConfig
from megatron_tpo.preference.length_control import length_controlled_scores
from megatron_tpo.preference.parse import by_prompt, is_judged


@dataclass
class PromptSamples:
    """One prompt's parsed samples; ``sample_indices`` point back into its K outputs."""

    prompt_id: int
    sample_indices: Sequence[int]
    scores: Sequence[float]
    lengths: Sequence[float]


@dataclass
class SelectedPair:
    prompt_id: int
    chosen_index: int
    rejected_index: int
    chosen_score: float
    # The three below are None when the rejected sample is an invalid, unjudged output.
    rejected_score: Optional[float]
    score_margin: Optional[float]      # raw judge score, chosen minus rejected
    length_margin: Optional[float]     # response length, chosen minus rejected
    controlled_margin: Optional[float] # length-controlled score, chosen minus rejected


SKIP_TOO_FEW_SAMPLES = "fewer_than_two_parsed"
SKIP_EQUAL_SCORES = "all_scores_equal"


def select_pair(samples: PromptSamples, rho: float, rejectable: Sequence[int] = ()
                ) -> Tuple[Optional[SelectedPair], Optional[str]]:
    """The pair of one prompt, or ``None`` and why it was skipped.

    ``rejectable`` lists sample indices of invalid (unjudged) outputs that may serve as the
    rejected side; the first of them is preferred to the worst judged sample, since an
    output that broke the format is worse than any that kept it.
    """
    if len(samples.scores) < (1 if rejectable else 2):
        return None, SKIP_TOO_FEW_SAMPLES
    scores = np.asarray(samples.scores, dtype=np.float64)
    # Equal scores carry no preference; length control alone would otherwise always pick
    # the shortest response as chosen.
    if not rejectable and np.all(scores == scores[0]):
        return None, SKIP_EQUAL_SCORES
    lengths = np.asarray(samples.lengths, dtype=np.float64)
    controlled = length_controlled_scores(scores, lengths, rho)
    best = int(np.argmax(controlled))
    if rejectable:
        return SelectedPair(samples.prompt_id, int(samples.sample_indices[best]),
                            int(rejectable[0]), float(scores[best]), None, None, None, None), None
    worst = int(np.argmin(controlled))
    return SelectedPair(
        prompt_id=samples.prompt_id,
        chosen_index=int(samples.sample_indices[best]),
        rejected_index=int(samples.sample_indices[worst]),
        chosen_score=float(scores[best]),
        rejected_score=float(scores[worst]),
        score_margin=float(scores[best] - scores[worst]),
        length_margin=float(lengths[best] - lengths[worst]),
        controlled_margin=float(controlled[best] - controlled[worst]),
    ), None


def select_pairs(prompts: Sequence[PromptSamples], rho: float
                 ) -> Tuple[List[SelectedPair], Counter]:
    """Pairs of all prompts that have one, and the skipped prompts counted by reason."""
    pairs: List[SelectedPair] = []
    skipped: Counter = Counter()
    for samples in prompts:
        pair, reason = select_pair(samples, rho)
        if pair is None:
            skipped[reason] += 1
        else:
            pairs.append(pair)
    return pairs, skipped


def _invalid_reason(row: RolloutRow, preference: PreferenceConfig):
    """Why an unjudged sample may serve as the rejected output, or None if it may not."""
    if not row["parse_ok"]:
        return "parse_failure" if preference.parse_failures == "reject" else None
    return "truncated" if preference.truncated == "reject" else None


def preference_pairs(rollouts: Sequence[RolloutRow], judgments: Sequence[JudgmentRow],
                     rho: float, preference: PreferenceConfig
                     ) -> Tuple[List[PairRow], Counter]:
    """Per prompt, the best judged sample (after length control) against the worst one, or
    against an invalid sample when ``preference`` offers those as rejected."""
    scored = by_prompt(judgments)
    pairs: List[PairRow] = []
    skipped: Counter = Counter()
    for prompt_id, samples in by_prompt(rollouts).items():
        judged = scored.get(prompt_id, [])
        rejectable = [s["sample_index"] for s in samples if not is_judged(s)
                      and _invalid_reason(s, preference)]
        pair, reason = select_pair(PromptSamples(
            prompt_id, [j["sample_index"] for j in judged], [j["score"] for j in judged],
            [j["response_length"] for j in judged]), rho, rejectable)
        if pair is None:
            skipped[reason] += 1
            continue
        by_index = {s["sample_index"]: s for s in samples}
        chosen, rejected = by_index[pair.chosen_index], by_index[pair.rejected_index]
        pairs.append(PairRow(
            prompt_id=prompt_id, instruction=chosen["instruction"],
            prompt_text=chosen["prompt_text"], prompt_token_ids=chosen["prompt_token_ids"],
            chosen=chosen["output"], rejected=rejected["output"],
            chosen_token_ids=chosen["output_token_ids"],
            rejected_token_ids=rejected["output_token_ids"],
            chosen_index=pair.chosen_index, rejected_index=pair.rejected_index,
            chosen_score=pair.chosen_score, rejected_score=pair.rejected_score,
            rejected_reason=("judged" if is_judged(rejected)
                             else _invalid_reason(rejected, preference)),
            score_margin=pair.score_margin, length_margin=pair.length_margin,
            controlled_margin=pair.controlled_margin))
    return pairs, skipped
