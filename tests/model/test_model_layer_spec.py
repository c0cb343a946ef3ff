"""Which layers a model is built from, and why: Transformer Engine's where it imports
(a broken install falls back instead of crashing every model build), megatron's fused
softmax only where its CUDA kernels import (the megatron-core wheel does not ship them)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tpo.config import ModelConfig, ParallelConfig

REPOSITORY = Path(__file__).resolve().parents[2]
BROKEN = 'raise AssertionError("Transformer Engine 2.8 was built against torch 2.9")\n'


@pytest.fixture
def broken_transformer_engine(fake_transformer_engine):
    """A ``transformer_engine`` on sys.path whose import fails as a mismatched build does;
    the probe's cache and the modules it blocks are restored afterwards."""
    return fake_transformer_engine(BROKEN)


def test_a_broken_transformer_engine_means_the_local_spec_and_says_why(
        broken_transformer_engine, caplog):
    from megatron_tpo.model.llama import layer_spec_choice, transformer_engine_available

    with caplog.at_level("WARNING"):
        assert transformer_engine_available() is False
        name, reason = layer_spec_choice()
        layer_spec_choice()
    assert name == "local"
    assert "AssertionError: Transformer Engine 2.8 was built against torch 2.9" in reason
    assert len([r for r in caplog.records if "Transformer Engine" in r.getMessage()]) == 1
    with pytest.raises(ImportError):    # blocked: megatron-core's own probes fall back too
        import transformer_engine  # noqa: F401


def test_no_transformer_engine_is_the_local_spec_too(monkeypatch):
    from megatron_tpo.model.llama import layer_spec_choice
    from megatron_tpo.parallel import te_probe

    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    te_probe.transformer_engine_status.cache_clear()
    try:
        name, reason = layer_spec_choice()
    finally:
        te_probe.transformer_engine_status.cache_clear()
    assert name == "local" and "not installed" in reason


@pytest.mark.slow
def test_a_rank_starts_and_builds_models_beside_a_broken_transformer_engine(
        broken_transformer_engine):
    """In a fresh process (megatron-core not yet imported, as in a rank), where
    megatron-core's own `except ImportError` probes would let the AssertionError through."""
    script = (
        "from megatron_tpo.config import ModelConfig, ParallelConfig\n"
        "from megatron_tpo.parallel import init_megatron, shutdown_megatron\n"
        "init_megatron(ParallelConfig())\n"
        "from megatron_tpo.model.llama import layer_spec_choice, llama_layer_spec, "
        "llama_transformer_config\n"
        "model = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, "
        "num_attention_heads=4, num_query_groups=2, vocab_size=64)\n"
        "llama_transformer_config(model, ParallelConfig())\n"
        "spec = llama_layer_spec()\n"
        "print(layer_spec_choice()[0], type(spec).__name__)\n"
        "shutdown_megatron()\n")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=REPOSITORY,
                          env={"PYTHONPATH": f"{broken_transformer_engine}:{REPOSITORY}",
                               "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["local", "ModuleSpec"]


def _tiny():
    return ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                       num_query_groups=2, vocab_size=64)


@pytest.mark.parametrize("kernels, fused", [(False, False), (True, True)])
def test_masked_softmax_fusion_on_gpu_only_where_its_kernels_import(monkeypatch, kernels, fused):
    from megatron_tpo.model import llama

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(llama, "fused_softmax_kernels_available", lambda: kernels)
    config = llama.llama_transformer_config(_tiny(), ParallelConfig())
    assert config.masked_softmax_fusion is fused


def test_the_megatron_core_wheel_has_no_fused_softmax_kernels():
    """What the fusion would have met on any GPU: the probe says no, and megatron's fused
    softmax with the fusion on fails at its first bf16 forward (on CPU as on a GPU)."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_tpo.model.llama import fused_softmax_kernels_available

    assert fused_softmax_kernels_available() is False
    scores = torch.zeros(1, 4, 32, 32, dtype=torch.bfloat16)
    # A padding mask that masks the last 16 keys (megatron's causal mask is made on cuda).
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., 16:] = True

    def softmax(fusion):
        return FusedScaleMaskSoftmax(input_in_fp16=False, input_in_bf16=True,
                                     attn_mask_type=AttnMaskType.padding,
                                     scaled_masked_softmax_fusion=fusion,
                                     mask_func=lambda x, m: x.masked_fill(m, -10000.0),
                                     softmax_in_fp32=True, scale=None)

    with pytest.raises(ImportError, match="scaled_masked_softmax_cuda"):
        softmax(True)(scores, mask)
    probabilities = softmax(False)(scores, mask).float()
    assert torch.equal(probabilities[0, 0, 0, :16], torch.full((16,), 1 / 16))
    assert torch.equal(probabilities[0, 0, 0, 16:], torch.zeros(16))
