"""Tiny random Llama checkpoints in the HF layout, shared by the model tests."""

import json
from pathlib import Path

import torch

from megatron_tpo.config import ModelConfig, load_model_config
from megatron_tpo.model.hf_config import hf_config_from_model


def tiny_model_config(**overrides) -> ModelConfig:
    return load_model_config("tiny", **overrides)


def save_random_hf_llama(model: ModelConfig, out_dir: Path, seed: int = 0,
                         max_shard_size: str = "50KB") -> Path:
    """A randomly initialised ``LlamaForCausalLM`` saved as sharded safetensors.

    Norm weights are randomised too, so a swapped or misplaced norm changes the logits.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    hf_model = LlamaForCausalLM(hf_config_from_model(model))
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.05 * torch.randn_like(parameter))
    hf_model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return Path(out_dir)


def megatron_shards(model: ModelConfig, hf_dir: Path, out_dir: Path, tp: int, pp: int) -> Path:
    """``hf_dir`` converted to megatron shards at TP/PP, the vocabulary padded as ``model``
    pads it; the shard root."""
    from megatron_tpo.model.conversion import hf_to_mcore

    return hf_to_mcore(hf_dir, out_dir, tp, pp,
                       make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
                       progress=False).destination


def write_checkpoint_config(directory: Path, model_name: str) -> Path:
    """A directory with the config.json of ``configs/model/<model_name>.yaml`` and a
    tokenizer with Llama-3's chat template: what the dry run reads (no weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    from tiny_hf import tiny_tokenizer

    model = load_model_config(model_name)
    (directory / "config.json").write_text(json.dumps(hf_config_from_model(model).to_dict()))
    tiny_tokenizer().save_pretrained(directory)
    return directory
