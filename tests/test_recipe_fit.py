"""Every shipped recipe fits its GPUs in every phase before it runs; misfits are refused.

`tpo-run --dry-run`, as slurm/common.sh runs it on the batch host, for each experiment
on the world its sbatch script gives the trainer (nodes x tasks, less the judge's and
the engines' pools), with stand-in checkpoints that have only the config.json the dry
run reads (the shapes of the real models).
"""

import json
import re
import sys
from pathlib import Path

import pytest

from megatron_tpo.cli.run import compose_config, main
from megatron_tpo.config.loading import load_model_config
from megatron_tpo.model.hf_config import hf_config_from_model

REPOSITORY = Path(__file__).resolve().parents[1]


def write_checkpoint_config(directory: Path, model_name: str) -> Path:
    """A directory with the config.json of ``configs/model/<model_name>.yaml`` (no weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    model = load_model_config(model_name)
    (directory / "config.json").write_text(json.dumps(hf_config_from_model(model).to_dict()))
    return directory


def trainer_tasks(script: str) -> int:
    """What a slurm/ script gives tpo-run: nodes x tasks per node, less the tasks of the
    judge's and the policy engines' pools it starts (their defaults in the script)."""
    text = (REPOSITORY / "slurm" / script).read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    per_node = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", text).group(1))
    pools = sum(int(tasks) for tasks in re.findall(r'(?:JUDGE|ENGINE)_TASKS:-(\d+)', text))
    return nodes * per_node - pools


@pytest.fixture()
def recipe_files(tmp_path):
    """Overrides pointing every path of the GPU recipes at stand-ins in tmp_path."""
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Say hi."}\n')
    return [f"prompts.path={tmp_path / 'prompts.jsonl'}",
            f"evaluation.path={tmp_path / 'prompts.jsonl'}"], tmp_path


def dry_run(monkeypatch, capsys, world_size: int, overrides):
    """tpo-run --dry-run as rank 0 of a Slurm step of ``world_size`` tasks: (exit, out, err)."""
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", str(world_size))
    monkeypatch.setenv("SLURM_NODELIST", "gpu-node-1")
    code = main(["--dry-run", *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def llama3_8b(files, tmp):
    policy = write_checkpoint_config(tmp / "llama3_8b", "llama3_8b")
    reward = write_checkpoint_config(tmp / "armorm", "llama3_8b")  # ArmoRM: a Llama-3-8B
    return ["experiment=llama3_8b", f"run.policy={policy}",
            f"judge.reward_model.path={reward}", *files]


def llama3_70b(files, tmp):
    policy = write_checkpoint_config(tmp / "llama3_70b", "llama3_70b")
    judge = write_checkpoint_config(tmp / "judge_70b", "llama3_70b")
    return ["experiment=llama3_70b", f"run.policy={policy}", f"judge.pairwise.model={judge}",
            *files]


PHASES = ("engine start-up", "construction", "rollout", "judging", "reference and DPO",
          "weight sync")


@pytest.mark.parametrize("script, recipe, extra, phases", [
    ("tpo_8b.sh", llama3_8b, [], PHASES),
    ("tpo_70b.sh", llama3_70b, [], PHASES),
    ("tpo_70b_separate.sh", llama3_70b, ["rollout=paper_separate"],
     ("rollout", "weight sync", "judging", "construction", "reference and DPO")),
])
def test_each_gpu_recipe_fits_the_allocation_its_script_asks_for(
        monkeypatch, capsys, recipe_files, script, recipe, extra, phases):
    files, tmp = recipe_files
    world = trainer_tasks(script)
    code, out, err = dry_run(monkeypatch, capsys, world, [*recipe(files, tmp), *extra])
    assert code == 0, err
    fits = [line for line in out.splitlines() if line.startswith("  fits: ")]
    assert {line.split(": ")[1].split(" on ")[0] for line in fits} == set(phases), out
    for line in fits:   # "... X of Y GiB (...)": X <= Y on every line
        used, capacity = map(float, re.search(r": ([\d.]+) of ([\d.]+) GiB", line).groups())
        assert used <= capacity, line


def test_the_cpu_recipes_say_their_memory_is_not_checked(monkeypatch, capsys, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from tpo_fixtures import tiny_run_overrides

    code, out, err = dry_run(monkeypatch, capsys, 1, tiny_run_overrides(tmp_path))
    assert code == 0, err
    assert "memory per phase: not checked (run.hardware=cpu)" in out


@pytest.mark.parametrize("world, change, phase, numbers, fix", [
    # The 70B recipe as it shipped: 4 nodes, DP=1 (the optimizer unsharded beside the
    # awake engine), and before that an engine of TP=1 holding 131 GiB of weights.
    (32, [], "rollout", "80.9 of 79.6 GiB",
     "rollout.vllm.gpu_memory_utilization=0.48"),
    (64, ["rollout.vllm.tensor_parallel_size=1"], "engine start-up",
     "need 134.4 GiB, more than rollout.vllm.gpu_memory_utilization=0.5 x 79.6 GiB",
     "rollout.vllm.tensor_parallel_size=4"),
    # The 70B judge's engine on one GPU.
    (64, ["judge.pairwise.vllm.tensor_parallel_size=1"], "judging",
     "judge pool", "judge.pairwise.vllm.tensor_parallel_size=2"),
])
def test_a_70b_misfit_is_refused_naming_phase_gpu_numbers_and_fix(
        monkeypatch, capsys, recipe_files, world, change, phase, numbers, fix):
    files, tmp = recipe_files
    code, out, err = dry_run(monkeypatch, capsys, world, [*llama3_70b(files, tmp), *change])
    assert code == 2 and out == "", out
    assert f"does not fit: {phase} on h100-80gb GPU" in err, err
    assert numbers in err and f"smallest fix: {fix}" in err, err


def test_the_8b_reward_model_kept_on_the_gpu_all_run_is_refused(monkeypatch, capsys,
                                                                recipe_files):
    """Defect 4: ArmoRM resident for the whole run beside the awake engine and the trainer."""
    files, tmp = recipe_files
    code, _, err = dry_run(monkeypatch, capsys, 8, [*llama3_8b(files, tmp),
                                                    "judge.reward_model.offload_between_phases=false"])
    assert code == 2, err
    assert "does not fit: rollout on h100-80gb GPU of pipeline stage 0" in err, err
    assert "reward model 15.0" in err, err


def test_a_colocated_engine_without_sleep_mode_is_sized_awake_while_the_trainer_runs(
        monkeypatch, capsys, recipe_files):
    """rollout.vllm.sleep_mode=false (vLLM's CPU build has no sleep mode) frees nothing for
    training: the 8B recipe then no longer fits its node."""
    files, tmp = recipe_files
    code, _, err = dry_run(monkeypatch, capsys, 8, [*llama3_8b(files, tmp),
                                                    "rollout.vllm.sleep_mode=false"])
    assert code == 2, err
    assert "does not fit: judging on h100-80gb GPU" in err, err   # the worst phase
    assert "policy engine without sleep mode (its whole claim) 39.8" in err, err


def test_the_phase_peaks_add_up_to_the_planner_items():
    """The trainer's share of the DPO phase is the planner's training memory, the engine's
    share of the rollout its whole claim; the two phases differ by exactly those items."""
    from megatron_tpo.plan.hardware import GIB
    from megatron_tpo.plan.phase_fit import ENGINE_ASLEEP_GIB, phase_peaks, trainer_memory
    from megatron_tpo.plan.hardware import find_gpu

    config = compose_config(["experiment=llama3_8b"])
    peaks = {peak.phase: peak for peak in phase_peaks(config, 8)}
    memory = trainer_memory(config, 8, find_gpu("h100-80gb"))
    assert peaks["reference and DPO"].total == pytest.approx(memory.total + ENGINE_ASLEEP_GIB * GIB)
    claim = config.rollout.vllm.gpu_memory_utilization * find_gpu("h100-80gb").memory_bytes
    resident = memory.weights + memory.gradients + memory.optimizer + memory.runtime_reserve
    assert peaks["rollout"].total == pytest.approx(resident + claim)
