"""Rollouts to preference pairs: parsing into rows, judging, length control, pair selection."""

from megatron_tpo.preference.config import PreferenceConfig
from megatron_tpo.preference.iteration import IterationData, build_iteration_data
from megatron_tpo.preference.judging import judge_rollouts
from megatron_tpo.preference.length_control import length_controlled_scores, z_normalise
from megatron_tpo.preference.pairs import (SKIP_EQUAL_SCORES, SKIP_TOO_FEW_SAMPLES, PromptSamples,
                                           SelectedPair, preference_pairs, select_pair,
                                           select_pairs)
from megatron_tpo.preference.parse import rollout_rows
from megatron_tpo.preference.summary import iteration_summary

__all__ = [
    "IterationData", "PreferenceConfig", "PromptSamples", "SKIP_EQUAL_SCORES",
    "SKIP_TOO_FEW_SAMPLES", "SelectedPair", "build_iteration_data", "iteration_summary",
    "judge_rollouts", "length_controlled_scores", "preference_pairs", "rollout_rows",
    "select_pair", "select_pairs", "z_normalise",
]
