import pytest
import torch

from megatron_tpo.config import ConfigError, ModelConfig
from megatron_tpo.data.thought_templates import GENERIC
from megatron_tpo.tiny.assets import tokenizer_corpus
from megatron_tpo.tiny.task import generate_problems
from megatron_tpo.tiny.tokenizer import train_tokenizer
from megatron_tpo.tiny.thoughts import DEFAULT_MIX
from megatron_tpo.tiny.warm_start import (IGNORE_INDEX, SFTConfig, collate, new_policy,
                                          policy_prompt, save_policy, supervised_warm_start,
                                          warm_start_data)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(64, num_terms=3, seed=0)


@pytest.fixture(scope="module")
def tokenizer(problems):
    return train_tokenizer(tokenizer_corpus(problems), vocab_size=400)


def small_model_config(tokenizer):
    return ModelConfig(name="t", num_layers=2, hidden_size=32, ffn_hidden_size=64,
                       num_attention_heads=4, num_query_groups=2, vocab_size=len(tokenizer),
                       make_vocab_size_divisible_by=1)


def test_examples_are_the_chat_prompt_then_the_demonstration_and_eos(tokenizer, problems):
    problem = problems[0]
    direct, thought = warm_start_data([problem], tokenizer, DEFAULT_MIX, seed=0)
    for item, style, prompt_start in ((thought, "thought", "Respond to the following"),
                                      (direct, "direct", "What is")):
        assert item.style == style
        prompt_ids, completion_ids = item.example
        prompt = tokenizer.decode(prompt_ids)
        assert prompt == policy_prompt(tokenizer, problem.instruction, style)
        assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                                 + prompt_start)
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert completion_ids[-1] == tokenizer.eos_token_id
        completion = tokenizer.decode(completion_ids[:-1])
        assert completion.endswith(f"The answer is {problem.answer}.")
        assert completion.startswith(GENERIC.thought_marker) == (style == "thought")
    with pytest.raises(ConfigError, match="tiny.style='socratic'"):
        policy_prompt(tokenizer, "x", "socratic")


def test_collate_puts_labels_on_completion_tokens_only():
    batch = collate([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    i = IGNORE_INDEX
    assert batch["labels"].tolist() == [[i, i, i, 4, 5], [i, 7, 8, 9, i]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_a_few_sft_steps_lower_the_completion_loss(tokenizer, problems):
    examples = [d.example for d in warm_start_data(problems, tokenizer, DEFAULT_MIX, 0)
                if d.style == "thought"]
    model = new_policy(small_model_config(tokenizer), seed=0)
    held = collate(examples[:16], tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**held).loss.item()
    losses = supervised_warm_start(model, examples, SFTConfig(steps=12, batch_size=8, lr=3e-3,
                                                               warmup_steps=2),
                                   pad_id=tokenizer.pad_token_id, progress=False)
    with torch.no_grad():
        after = model(**held).loss.item()
    assert len(losses) == 12
    # From chance (ln 400 ~ 6) to clearly below it (12 steps gave 5.97 -> 4.87).
    assert before > 5.0 and after < before - 0.7


def test_saved_policy_reloads_with_the_same_logits_and_eot_as_eos(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = new_policy(small_model_config(tokenizer), seed=1).eval()
    save_policy(model, tokenizer, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.tensor([[1, 7, 30, 99]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id
    assert loaded.config.vocab_size == len(tokenizer)


def test_bad_sft_settings_name_the_key():
    with pytest.raises(ConfigError, match="sft.steps=0"):
        SFTConfig(steps=0).validate()
    with pytest.raises(ConfigError, match="sft.warmup_steps=50"):
        SFTConfig(steps=50, warmup_steps=50).validate()
