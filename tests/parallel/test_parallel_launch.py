"""Distributed start-up reads torchrun's and Slurm's environments."""

import socket

import pytest

from megatron_tpo.config import ConfigError
from megatron_tpo.parallel import detect_distributed_env, expand_slurm_nodelist, launch


@pytest.mark.parametrize("nodelist,hosts", [
    ("node7", ["node7"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("gpu[08-10,15],login1", ["gpu08", "gpu09", "gpu10", "gpu15", "login1"]),
    ("a[1-2]-ib,b3", ["a1-ib", "a2-ib", "b3"]),
])
def test_slurm_nodelist_expands_like_scontrol(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


def test_torchrun_environment_wins():
    env = detect_distributed_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                                  "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
                                  "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 8, 3, "torchrun")
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 29400)


def test_slurm_environment_picks_first_host_and_a_job_derived_port():
    slurm = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
             "SLURM_JOB_NODELIST": "h100-[017-018]", "SLURM_JOB_ID": "424242",
             "SLURM_TASKS_PER_NODE": "8(x2)"}
    env = detect_distributed_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (13, 16, 5, 8)
    assert env.master_addr == "h100-017" and env.launcher == "slurm"
    assert env.master_port == 20000 + 424242 % 20000
    assert detect_distributed_env(slurm).master_port == env.master_port  # same on every task


def test_slurm_without_nodelist_says_how_to_launch():
    with pytest.raises(ConfigError, match="srun"):
        detect_distributed_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_no_launcher_means_one_local_process():
    env = detect_distributed_env({})
    assert (env.rank, env.world_size, env.launcher, env.master_addr) == (0, 1, "single",
                                                                          "127.0.0.1")


# -- the one start-up path (start_distributed): what vLLM and megatron-core rely on ------

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "CUDA_DEVICE_MAX_CONNECTIONS")


@pytest.fixture
def clean_environment(monkeypatch):
    """os.environ without any launcher's variables, restored after the test, the ones
    start-up exports included (setenv first, so monkeypatch records them as unset)."""
    for name in LAUNCH_VARIABLES + ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                                    "SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_free_local_ports_lie_outside_the_kernels_range_and_never_repeat():
    """A picked port stays free until its world binds it: no socket bound to port 0 in the
    meantime (gloo's listeners, another world's store) can take it, and no second pick."""
    low, high = launch._kernel_ephemeral_range()
    ports = [launch.free_local_port() for _ in range(64)]
    assert len(set(ports)) == len(ports)
    assert [port for port in ports if low <= port <= high] == []
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_passed_over(monkeypatch):
    busy_port, free_port = launch.free_local_port(), launch.free_local_port()
    launch._HANDED_OUT.difference_update({busy_port, free_port})
    picks = iter([busy_port, free_port])

    class Scripted:
        def choice(self, candidates):
            return next(picks)

    monkeypatch.setattr(launch.random, "SystemRandom", Scripted)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", busy_port))
        busy.listen()
        assert launch.free_local_port() == free_port


def test_init_megatron_under_srun_exports_what_vllms_external_launcher_reads(
        clean_environment):
    """vLLM's ExecutorWithExternalLauncher reads os.environ["RANK"] and ["LOCAL_RANK"]
    (and MASTER_ADDR/PORT through env://); srun sets only SLURM_*."""
    import os

    from megatron_tpo.config import ParallelConfig
    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.parallel.launch import free_local_port

    port = free_local_port()
    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                        "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_TASKS_PER_NODE": "1",
                        "MASTER_PORT": str(port)}.items():
        clean_environment.setenv(name, value)
    init_megatron(ParallelConfig())
    try:
        exported = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    finally:
        shutdown_megatron()
    assert exported == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                        "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def _slurm_env(rank=13, local_rank=5, tasks_per_node="8(x2)"):
    return detect_distributed_env({
        "SLURM_PROCID": str(rank), "SLURM_NTASKS": "16", "SLURM_LOCALID": str(local_rank),
        "SLURM_JOB_NODELIST": "h100-[017-018]", "SLURM_JOB_ID": "424242",
        "SLURM_TASKS_PER_NODE": tasks_per_node})


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a node with ``fake_cuda.count`` visible devices; records set_device."""
    import torch

    class FakeCuda:
        count = 8
        chosen = []
        initialised = False

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: FakeCuda.count)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: FakeCuda.initialised)
    monkeypatch.setattr(torch.cuda, "set_device", FakeCuda.chosen.append)
    return FakeCuda


def _recorded_process_group(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda **kwargs: calls.append(kwargs))
    return calls


def test_the_device_is_local_rank_for_megatron_and_vllm_alike(clean_environment, fake_cuda):
    from datetime import timedelta

    from megatron_tpo.parallel.launch import start_distributed

    calls = _recorded_process_group(clean_environment)
    start_distributed(_slurm_env(local_rank=5), timeout_seconds=45)
    assert fake_cuda.chosen == [5]
    (call,) = calls
    assert (call["backend"], call["rank"], call["world_size"]) == ("nccl", 13, 16)
    assert call["init_method"] == f"tcp://h100-017:{20000 + 424242 % 20000}"
    assert call["timeout"] == timedelta(seconds=45)


@pytest.mark.parametrize("devices", [1, 4])
def test_a_site_binding_fewer_gpus_than_tasks_is_told_how_to_launch(
        clean_environment, fake_cuda, devices):
    """megatron used local_rank % device_count (task 5 of 8 with one bound GPU: device 0)
    while vLLM takes cuda:LOCAL_RANK and asserts it exists: refuse, and say why."""
    from megatron_tpo.parallel.launch import start_distributed

    fake_cuda.count = devices
    _recorded_process_group(clean_environment)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=5.*"
                       rf"{devices} visible.*--gpus-per-task.*--gpu-bind"):
        start_distributed(_slurm_env(local_rank=5), timeout_seconds=30)
    assert fake_cuda.chosen == []


def test_the_engine_world_starts_through_the_same_path(clean_environment, fake_cuda):
    """tpo-engine's world: the same exports, the same device rule and error."""
    import os

    from megatron_tpo.cli.engine import start_engine_world

    calls = _recorded_process_group(clean_environment)
    start_engine_world(_slurm_env(local_rank=2), timeout_seconds=20)
    assert fake_cuda.chosen == [2] and len(calls) == 1
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == (
        "13", "2", "16")
    fake_cuda.count = 1
    with pytest.raises(ConfigError, match="--gpus-per-task"):
        start_engine_world(_slurm_env(local_rank=2), timeout_seconds=20)


def test_cuda_device_max_connections_is_one_unless_the_user_set_it(
        clean_environment, fake_cuda):
    import os

    from megatron_tpo.parallel.launch import start_distributed

    _recorded_process_group(clean_environment)
    start_distributed(_slurm_env(local_rank=0), timeout_seconds=30)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    clean_environment.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    clean_environment.setattr("torch.distributed.is_initialized", lambda: False)
    start_distributed(_slurm_env(local_rank=0), timeout_seconds=30)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"


def test_a_timeout_that_is_not_positive_is_refused(clean_environment):
    from megatron_tpo.parallel.launch import start_distributed

    with pytest.raises(ConfigError, match="run.process_group_timeout_seconds=0"):
        start_distributed(_slurm_env(), timeout_seconds=0)


@pytest.mark.parametrize("setting", ["process_group_timeout_seconds",
                                     "rank_zero_timeout_seconds"])
def test_the_timeouts_are_run_settings_in_seconds_refused_unless_positive(tmp_path, setting):
    from megatron_tpo.tpo_config import RunConfig, TPOConfig

    (tmp_path / "config.json").write_text("{}")
    RunConfig(policy=str(tmp_path), **{setting: 2.5}).validate()   # seconds, not minutes
    with pytest.raises(ConfigError, match=f"run.{setting}=0: must be positive"):
        RunConfig(policy=str(tmp_path), **{setting: 0}).validate()
    # How long ranks wait for each other decides no stage output: a requeue may change it.
    longer = TPOConfig()
    setattr(longer.run, setting, 4 * 3600)
    assert longer.digest_fields() == TPOConfig().digest_fields()


def test_tpo_run_ranks_start_with_the_configured_timeout(monkeypatch):
    from types import SimpleNamespace

    import megatron_tpo.parallel as parallel
    from megatron_tpo.cli.run import run_rank
    from megatron_tpo.config import ModelConfig, ParallelConfig

    seen = {}

    def recording_init(parallel_config, model, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop after start-up")

    monkeypatch.setattr(parallel, "init_megatron", recording_init)
    monkeypatch.setattr(parallel, "shutdown_megatron", lambda: None)
    config = SimpleNamespace(parallel=ParallelConfig(), model=ModelConfig(),
                             run=SimpleNamespace(seed=5, process_group_timeout_seconds=90))
    with pytest.raises(RuntimeError, match="stop after start-up"):
        run_rank(0, 1, config)
    assert seen == {"seed": 5, "timeout_seconds": 90}


def test_start_up_leaves_no_launch_variable_behind_for_the_next_test():
    """The fixture above restores what start_distributed exported (a later in-process test
    would otherwise look launched by torchrun, with a stale port)."""
    import os

    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(os.environ)
