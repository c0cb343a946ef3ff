"""The CPU adapter redirects megatron's CUDA calls, and only megatron's, to the CPU."""

import pytest
import torch

from megatron_tpo.parallel import cpu_adapter

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the adapter is CPU-only")


def test_megatron_factories_land_on_cpu_and_torch_itself_is_untouched():
    assert cpu_adapter.install_cpu_adapter()
    from megatron.core import utils as megatron_utils
    from megatron.core.transformer import utils as transformer_utils

    mask = transformer_utils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))
    assert megatron_utils.torch.cuda.current_device() == "cpu"
    assert megatron_utils.torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.cuda.is_available() is False and megatron_utils.torch.Tensor is torch.Tensor
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")  # the real torch still refuses CUDA


def test_cpu_grad_clipping_scales_like_megatron():
    cpu_adapter.install_cpu_adapter()
    from megatron.core.optimizer import clip_grads

    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0])
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=5.0)
    scale = 1.0 / (5.0 + 1e-6)
    torch.testing.assert_close(params[0].grad, torch.tensor([3.0 * scale, 0.0, 0.0]))
    torch.testing.assert_close(params[1].grad, torch.tensor([0.0, 4.0 * scale, 0.0]))


def test_other_megatron_versions_are_refused(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.19.2")
    with pytest.raises(RuntimeError, match="0.19.2"):
        cpu_adapter._check_megatron_version()
