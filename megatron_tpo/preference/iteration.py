"""One iteration's data, rollouts to pairs, as three stages the loop stores one by one.

    rollouts, failures = rollout_rows(instructions, outputs, template)       # parse.py
    judgments, counts = judge_rollouts(rollouts, judge, length_control, tok)  # judging.py
    pairs, skipped = preference_pairs(rollouts, judgments, rho, preference)   # pairs.py

Each returns rows ready for ``IterationStore.write``, so a restart picks up after the
last finished stage (rollouts are stored before the judge ever runs).
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import List, Sequence

from megatron_tpo.data.config import ThoughtTemplate
from megatron_tpo.data.storage import JudgmentRow, PairRow, RolloutRow
from megatron_tpo.judge.base import Judge
from megatron_tpo.judge.config import LengthControlConfig
from megatron_tpo.preference.config import PreferenceConfig
from megatron_tpo.preference.judging import judge_rollouts
from megatron_tpo.preference.pairs import preference_pairs
from megatron_tpo.preference.parse import rollout_rows
from megatron_tpo.rollout.engine import GenerationOutput


@dataclass
class IterationData:
    rollouts: List[RolloutRow]
    judgments: List[JudgmentRow]
    pairs: List[PairRow]
    # Parse failures by reason, the judge's own counts, and skipped prompts by reason.
    counts: Counter = field(default_factory=Counter)


def build_iteration_data(instructions: Sequence[str], outputs: Sequence[GenerationOutput],
                         template: ThoughtTemplate, judge: Judge,
                         length_control: LengthControlConfig, tokenizer=None,
                         preference: PreferenceConfig = PreferenceConfig()) -> IterationData:
    """All three stages at once (the loop runs them one by one to store each)."""
    rollouts, counts = rollout_rows(instructions, outputs, template)
    judgments, judge_counts = judge_rollouts(rollouts, judge, length_control, tokenizer)
    pairs, skipped = preference_pairs(rollouts, judgments, length_control.rho, preference)
    return IterationData(rollouts, judgments, pairs, counts + judge_counts + skipped)
