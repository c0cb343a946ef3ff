"""Llama-3.1 RoPE scaling in the megatron model equals HF's, for any llama3 parameters."""

import pytest
import torch

from llama_fixtures import save_random_hf_llama, tiny_model_config
from megatron_tpo.config import ConfigError, ParallelConfig
from megatron_tpo.model.conversion import hf_to_mcore
from megatron_tpo.parallel.local_launch import spawn_local

# Sequences well past original_max_position_embeddings, where the scaling acts.
SEQ_LEN = 96
# Llama 3.1's own parameters at a short original context, and a set megatron-core 0.16's
# GPTModel cannot express (it passes only the factor), to prove all four reach the model.
SCALINGS = {
    "llama31_short_context": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=32),
    "all_four_changed": dict(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
                             original_max_position_embeddings=64),
}


def _scaled_model(scaling):
    # A small RoPE base puts the wavelengths around the original context, so many
    # frequencies fall in the scaled and in the smoothed bands.
    return tiny_model_config(num_layers=2, rope_theta=10000.0, max_position_embeddings=256,
                             rope_scaling=scaling)


def _megatron_logits(rank, world_size, models, shard_roots, tokens):
    from megatron.core import parallel_state

    from megatron_tpo.model.llama import build_llama
    from megatron_tpo.model.mcore_shards import load_model_shards
    from megatron_tpo.parallel import init_megatron

    logits = []
    for model, root in zip(models, shard_roots):
        init_megatron(ParallelConfig(), model)
        gpt = build_llama(model, ParallelConfig()).eval()
        load_model_shards(gpt, root)
        with torch.no_grad():
            output = gpt(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        logits.append(output[..., : model.vocab_size])  # [batch, sequence, vocab]
        parallel_state.destroy_model_parallel()
    return logits


def _hf_logits(hf_dir, tokens):
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf_model(tokens).logits


@pytest.mark.slow
def test_megatron_logits_equal_hf_with_llama3_scaling_past_the_original_context(tmp_path):
    models, hf_dirs, roots = [], [], []
    for name, scaling in SCALINGS.items():
        model = _scaled_model(scaling)
        hf_dirs.append(save_random_hf_llama(model, tmp_path / name / "hf"))
        roots.append(hf_to_mcore(hf_dirs[-1], tmp_path / name / "mcore", 1, 1,
                                 make_vocab_size_divisible_by=1, progress=False).destination)
        models.append(model)
    unscaled_dir = save_random_hf_llama(_scaled_model(None), tmp_path / "unscaled")
    tokens = torch.randint(0, models[0].vocab_size, (2, SEQ_LEN),
                           generator=torch.Generator().manual_seed(3))

    megatron = spawn_local(_megatron_logits, 1, models, roots, tokens)[0]
    unscaled = _hf_logits(unscaled_dir, tokens)  # same seed, so the same weights
    for name, hf_dir, got in zip(SCALINGS, hf_dirs, megatron):
        expected = _hf_logits(hf_dir, tokens)
        # The scaling must matter for the comparison to prove anything.
        assert (expected - unscaled).abs().max() > 1e-2, f"{name}: scaling changes nothing"
        difference = (got - expected).abs().max().item()
        assert difference < 1e-4, f"{name}: max |megatron - HF| = {difference}"


@pytest.mark.parametrize("scaling,setting", [
    (dict(factor=0.5), "factor=0.5"),
    (dict(low_freq_factor=4.0, high_freq_factor=4.0), "high_freq_factor=4.0"),
    (dict(original_max_position_embeddings=0), "original_max_position_embeddings=0"),
])
def test_llama3_scaling_that_would_give_nan_frequencies_is_refused(scaling, setting):
    from megatron_tpo.model.llama import check_buildable

    with pytest.raises(ConfigError, match=setting):
        check_buildable(tiny_model_config(rope_scaling=scaling), ParallelConfig())
