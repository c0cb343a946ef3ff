import pytest

from megatron_tpo.data.chat import apply_thought_chat_template
from megatron_tpo.data.thought_templates import GENERIC
from megatron_tpo.tiny.assets import tokenizer_corpus
from megatron_tpo.tiny.task import direct_demonstration, generate_problems, thought_demonstration
from megatron_tpo.tiny.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def problems():
    return generate_problems(300, num_terms=4, seed=0)


@pytest.fixture(scope="module")
def tokenizer(problems):
    return train_tokenizer(tokenizer_corpus(problems[:200]), vocab_size=512)


def test_text_round_trips_exactly_including_unseen_problems(tokenizer, problems):
    for problem in problems[200:]:
        for text in (thought_demonstration(problem, GENERIC), direct_demonstration(problem),
                     apply_thought_chat_template(tokenizer, problem.instruction, GENERIC)):
            ids = tokenizer(text, add_special_tokens=False).input_ids
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text
    odd = "Ünïcode {braces} \t tabs 12345"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False).input_ids) == odd


def test_every_digit_is_its_own_token(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(
        tokenizer("ones: 3 + 5 + 7 = 15\nThe answer is 1234567890.",
                  add_special_tokens=False).input_ids)
    assert all(sum(ch.isdigit() for ch in token) <= 1 for token in tokens)
    assert [t for t in tokens if t.isdigit()] == list("3571512345678" "90")


def test_chat_template_is_llama3_format_with_eot_as_eos(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 1 + 2? "}],
        tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 1 + 2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id, None)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # Special tokens are single ids, and nothing is added around the template's text.
    assert ids[:2] == tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>"])
    assert tokenizer(text).input_ids == ids
    assert "assistant" in tokenizer.get_vocab()


def test_saved_tokenizer_loads_back_with_same_ids_and_template(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    text = apply_thought_chat_template(loaded, "What is 10 + 20 + 30 + 40?", GENERIC)
    assert text == apply_thought_chat_template(tokenizer, "What is 10 + 20 + 30 + 40?", GENERIC)
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id,
                                                          tokenizer.pad_token_id)
    assert len(loaded) == len(tokenizer)
