"""parallel/te_probe.py: whether Transformer Engine can be used, probed once. A broken
install (built against another torch or CUDA) raises what megatron-core's ``except
ImportError`` probes let through, so the probe blocks it for the process, submodules
its failed import left behind included, and says why once; a TE that is absent, or
whose import raises ImportError, is only reported (megatron-core's probes handle it)."""

import sys

import pytest

from megatron_tpo.parallel import te_probe
from megatron_tpo.parallel.te_probe import BLOCKED, transformer_engine_status

BUILT_ELSEWHERE = ('from . import pytorch\n'
                   'raise AssertionError("Transformer Engine 2.8 was built against torch 2.9")\n')


def test_a_broken_install_is_blocked_for_the_process_and_said_once(fake_transformer_engine,
                                                                   caplog):
    fake_transformer_engine(BUILT_ELSEWHERE, pytorch="LAYERS = ()\n")
    with caplog.at_level("WARNING", logger=te_probe.__name__):
        first = transformer_engine_status()
        assert transformer_engine_status() == first
    assert first == (False, "Transformer Engine is installed but does not import "
                            "(AssertionError: Transformer Engine 2.8 was built against torch 2.9)")
    assert [record.getMessage() for record in caplog.records] == [
        f"{first[1]}; megatron-core's local layers are used instead"]
    # The half-imported submodule is gone, and every later import is an ImportError.
    assert "transformer_engine.pytorch" not in sys.modules
    assert all(sys.modules[name] is None for name in BLOCKED)
    with pytest.raises(ImportError):
        import transformer_engine  # noqa: F401
    with pytest.raises(ImportError):
        import transformer_engine_torch  # noqa: F401


def test_an_import_error_is_reported_but_not_blocked(fake_transformer_engine, caplog):
    fake_transformer_engine('raise ImportError("libcudart.so.12: cannot open shared object")\n')
    with caplog.at_level("WARNING", logger=te_probe.__name__):
        assert transformer_engine_status() == (
            False, "Transformer Engine does not import: libcudart.so.12: cannot open shared "
                   "object")
    assert caplog.records == []
    assert "transformer_engine" not in sys.modules   # not set to None: left to megatron-core


def test_a_te_blocked_earlier_counts_as_not_installed(fake_transformer_engine, monkeypatch):
    fake_transformer_engine('__version__ = "2.8"\n')   # on the path, but blocked first
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    assert transformer_engine_status() == (False, "Transformer Engine is not installed")
