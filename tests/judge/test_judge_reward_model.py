from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaForSequenceClassification

from megatron_tpo.judge import JudgeConfig, RewardModelJudge, build_judge, reward_from_output

from tiny_hf import tiny_llama_config, tiny_tokenizer


@pytest.fixture(scope="module")
def classifier(tokenizer):
    torch.manual_seed(0)
    return LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=1)).eval()


def reward_of_one(model, tokenizer, text, max_length=10_000):
    ids = tokenizer(text, add_special_tokens=False, truncation=True,
                    max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits[0, 0].item()


def test_batched_scores_equal_one_at_a_time(classifier, tokenizer):
    judge = RewardModelJudge(classifier, tokenizer, batch_size=3)
    prompts = ["the cat", "write a b c"]
    responses = [["the sun is a cat", "dog", "moon moon moon moon moon moon"],
                 ["a b c", "c b a !"]]
    scores = judge.score(prompts, responses)
    assert [len(s) for s in scores] == [3, 2]
    for prompt, group, row in zip(prompts, responses, scores):
        for response, score in zip(group, row):
            text = judge.conversation_text(prompt, response)
            assert text.startswith("<|begin_of_text|><|start_header_id|>user")
            assert score == pytest.approx(reward_of_one(classifier, tokenizer, text), abs=1e-5)
    assert len({round(s, 6) for row in scores for s in row}) == 5


def test_long_inputs_keep_their_start(classifier):
    tokenizer = tiny_tokenizer()
    tokenizer.truncation_side = "left"      # the judge must not inherit this
    judge = RewardModelJudge(classifier, tokenizer, batch_size=2, max_length=12)
    long_response = "the cat is here " * 40
    short, long = judge.score(["q"], [["dog", long_response]])[0]
    ids = tokenizer(judge.conversation_text("q", long_response),
                    add_special_tokens=False)["input_ids"]
    assert len(ids) > 12
    with torch.no_grad():
        expected = classifier(torch.tensor([ids[:12]])).logits[0, 0].item()
    assert long == pytest.approx(expected, abs=1e-5)


def test_models_without_a_pad_token_run_unpadded(tokenizer):
    torch.manual_seed(2)
    model = LlamaForSequenceClassification(
        tiny_llama_config(tokenizer, num_labels=1, pad_token_id=None)).eval()
    judge = RewardModelJudge(model, tokenizer, batch_size=4)
    assert judge.effective_batch_size() == 1
    scores = judge.score(["q"], [["dog", "the sun is a cat"]])[0]
    for response, score in zip(["dog", "the sun is a cat"], scores):
        text = judge.conversation_text("q", response)
        assert score == pytest.approx(reward_of_one(model, tokenizer, text), abs=1e-5)


@dataclass
class ArmoStyleOutput:
    score: torch.Tensor
    logits: torch.Tensor


def test_score_attribute_wins_over_logits():
    output = ArmoStyleOutput(score=torch.tensor([[0.25], [-1.5]]),
                             logits=torch.tensor([[9.0, 1.0], [9.0, 2.0]]))
    assert reward_from_output(output).tolist() == [0.25, -1.5]

    @dataclass
    class PlainOutput:
        logits: torch.Tensor

    assert reward_from_output(PlainOutput(torch.tensor([[3.0, 1.0]]))).tolist() == [3.0]


def test_build_judge_loads_a_saved_classifier(classifier, tokenizer, tmp_path):
    classifier.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = JudgeConfig(kind="reward_model")
    config.reward_model.path = str(tmp_path)
    config.reward_model.batch_size = 2
    judge = build_judge(config)
    direct = RewardModelJudge(classifier, tokenizer).score(["the cat"], [["dog", "sun"]])
    assert judge.score(["the cat"], [["dog", "sun"]])[0] == pytest.approx(direct[0], abs=1e-5)


# Written out by hand from the Llama-3 chat format, not produced by the code under test:
# the user turn holds the instruction, the assistant turn the response, no generation
# prompt after it, and no thought anywhere.
EXPECTED_CHAT_TEXTS = [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nthe cat<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nthe sun is a cat<|eot_id|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nthe cat<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\ndog<|eot_id|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nwrite a b c<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nc b a !<|eot_id|>",
]


def _record_model_inputs(model):
    """Keep every (input_ids, attention_mask) the model is called with, unpadded."""
    seen = []

    def hook(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.extend(row[row_mask.bool()].tolist() for row, row_mask in zip(ids, mask))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_reward_model_sees_user_instruction_then_assistant_response(classifier, tokenizer,
                                                                    batch_size):
    judge = RewardModelJudge(classifier, tokenizer, batch_size=batch_size)
    seen, handle = _record_model_inputs(classifier)
    try:
        judge.score(["the cat", "write a b c"], [["the sun is a cat", "dog"], ["c b a !"]])
    finally:
        handle.remove()
    expected = [tokenizer(text, add_special_tokens=False)["input_ids"]
                for text in EXPECTED_CHAT_TEXTS]
    assert seen == expected
    # The literal tokenises as intended: one BOS, each header a single special token.
    assert expected[1][:4] == tokenizer.convert_tokens_to_ids(
        ["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>"])
    assert expected[1].count(tokenizer.bos_token_id) == 1


def test_reward_model_without_chat_template_sees_instruction_blank_line_response(classifier):
    bare = tiny_tokenizer()
    bare.chat_template = None
    judge = RewardModelJudge(classifier, bare, batch_size=1)
    assert judge.conversation_text("the cat", "a dog") == "the cat\n\na dog"
    seen, handle = _record_model_inputs(classifier)
    try:
        judge.score(["the cat"], [["a dog"]])
    finally:
        handle.remove()
    assert seen == [bare("the cat a dog", add_special_tokens=False)["input_ids"]]
