"""evaluation/answers.py: answer rows from hand-built outputs (responses only, failures
kept as failures, lengths in the tokenizer's tokens), the row of a prompt too long to
answer, what is stored as the answers' settings, and the refusal of a separate pool."""

from dataclasses import asdict
from pathlib import Path

import pytest

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data.config import ThoughtTemplate
from megatron_tpo.evaluation.answers import (PROMPT_TOO_LONG, AnswerEngine, answer_rows,
                                             answer_settings, unanswerable_row)
from megatron_tpo.evaluation.models import ModelSource
from megatron_tpo.evaluation.sets import EvalItem
from megatron_tpo.rollout.config import RolloutConfig
from megatron_tpo.rollout.engine import GenerationOutput, SamplingParams

TEMPLATE = ThoughtTemplate(name="t", prompt="{instruction}", response_marker="Answer:")


class WordTokenizer:
    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": text.split()}


def test_answer_rows_keep_responses_failures_and_token_counts():
    items = [EvalItem("7", "capital?", "geo"), EvalItem("8", "sum?", "math"),
             EvalItem("9", "why?", "misc")]
    outputs = [
        GenerationOutput(prompt="p", texts=["think hard Answer: Paris it is"], num_tokens=[6],
                         token_ids=[[1, 2, 3, 4, 5, 6, 7, 8]], finish_reasons=["stop"]),
        GenerationOutput(prompt="p", texts=["no marker at all"], num_tokens=[4],
                         finish_reasons=["length"]),
        GenerationOutput(prompt="p", texts=["a Answer: b Answer: c"], num_tokens=[5]),
    ]
    rows = answer_rows(items, outputs, TEMPLATE, WordTokenizer())
    assert rows[0] == {"id": "7", "instruction": "capital?", "category": "geo",
                       "output": "think hard Answer: Paris it is", "thought": "think hard",
                       "response": "Paris it is", "parse_ok": True, "parse_failure": None,
                       "finish_reason": "stop", "output_tokens": 8,   # the sampled ids
                       "thought_tokens": 2, "response_tokens": 3}
    # Without sampled ids the output is counted in the tokenizer's tokens.
    assert (rows[1]["response"], rows[1]["parse_ok"], rows[1]["parse_failure"],
            rows[1]["finish_reason"], rows[1]["output_tokens"], rows[1]["response_tokens"]) == \
        (None, False, "no_response_marker", "length", 4, 0)
    assert (rows[2]["response"], rows[2]["parse_failure"], rows[2]["thought_tokens"]) == \
        (None, "repeated_response_marker", 0)


def test_a_prompt_too_long_is_a_failure_with_nothing_generated():
    row = unanswerable_row(EvalItem("3", "long", "c"))
    assert row == {"id": "3", "instruction": "long", "category": "c", "output": "",
                   "thought": None, "response": None, "parse_ok": False,
                   "parse_failure": PROMPT_TOO_LONG, "finish_reason": "length",
                   "output_tokens": 0, "thought_tokens": 0, "response_tokens": 0}


def test_answer_settings_name_what_decides_the_answers(tmp_path):
    sampling = SamplingParams(n=1, temperature=0.0)
    settings = answer_settings(ModelSource("m0", tmp_path / "w", tmp_path / "w"), TEMPLATE,
                               sampling)
    assert settings == {"model": "m0", "weights": str(Path(tmp_path / "w").resolve()),
                        "template": asdict(TEMPLATE), "sampling": asdict(sampling)}


def test_answers_come_from_engines_of_their_own_not_a_separate_pool():
    with pytest.raises(ConfigError, match="rollout.placement='separate': tpo-eval answers"):
        AnswerEngine(RolloutConfig(placement="separate"), ranks_per_engine=1)
    engines = AnswerEngine(RolloutConfig(), ranks_per_engine=2)
    assert (engines.engine, engines.loaded, engines.ranks_per_engine) == (None, None, 2)
    engines.close()   # nothing loaded: a no-op
