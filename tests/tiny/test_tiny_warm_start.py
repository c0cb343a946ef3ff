import pytest
import torch

from megatron_tpo.config import ConfigError, ModelConfig
from megatron_tpo.data.thought_templates import GENERIC
from megatron_tpo.tiny.assets import tokenizer_corpus
from megatron_tpo.tiny.task import generate_problems
from megatron_tpo.tiny.thoughts import DEFAULT_MIX
from megatron_tpo.tiny.tokenizer import train_tokenizer
from megatron_tpo.tiny.warm_start import (IGNORE_INDEX, SFTConfig, new_policy,
                                          packed_batch, policy_prompt, save_policy,
                                          supervised_warm_start, warm_start_data,
                                          warm_start_schedule)


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


def test_packed_batch_fills_rows_longest_first_and_restarts_positions_per_example():
    i = IGNORE_INDEX
    batch = packed_batch([([1, 2], [3]), ([4, 5, 6], [7, 8]), ([9], [10])], pad_id=0)
    # Width 5 (the longest): it fills row 0; the two short ones share row 1.
    assert batch["input_ids"].tolist() == [[4, 5, 6, 7, 8], [1, 2, 3, 9, 10]]
    assert batch["labels"].tolist() == [[i, i, i, 7, 8], [i, i, 3, i, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    tail = packed_batch([([1, 2, 3], [4]), ([5], [6])], pad_id=0)
    assert tail["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert tail["labels"].tolist() == [[i, i, i, 4], [i, 6, i, i]]
    assert tail["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.slow
def test_packed_forward_gives_each_example_its_own_logits_and_loss_in_float64(tokenizer,
                                                                             problems):
    """Packing must not let an example see the one before it in its row: each example's
    logits equal its forward alone, and the loss is the token mean of their NLLs."""
    examples = [d.example for d in warm_start_data(problems[:12], tokenizer, DEFAULT_MIX, 0)]
    batch = packed_batch(examples, tokenizer.pad_token_id)
    assert len(batch["input_ids"]) < len(examples)  # direct examples share rows
    model = new_policy(small_model_config(tokenizer), seed=0).double().eval()
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).logits
        loss = model(**batch).loss.item()
        nll, tokens = 0.0, 0
        for prompt, completion in examples:
            ids = torch.tensor([prompt + completion])
            alone = model(ids).logits[0]
            row, start = next((r, s) for r in range(len(batch["input_ids"]))
                              for s in range(batch["input_ids"].shape[1] - ids.shape[1] + 1)
                              if batch["input_ids"][r, s:s + ids.shape[1]].tolist() == ids[0].tolist()
                              and batch["position_ids"][r, s] == 0)
            torch.testing.assert_close(packed_logits[row, start:start + ids.shape[1]], alone,
                                       rtol=0, atol=1e-10)
            log_probs = torch.log_softmax(alone[len(prompt) - 1:-1], dim=-1)
            nll -= log_probs.gather(1, torch.tensor(completion)[:, None]).sum().item()
            tokens += len(completion)
    # transformers takes the loss in float32.
    assert loss == pytest.approx(nll / tokens, rel=1e-6)


@pytest.mark.slow
def test_a_few_sft_steps_lower_the_completion_loss(tokenizer, problems):
    examples = [d.example for d in warm_start_data(problems, tokenizer, DEFAULT_MIX, 0)
                if d.style == "thought"]
    model = new_policy(small_model_config(tokenizer), seed=0)
    held = packed_batch(examples[:16], tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**held).loss.item()
    probed = []  # benchmarks/warm_start_curve.py probes the model here, in training mode
    losses = supervised_warm_start(model, examples, SFTConfig(steps=12, batch_size=8, lr=3e-3,
                                                               warmup_steps=2),
                                   pad_id=tokenizer.pad_token_id, progress=False,
                                   after_step=lambda steps: probed.append((steps, model.training)))
    with torch.no_grad():
        after = model(**held).loss.item()
    assert len(losses) == 12
    assert probed == [(steps, True) for steps in range(1, 13)]
    assert not model.training
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


def _schedule_factors(sft: SFTConfig, count: int):
    # The factor each optimizer step runs at, read off a real optimizer as the warm start
    # steps it.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warm_start_schedule(optimizer, sft)
    factors = []
    for _ in range(count):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return factors


@pytest.mark.parametrize("floor", [0.1, 0.5, 1.0])
def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_final_fraction(floor):
    sft = SFTConfig(steps=110, warmup_steps=10, final_lr_fraction=floor)
    factors = _schedule_factors(sft, 111)
    assert [factors[s] for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert factors[60] == pytest.approx((1 + floor) / 2)   # halfway down the cosine
    assert factors[110] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_bad_sft_settings_name_the_key():
    with pytest.raises(ConfigError, match="sft.steps=0"):
        SFTConfig(steps=0).validate()
    with pytest.raises(ConfigError, match="sft.warmup_steps=50"):
        SFTConfig(steps=50, warmup_steps=50).validate()
    with pytest.raises(ConfigError, match="sft.final_lr_fraction=0"):
        SFTConfig(final_lr_fraction=0).validate()
