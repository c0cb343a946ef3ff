import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data import GENERIC, apply_thought_chat_template
from megatron_tpo.rollout import HFRolloutEngine, SamplingParams, load_rollout_config

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "data"))
from tiny_hf import tiny_llama_config, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def tiny_policy(tokenizer, seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer)).eval()


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
                if token in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                    break
                generated.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert output.num_tokens == [len(generated)]
        assert output.texts == [tokenizer.decode(generated, skip_special_tokens=True)]


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
    with pytest.raises(ConfigError, match="rollout.engine='trt'"):
        load_rollout_config("tiny", engine="trt")
    with pytest.raises(ConfigError, match=r"sampling.top_p=1.5"):
        load_rollout_config("tiny", sampling={"top_p": 1.5})
