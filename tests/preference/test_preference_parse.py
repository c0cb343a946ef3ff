"""preference/parse.py: every sample of hand-built outputs becomes a row with its token ids
and parse; failures are counted by reason, truncation on top; only parsed, untruncated
samples are judged."""

import pytest

from megatron_tpo.data.config import ThoughtTemplate
from megatron_tpo.preference.parse import by_prompt, is_judged, rollout_rows
from megatron_tpo.rollout.engine import GenerationOutput

TEMPLATE = ThoughtTemplate(name="t", prompt="Q: {instruction}", response_marker="R:",
                           thought_marker="T:")


def _outputs():
    return [
        GenerationOutput(prompt="Q: one", texts=["T: think R: yes", "no marker", "R: a R: b"],
                         num_tokens=[3, 2, 4], prompt_token_ids=[5, 6],
                         token_ids=[[1, 2, 3], [4, 5], [6, 7, 8, 9]],
                         finish_reasons=["stop", "stop", "length"]),
        GenerationOutput(prompt="Q: two", texts=["plan R: ok", "plan R:   "], num_tokens=[2, 1]),
    ]


def test_every_sample_is_a_row_with_its_ids_parse_and_failure():
    rows, failures = rollout_rows(["one", "two"], _outputs(), TEMPLATE)
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (0, 2),
                                                                  (1, 0), (1, 1)]
    first = rows[0]
    assert first == {"prompt_id": 0, "sample_index": 0, "instruction": "one",
                     "prompt_text": "Q: one", "prompt_token_ids": [5, 6],
                     "output": "T: think R: yes", "output_token_ids": [1, 2, 3],
                     "finish_reason": "stop", "thought": "think", "response": "yes",
                     "parse_ok": True, "parse_failure": None}
    assert [(r["parse_ok"], r["parse_failure"], r["response"]) for r in rows[1:]] == [
        (False, "no_response_marker", None), (False, "repeated_response_marker", None),
        (True, None, "ok"), (False, "empty_response", None)]
    assert rows[2]["finish_reason"] == "length"
    # Text-only outputs (no ids, no finish reasons) count as stopped, with no ids.
    assert (rows[3]["output_token_ids"], rows[3]["finish_reason"], rows[3]["thought"]) == \
        ([], "stop", "plan")
    assert failures == {"no_response_marker": 1, "repeated_response_marker": 1,
                        "empty_response": 1, "truncated": 1}


def test_only_parsed_untruncated_samples_are_judged():
    rows, _ = rollout_rows(["one", "two"], _outputs(), TEMPLATE)
    assert [is_judged(r) for r in rows] == [True, False, False, True, False]
    cut = dict(rows[0], finish_reason="length")
    assert not is_judged(cut)


def test_instructions_and_outputs_must_pair_up():
    with pytest.raises(ValueError, match="1 instructions but 2 outputs"):
        rollout_rows(["one"], _outputs(), TEMPLATE)


def test_by_prompt_groups_rows_in_prompt_order():
    rows = [{"prompt_id": 2, "k": 0}, {"prompt_id": 0, "k": 1}, {"prompt_id": 2, "k": 2}]
    grouped = by_prompt(rows)
    assert list(grouped) == [0, 2]
    assert [r["k"] for r in grouped[2]] == [0, 2]
