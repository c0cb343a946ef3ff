import json

import pytest

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data import PromptFileError
from megatron_tpo.judge import (ExactAnswerJudge, FormatJudge, JudgeConfig, PairwiseJudge,
                                build_judge, load_judge_config)


def test_exact_answer_with_pattern():
    judge = ExactAnswerJudge({"2+2?": "4", "capital of France?": "Paris"},
                             answer_pattern=r"answer is:?\s*([^\n]+)")
    judgment = judge.judge(["2+2?", "capital of France?"],
                           [["so the answer is 4.", "The answer is 5", "four"],
                            ["The answer is:  paris", "answer is Lyon"]])
    assert judgment.scores == [[1.0, 0.0, 0.0], [1.0, 0.0]]
    assert judgment.counts["no_answer_found"] == 1
    with pytest.raises(KeyError, match="no reference answer"):
        judge.judge(["unknown?"], [["x"]])


def test_format_judge():
    judge = FormatJudge(r"^- .+\n- .+", max_chars=30)
    scores = judge.score(["q"], [["- a\n- b", "a\nb", "- " + "x" * 40 + "\n- y"]])
    assert scores == [[1.0, 0.0, 0.0]]


def test_build_judge_picks_rule_judges_from_config(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "1+1?", "answer": "2"}, {"instruction": "3*3?", "answer": "9"}]) + "\n")
    config = load_judge_config("exact_answer", exact_answer={"answers_path": str(answers)})
    judge = build_judge(config)
    assert isinstance(judge, ExactAnswerJudge)
    assert judge.score(["1+1?", "3*3?"], [["answer is 2", "answer is 3"], ["answer is 9"]]) == \
        [[1.0, 0.0], [1.0]]
    assert isinstance(build_judge(load_judge_config("format")), FormatJudge)

    answers.write_text('{"instruction": "1+1?"}\n')
    with pytest.raises(PromptFileError, match=r"answers.jsonl:1: missing field 'answer'"):
        build_judge(config)


def test_pairwise_needs_an_engine_and_bad_settings_name_themselves():
    config = load_judge_config("pairwise")
    with pytest.raises(ValueError, match="needs a RolloutEngine"):
        build_judge(config)
    with pytest.raises(ConfigError, match="judge.kind='oracle'"):
        JudgeConfig(kind="oracle").validate()
    with pytest.raises(ConfigError, match="bradley_terry_prior"):
        load_judge_config("pairwise", pairwise={"bradley_terry_prior": 0.0})
    with pytest.raises(ConfigError, match="judge.reward_model.path is empty"):
        JudgeConfig(kind="reward_model").validate()
    assert load_judge_config("armorm").length_control.rho == 0.25


def test_build_pairwise_judge_with_chat_template():
    from megatron_tpo.rollout import GenerationOutput, RolloutEngine

    class Recorder(RolloutEngine):
        prompts = []

        def generate(self, prompts, sampling):
            self.prompts += prompts
            assert sampling.n == 1 and sampling.temperature == 0.0
            return [GenerationOutput(p, ["[[B]]"], [1]) for p in prompts]

        def update_weights(self, stream):
            pass

    class Tokenizer:
        chat_template = "<chat>{{ content }}</chat>"  # judge prompts refuse a tokenizer without one

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<chat>" + messages[0]["content"] + "</chat>"

    engine = Recorder()
    judge = build_judge(load_judge_config("pairwise", pairwise={"score_method": "win_rate"}),
                        engine=engine, judge_tokenizer=Tokenizer())
    assert isinstance(judge, PairwiseJudge)
    assert judge.score(["q"], [["x", "y"]]) == [[0.5, 0.5]]   # always B: one win each
    assert all(p.startswith("<chat>") and p.endswith("</chat>") for p in engine.prompts)
