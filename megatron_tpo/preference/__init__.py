"""Length control and preference-pair selection."""

from megatron_tpo.preference.from_rollouts import IterationData, build_iteration_data
from megatron_tpo.preference.length_control import length_controlled_scores, z_normalise
from megatron_tpo.preference.summary import iteration_summary
from megatron_tpo.preference.pairs import (SKIP_EQUAL_SCORES, SKIP_TOO_FEW_SAMPLES, PromptSamples,
                                           SelectedPair, select_pair, select_pairs)

__all__ = ["IterationData", "PromptSamples", "build_iteration_data", "iteration_summary", "SKIP_EQUAL_SCORES", "SKIP_TOO_FEW_SAMPLES", "SelectedPair",
           "length_controlled_scores", "select_pair", "select_pairs", "z_normalise"]
