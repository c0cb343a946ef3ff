"""Whether Transformer Engine can be used in this process, probed once, before megatron-core.

megatron-core probes TE with ``try: import transformer_engine ... except ImportError``
in many modules (``parallel_state`` among them), but a broken install (TE built against
another torch or CUDA, a missing shared library) raises ``AssertionError``, ``OSError``
or ``RuntimeError``, which passes those probes and ends every import of megatron-core.
So the first probe that sees such a failure blocks TE for the process: later imports of
it raise ``ImportError``, and megatron-core falls back to its local layers everywhere.
Call ``transformer_engine_status()`` before megatron-core is first imported
(``init_megatron`` and the model builders do).
"""

import functools
import importlib.util
import logging
import sys
from typing import Tuple

logger = logging.getLogger(__name__)

# TE's Python package and its compiled extension, which megatron-core imports directly.
BLOCKED = ("transformer_engine", "transformer_engine_torch")


def _block_transformer_engine() -> None:
    for name in list(sys.modules):
        if any(name == root or name.startswith(root + ".") for root in BLOCKED):
            del sys.modules[name]
    for root in BLOCKED:
        sys.modules[root] = None   # ``import`` now raises ImportError (Python's own rule)


@functools.lru_cache(maxsize=1)
def transformer_engine_status() -> Tuple[bool, str]:
    """``(usable, why)``: TE and megatron-core's TE layers import; the reason is logged
    once where an installed TE does not import."""
    if sys.modules.get("transformer_engine", ...) is None or (
            "transformer_engine" not in sys.modules
            and importlib.util.find_spec("transformer_engine") is None):
        return False, "Transformer Engine is not installed"
    try:
        import transformer_engine
        from megatron.core.extensions import transformer_engine as _  # noqa: F401
    except ImportError as error:
        return False, f"Transformer Engine does not import: {error}"
    except Exception as error:  # noqa: BLE001 - any failure of a broken install
        reason = (f"Transformer Engine is installed but does not import "
                  f"({type(error).__name__}: {error})")
        _block_transformer_engine()
        logger.warning("%s; megatron-core's local layers are used instead", reason)
        return False, reason
    version = getattr(transformer_engine, "__version__", "of unknown version")
    return True, f"Transformer Engine {version} imports"
