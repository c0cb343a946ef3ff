
import pytest
import torch
from transformers import LlamaForCausalLM

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data import GENERIC, apply_thought_chat_template
from megatron_tpo.rollout import HFRolloutEngine, SamplingParams, load_rollout_config

from tiny_hf import tiny_llama_config


def tiny_policy(tokenizer, seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer)).eval()


@pytest.mark.slow
def test_generate_n_samples_per_prompt_reproducibly(tokenizer):
    engine = HFRolloutEngine(tiny_policy(tokenizer, 0), tokenizer, batch_size=2)
    prompts = [apply_thought_chat_template(tokenizer, text, GENERIC)
               for text in ["the cat", "a b", "sun moon is"]]
    sampling = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=5)
    first = engine.generate(prompts, sampling)
    assert [o.prompt for o in first] == prompts
    assert all(len(o.texts) == 3 and len(o.num_tokens) == 3 for o in first)
    assert all(0 <= n <= 6 for o in first for n in o.num_tokens)
    assert [o.texts for o in engine.generate(prompts, sampling)] == [o.texts for o in first]
    different = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=6,
                                                        seed=6))
    assert [o.texts for o in different] != [o.texts for o in first]


@pytest.mark.slow
def test_greedy_matches_argmax_decoding_despite_left_padding(tokenizer):
    model = tiny_policy(tokenizer, 1)
    engine = HFRolloutEngine(model, tokenizer, batch_size=2)
    prompts = [apply_thought_chat_template(tokenizer, "the cat is here", GENERIC),
               apply_thought_chat_template(tokenizer, "dog", GENERIC)]
    outputs = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=5))
    assert sum(o.num_tokens[0] for o in outputs) > 0
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        generated = []
        with torch.no_grad():
            for _ in range(5):
                token = model(ids).logits[0, -1].argmax().item()
                if token == tokenizer.eos_token_id:
                    break
                generated.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert output.num_tokens == [len(generated)]
        assert output.token_ids == [generated]
        assert output.texts == [tokenizer.decode(generated, skip_special_tokens=True)]
        assert output.finish_reasons == ["length"]
        assert output.prompt_token_ids == ids[0, :-5].tolist()


def test_update_weights_makes_the_engine_equal_the_trainer(tokenizer):
    engine = HFRolloutEngine(tiny_policy(tokenizer, 0), tokenizer)
    trainer = tiny_policy(tokenizer, 1)
    ids = torch.tensor([[1, 3, 46, 4, 32, 62, 2]])
    with torch.no_grad():
        assert not torch.allclose(engine.model(ids).logits, trainer(ids).logits)
        engine.update_weights((name, p.detach().clone()) for name, p in trainer.named_parameters())
        torch.testing.assert_close(engine.model(ids).logits, trainer(ids).logits, rtol=0, atol=0)

    with pytest.raises(KeyError, match="'model.layers.9.mlp.up_proj.weight' is not a parameter"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \(3, 32\)"):
        engine.update_weights([("lm_head.weight", torch.zeros(3, 32))])


def test_sleep_refuses_generation_until_wake(tokenizer):
    engine = HFRolloutEngine(tiny_policy(tokenizer, 0), tokenizer)
    sampling = SamplingParams(n=1, temperature=0.0, max_new_tokens=3)
    before = engine.generate(["the cat"], sampling)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(["the cat"], sampling)
    engine.wake()
    assert engine.generate(["the cat"], sampling)[0].texts == before[0].texts


def test_rollout_configs():
    assert load_rollout_config("paper").sampling == SamplingParams(
        n=8, temperature=0.8, top_p=0.95, max_new_tokens=2048, seed=0)
    overridden = load_rollout_config("tiny", sampling={"stop": ["</R>"], "stop_token_ids": [7],
                                                       "logprobs": True})
    assert (overridden.sampling.stop, overridden.sampling.stop_token_ids,
            overridden.sampling.logprobs) == (["</R>"], [7], True)
    with pytest.raises(ConfigError, match=r"sampling.stop=\[''\]"):
        load_rollout_config("tiny", sampling={"stop": [""]})
    with pytest.raises(ConfigError, match="rollout.vllm.gpu_memory_utilization=1.5"):
        load_rollout_config("paper", vllm={"gpu_memory_utilization": 1.5})
    with pytest.raises(ConfigError, match="rollout.engine='trt'"):
        load_rollout_config("tiny", engine="trt")
    with pytest.raises(ConfigError, match=r"sampling.top_p=1.5"):
        load_rollout_config("tiny", sampling={"top_p": 1.5})


class EOSForcingLlama(LlamaForCausalLM):
    """A tiny random Llama that ends row ``r`` with EOS after ``stop_after[r]`` completion
    tokens (random tiny models never choose EOS themselves); counts its forward calls."""

    prompt_length = 0
    stop_after: list = []
    forward_calls = 0

    def forward(self, input_ids=None, cache=None, **kwargs):
        seen = (cache.get_seq_length() if cache is not None else 0) + input_ids.shape[1]
        output = super().forward(input_ids=input_ids, cache=cache, **kwargs)
        self.forward_calls += 1
        generated = seen - self.prompt_length
        for row, count in enumerate(self.stop_after):
            if generated == count:
                output.logits[row, -1] = -1e9
                output.logits[row, -1, self.config.eos_token_id] = 0.0
        return output


def _greedy(engine, prompts, max_new_tokens, **settings):
    return engine.generate(prompts, SamplingParams(n=1, temperature=0.0, top_p=1.0,
                                                   max_new_tokens=max_new_tokens, **settings))


def test_eos_ends_each_sample_there_and_generation_stops_when_all_have(tokenizer):
    torch.manual_seed(4)
    model = EOSForcingLlama(tiny_llama_config(tokenizer)).eval()
    engine = HFRolloutEngine(model, tokenizer, batch_size=3)
    prompts = ["the cat", "my dog", "sun moon"]  # one length, so one prompt_length
    free = _greedy(engine, prompts, 5)
    assert all(len(o.token_ids[0]) == 5 and o.finish_reasons == ["length"] for o in free)
    assert all(tokenizer.eos_token_id not in o.token_ids[0] for o in free)

    model.prompt_length, model.stop_after, model.forward_calls = 2, [1, 3, 99], 0
    forced = _greedy(engine, prompts, 5)
    assert [o.token_ids[0] for o in forced] == [free[0].token_ids[0][:1],
                                                free[1].token_ids[0][:3], free[2].token_ids[0]]
    assert [o.num_tokens[0] for o in forced] == [1, 3, 5]
    assert [o.finish_reasons[0] for o in forced] == ["stop", "stop", "length"]
    assert [o.texts[0] for o in forced] == [
        tokenizer.decode(o.token_ids[0], skip_special_tokens=True) for o in forced]
    assert model.forward_calls == 5

    model.stop_after, model.forward_calls = [2, 2, 2], 0
    assert [o.num_tokens[0] for o in _greedy(engine, prompts, 10)] == [2, 2, 2]
    assert model.forward_calls == 3  # all rows done: no decoding up to max_new_tokens


def _words_before(text: str, start: int) -> int:
    """How many whole words of a space-joined text end before character ``start``."""
    head = text[:start]
    return len(head.split()) - (0 if head == "" or head.endswith(" ") else 1)


def test_stop_token_ids_and_stop_strings_cut_ids_and_text_before_them(tokenizer):
    engine = HFRolloutEngine(tiny_policy(tokenizer, 3), tokenizer)
    prompt = ["the cat is here"]
    free = _greedy(engine, prompt, 8)[0]
    ids, text = free.token_ids[0], free.texts[0]
    assert len(ids) == 8 and text == " ".join(tokenizer.convert_ids_to_tokens(ids))
    new = next(i for i in range(1, 8) if ids[i] not in ids[:i])

    by_id = _greedy(engine, prompt, 8, stop_token_ids=[ids[new]])[0]
    assert by_id.token_ids == [ids[:new]] and by_id.finish_reasons == ["stop"]

    words = text.split()
    cases = [words[new],                          # a whole token
             f"{words[new - 1]} {words[new]}",    # spans two tokens
             words[new][1:] or words[new]]        # ends inside a token
    for stop in cases:
        out = _greedy(engine, prompt, 8, stop=[stop, "never-generated"])[0]
        kept = _words_before(text, text.find(stop))
        assert out.token_ids == [ids[:kept]], stop
        assert out.texts == [tokenizer.decode(ids[:kept], skip_special_tokens=True)]
        assert stop not in out.texts[0] and out.finish_reasons == ["stop"]
    assert _greedy(engine, prompt, 8, stop=["never-generated"])[0].token_ids == [ids]


def _plain_logprobs(model, token_ids):
    tokens = torch.tensor([token_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens).logits[0, :-1].double(), dim=-1)
    return logprobs.gather(-1, tokens[0, 1:, None])[:, 0]


def test_sampled_logprobs_and_scores_equal_a_plain_forward_pass(tokenizer):
    model = tiny_policy(tokenizer, 2)
    engine = HFRolloutEngine(model, tokenizer, batch_size=2)
    prompts = ["the cat is here", "dog", "a b c"]   # left padding inside a batch
    sampling = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=1,
                              logprobs=True)
    outputs = engine.generate(prompts, sampling)
    sequences, expected = [], []
    for prompt, output in zip(prompts, outputs):
        assert output.prompt_token_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert len(output.logprobs) == 2
        for ids, logprobs in zip(output.token_ids, output.logprobs):
            assert len(logprobs) == len(ids) > 0
            full = output.prompt_token_ids + ids
            plain = _plain_logprobs(model, full)
            torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64),
                                       plain[len(output.prompt_token_ids) - 1:],
                                       rtol=0, atol=1e-5)
            sequences.append(full)
            expected.append(plain)
    for got, plain in zip(engine.score(sequences), expected):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), plain,
                                   rtol=0, atol=1e-5)
    assert outputs[0].token_ids[0] != outputs[0].token_ids[1]  # n samples, not n copies


def test_seeded_rollout_leaves_the_callers_random_stream_alone(tokenizer):
    engine = HFRolloutEngine(tiny_policy(tokenizer, 0), tokenizer)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    engine.generate(["the cat"], SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=3))
    assert torch.equal(torch.rand(3), expected)


def test_build_rollout_engine_loads_an_hf_checkpoint_in_float32(tokenizer, tmp_path):
    from megatron_tpo.rollout.factory import build_rollout_engine

    saved = tiny_policy(tokenizer, 5)
    saved.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    engine = build_rollout_engine(load_rollout_config("tiny"), str(tmp_path / "policy"))
    assert isinstance(engine, HFRolloutEngine) and engine.batch_size == 4
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}
    ids = [1, 3, 46, 4, 32]
    torch.testing.assert_close(torch.tensor(engine.score([ids])[0], dtype=torch.float64),
                               _plain_logprobs(saved, ids), rtol=0, atol=1e-6)
