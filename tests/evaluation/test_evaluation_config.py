"""The evaluation group checks itself: a held-out set needs a file, and 0 turns it off."""

import pytest

from megatron_tpo.config import ConfigError
from megatron_tpo.evaluation.config import EvaluationConfig


def test_a_held_out_set_needs_its_file_unless_evaluation_is_off():
    with pytest.raises(ConfigError, match=r"evaluation\.path is empty .*num_prompts=0"):
        EvaluationConfig(num_prompts=8).validate()
    EvaluationConfig(num_prompts=0).validate()
    EvaluationConfig(path="heldout.jsonl", num_prompts=8).validate()


def test_a_negative_count_is_named():
    with pytest.raises(ConfigError, match=r"evaluation\.num_prompts=-1: must be >= 0"):
        EvaluationConfig(path="heldout.jsonl", num_prompts=-1).validate()


def test_settings_are_keywords_only():
    with pytest.raises(TypeError):
        EvaluationConfig("heldout.jsonl")
