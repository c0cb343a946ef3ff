"""The parity check after a weight sync probes real text (the run's own chat prompts,
tokenized), never random ids such as Llama-3's untrained reserved tokens; its tolerance
resolves from the trainer's precision and FP8 setting; and every sync's measured
difference lands in the iteration record of ``metrics.jsonl``."""

import json

import pytest
import torch

from tiny_hf import tiny_tokenizer
from tpo_fixtures import loop_overrides

from megatron_tpo.config import ConfigError
from megatron_tpo.weights import WeightSyncConfig
from megatron_tpo.weights.parity import text_probes

INSTRUCTIONS = ["the cat is my dog", "a b c d e f g h", "sun", "moon is the sun"]


def chat(tokenizer, instruction):
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                         tokenize=False, add_generation_prompt=True)


def test_probes_are_the_given_prompts_tokens_cut_to_one_length():
    tokenizer = tiny_tokenizer()
    texts = [chat(tokenizer, instruction) for instruction in INSTRUCTIONS]
    tokens = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    probes = text_probes(tokenizer, texts, count=3, length=64)
    shortest = min(len(ids) for ids in tokens[:3])   # "sun": 9 tokens
    assert shortest == 9 and len(probes) == 3
    assert probes == [ids[:shortest] for ids in tokens[:3]]
    # Every id is one the tokenizer gave the text: no id the prompts do not hold (on
    # Llama-3, the untrained reserved tokens a random draw over the vocabulary hits).
    assert {i for probe in probes for i in probe} <= {i for ids in tokens for i in ids}
    assert text_probes(tokenizer, texts, count=2, length=5) == [ids[:5] for ids in tokens[:2]]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        text_probes(tokenizer, [""], count=1, length=64)


def test_the_tolerance_resolves_from_the_trainers_precision_and_fp8():
    config = WeightSyncConfig()
    assert config.tolerance_for(torch.float32, fp8=False) == (
        "weight_sync.parity_tolerance_float32", 1e-3)
    assert config.tolerance_for(torch.bfloat16, fp8=False) == (
        "weight_sync.parity_tolerance_bfloat16", 0.5)
    assert config.tolerance_for(torch.float16, fp8=False) == (
        "weight_sync.parity_tolerance_bfloat16", 0.5)   # finer than bf16: its bound holds
    for dtype in (torch.float32, torch.bfloat16):
        assert config.tolerance_for(dtype, fp8=True) == ("weight_sync.parity_tolerance_fp8", 1.0)
    # One explicit value overrides every precision.
    assert WeightSyncConfig(parity_tolerance=0.02).tolerance_for(torch.bfloat16, fp8=True) == (
        "weight_sync.parity_tolerance", 0.02)
    with pytest.raises(ConfigError, match="weight_sync.parity_tolerance_bfloat16=0"):
        WeightSyncConfig(parity_tolerance_bfloat16=0).validate()


@pytest.mark.slow
def test_each_syncs_measured_difference_lands_in_the_iteration_record(uninterrupted):
    from megatron_tpo.build import training_prompts
    from megatron_tpo.cli.run import compose_config
    from megatron_tpo.data.chat import apply_thought_chat_template

    records = [json.loads(line) for line in open(uninterrupted / "run" / "metrics.jsonl")]
    iteration = next(r for r in records if r["kind"] == "iteration")
    # The CPU trainer and HF engine are float32: the tight bound, and they meet it.
    assert iteration["weight_sync/parity_tolerance"] == 1e-3
    worst, mean = (iteration["weight_sync/max_abs_logprob_diff"],
                   iteration["weight_sync/mean_abs_logprob_diff"])
    assert 0 <= mean <= worst < 1e-4
    # The probes are the run's first training prompts as the policy reads them.
    config = compose_config(loop_overrides(uninterrupted))
    tokenizer = tiny_tokenizer()
    count = config.weight_sync.num_probe_sequences
    lengths = [len(tokenizer(apply_thought_chat_template(tokenizer, instruction, config.thought),
                             add_special_tokens=False)["input_ids"])
               for instruction in training_prompts(config, tokenizer)[:count]]
    expected = count * (min(min(lengths), config.weight_sync.probe_length) - 1)
    assert iteration["weight_sync/parity_probe_tokens"] == expected > 20
