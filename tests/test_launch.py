"""Distributed start-up reads torchrun's and Slurm's environments."""

import pytest

from megatron_tpo.config import ConfigError
from megatron_tpo.parallel import detect_distributed_env, expand_slurm_nodelist


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
