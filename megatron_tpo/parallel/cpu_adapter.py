"""Let megatron-core run its TP/PP/DP code on CPU (gloo) when CUDA is absent.

megatron-core has no CPU path: a handful of its modules hard-code ``device="cuda"``,
``torch.cuda.current_device()``, ``torch.cuda.synchronize()`` and the CUDA RNG state.
Everything else (the layers, the schedules, the collectives) is device-agnostic, so
we swap the ``torch`` global of exactly those modules for a proxy whose factory
functions land on the CPU and whose ``torch.cuda`` is a CPU stand-in. Nothing outside
megatron sees a change, and the proxy is installed only on machines without CUDA.

The module list was written against megatron-core 0.16; another version must be
re-checked (``tests/parallel/test_parallel_cpu_adapter.py`` is the smoke test) before it is allowed.
"""

import importlib
import types

import torch

SUPPORTED_MEGATRON_CORE = ("0.16.",)

# Modules of megatron.core that call CUDA directly on the paths we use.
CUDA_BOUND_MODULES = (
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

_FACTORY_FUNCTIONS = frozenset(
    {"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
     "zeros_like", "ones_like", "empty_like", "full_like"}
)


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _placed_on_cpu(factory):
    def factory_on_cpu(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        # Pinned memory needs a CUDA driver; on CPU it buys nothing.
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return factory_on_cpu


class _NullStream:
    """Streams serialise on CPU; waiting on one is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cuda_on_cpu() -> types.SimpleNamespace:
    """What megatron asks of ``torch.cuda``, answered by the CPU."""

    def noop(*args, **kwargs):
        return None

    return types.SimpleNamespace(
        is_available=lambda: False,
        current_device=lambda: "cpu",
        device_count=lambda: 1,
        set_device=noop,
        synchronize=noop,
        empty_cache=noop,
        get_rng_state=torch.get_rng_state,
        set_rng_state=torch.set_rng_state,
        manual_seed=torch.manual_seed,
        Stream=_NullStream,
        stream=lambda stream: _NullStream(),
        default_stream=lambda *args, **kwargs: _NullStream(),
        current_stream=lambda *args, **kwargs: _NullStream(),
        Event=_NullStream,
        nvtx=types.SimpleNamespace(range_push=noop, range_pop=noop),
        CUDAGraph=torch.cuda.CUDAGraph,
        amp=torch.cuda.amp,
    )


class _TorchOnCpu(types.ModuleType):
    """``torch`` as the CUDA-bound megatron modules see it after the adapter."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _cuda_on_cpu()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORY_FUNCTIONS:
            attr = _placed_on_cpu(attr)
        setattr(self, name, attr)  # cache: later lookups are plain attribute reads
        return attr


def _clip_grad_by_total_norm_on_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 minus its assert that grads are CUDA tensors."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attribute = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attribute).detach() for p in parameters
             if getattr(p, attribute, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _check_megatron_version() -> None:
    from megatron.core import package_info

    if not package_info.__version__.startswith(SUPPORTED_MEGATRON_CORE):
        raise RuntimeError(
            f"the CPU adapter was written for megatron-core {SUPPORTED_MEGATRON_CORE}, "
            f"found {package_info.__version__}; re-check megatron_tpo/parallel/cpu_adapter.py"
        )


class _TensorCudaIsCpu(torch.overrides.TorchFunctionMode):
    """``tensor.cuda()`` returns the tensor itself: a method, so the torch proxy above
    cannot catch it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **(kwargs or {}))


def _tied_embedding_setup_on_cpu(setup):
    """megatron's ``setup_embeddings_and_output_layer`` moves the tied embedding copy to
    CUDA (``weight.data.cuda()``) before all-reducing it over the embedding group."""

    def setup_on_cpu(self):
        with _TensorCudaIsCpu():
            return setup(self)

    return setup_on_cpu


_installed = False


def install_cpu_adapter() -> bool:
    """Redirect megatron-core's CUDA calls to the CPU. Returns whether it was installed.

    A no-op where CUDA is available: the GPU path runs megatron unmodified.
    """
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    _check_megatron_version()
    torch_on_cpu = _TorchOnCpu()
    for module_name in CUDA_BOUND_MODULES:
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is torch:
            module.torch = torch_on_cpu

    # megatron reads and writes the CUDA RNG state around every TP-parallel init and
    # dropout region; on CPU the one generator is the CPU one.
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    # Grad clipping asserts `grad.type() == 'torch.cuda.FloatTensor'`; optimizer.py
    # imported the function by name, so both references are replaced.
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_on_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_on_cpu

    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _tied_embedding_setup_on_cpu(
        LanguageModule.setup_embeddings_and_output_layer)
    _installed = True
    return True
