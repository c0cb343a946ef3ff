"""preference/judging.py: the judge sees the responses of the judged samples only, grouped
by prompt; every judged sample gets its score, the judge's extras and its length."""

from collections import Counter

import pytest

from megatron_tpo.judge.base import Judge, Judgment
from megatron_tpo.judge.config import LengthControlConfig
from megatron_tpo.preference.judging import judge_rollouts, response_length


class RecordingJudge(Judge):
    """Scores a response by its length; remembers what it was asked."""

    def __init__(self):
        self.asked = None

    def judge(self, prompts, responses):
        self.asked = (list(prompts), [list(group) for group in responses])
        return Judgment(scores=[[len(r) / 10 for r in group] for group in responses],
                        counts=Counter(judged=sum(map(len, responses))),
                        extras={"rank": [list(range(len(group))) for group in responses]})


def _row(prompt_id, sample_index, response, parse_ok=True, finish_reason="stop"):
    return {"prompt_id": prompt_id, "sample_index": sample_index,
            "instruction": f"instruction {prompt_id}", "response": response,
            "parse_ok": parse_ok, "finish_reason": finish_reason}


class WordTokenizer:
    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": text.split()}


def test_only_judged_samples_are_scored_with_their_lengths_and_extras():
    rollouts = [_row(0, 0, "short"), _row(0, 1, None, parse_ok=False),
                _row(0, 2, "a longer one", finish_reason="length"), _row(0, 3, "four words in it"),
                _row(1, 0, "x y")]
    judge = RecordingJudge()
    rows, counts = judge_rollouts(rollouts, judge, LengthControlConfig(unit="chars"))
    assert judge.asked == (["instruction 0", "instruction 1"],
                           [["short", "four words in it"], ["x y"]])
    assert rows == [
        {"prompt_id": 0, "sample_index": 0, "score": 0.5, "response_length": 5, "rank": 0},
        {"prompt_id": 0, "sample_index": 3, "score": 1.6, "response_length": 16, "rank": 1},
        {"prompt_id": 1, "sample_index": 0, "score": 0.3, "response_length": 3, "rank": 0}]
    assert counts == Counter(judged=3)


def test_lengths_in_tokens_use_the_policy_tokenizer():
    rows, _ = judge_rollouts([_row(0, 0, "four words in it")], RecordingJudge(),
                             LengthControlConfig(unit="tokens"), WordTokenizer())
    assert rows[0]["response_length"] == 4
    assert response_length("a b", "tokens", WordTokenizer()) == 2
    with pytest.raises(ValueError, match="needs the policy tokenizer"):
        response_length("a b", "tokens")
