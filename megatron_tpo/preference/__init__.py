"""Rollouts to preference pairs: parsing into rows, judging, length control, pair selection."""

from megatron_tpo.preference.from_rollouts import (IterationData, PreferenceConfig,
                                                   build_iteration_data, judge_rollouts,
                                                   preference_pairs, rollout_rows)
from megatron_tpo.preference.length_control import length_controlled_scores, z_normalise
from megatron_tpo.preference.pairs import (SKIP_EQUAL_SCORES, SKIP_TOO_FEW_SAMPLES, PromptSamples,
                                           SelectedPair, select_pair, select_pairs)
from megatron_tpo.preference.summary import iteration_summary

__all__ = [
    "IterationData", "PreferenceConfig", "PromptSamples", "SKIP_EQUAL_SCORES",
    "SKIP_TOO_FEW_SAMPLES", "SelectedPair", "build_iteration_data", "iteration_summary",
    "judge_rollouts", "length_controlled_scores", "preference_pairs", "rollout_rows",
    "select_pair", "select_pairs", "z_normalise",
]
