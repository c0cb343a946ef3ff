"""Every random generator a rank draws from, as a JSON-able dict and back.

JSON rather than a pickle: RNG files are read on resume from a shared file system, and
nothing in them can run code. Byte states (torch, CUDA, megatron's tracker) are base64.
"""

import base64
import random
from typing import Any, Dict

import numpy as np
import torch


def _encoded(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _decoded(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch CPU, CUDA (when present) and megatron's tensor-parallel tracker."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": [version, list(python_state), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": _encoded(torch.get_rng_state()),
        "cuda": _encoded(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "tracker": {key: _encoded(value)
                    for key, value in get_cuda_rng_tracker().get_states().items()},
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Set every generator ``capture_rng_state`` recorded (CUDA only where both have it)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss,
                         cached_gaussian))
    torch.set_rng_state(_decoded(state["torch"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decoded(state["cuda"]))
    get_cuda_rng_tracker().set_states({key: _decoded(value)
                                       for key, value in state["tracker"].items()})
