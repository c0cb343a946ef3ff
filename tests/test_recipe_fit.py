"""Every shipped recipe fits its GPUs in every phase before it runs; misfits are refused.

`tpo-run --dry-run`, as slurm/common.sh runs it on the batch host, for each experiment
on the world its sbatch script gives the trainer (nodes x tasks, less the judge's and
the engines' pools), with stand-in checkpoints that have only the config.json the dry
run reads (the shapes of the real models).
"""

import json
import re
from pathlib import Path

import pytest

from megatron_tpo.cli.run import compose_config, main
from megatron_tpo.placement.policy import PHASES
from llama_fixtures import write_checkpoint_config

REPOSITORY = Path(__file__).resolve().parents[1]


def trainer_tasks(script: str) -> int:
    """What a slurm/ script gives tpo-run: nodes x tasks per node, less the tasks of the
    judge's and the policy engines' pools it starts (their defaults in the script)."""
    text = (REPOSITORY / "slurm" / script).read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    per_node = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", text).group(1))
    pools = sum(int(tasks) for tasks in re.findall(r'(?:JUDGE|ENGINE)_TASKS:-(\d+)', text))
    return nodes * per_node - pools


def write_prompts(path: Path, field: str, count: int) -> Path:
    path.write_text("".join(json.dumps({field: f"Say hi {n} times."}) + "\n"
                            for n in range(count)))
    return path


@pytest.fixture(scope="module")
def recipe_prompts(tmp_path_factory):
    """UltraFeedback-shaped prompts for every iteration of the GPU recipes (4 x 5,000) and
    AlpacaEval-shaped held-out instructions, as the recipes read them."""
    folder = tmp_path_factory.mktemp("prompts")
    return (write_prompts(folder / "prompts.jsonl", "prompt", 20000),
            write_prompts(folder / "heldout.jsonl", "instruction", 256))


@pytest.fixture()
def recipe_files(tmp_path, recipe_prompts):
    """Overrides pointing every path of the GPU recipes at stand-ins in tmp_path."""
    prompts, heldout = recipe_prompts
    return [f"prompts.path={prompts}", f"evaluation.path={heldout}",
            f"run.dir={tmp_path / 'run'}"], tmp_path


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


def fit_lines(out: str) -> dict:
    """``{(phase, gpu): (used, capacity)}`` from the dry run's ``fits:`` lines."""
    found = {}
    for line in out.splitlines():
        matched = re.match(r"  fits: (.+?) on (.+?): ([\d.]+) of ([\d.]+) GiB", line)
        if matched:
            found[matched.group(1), matched.group(2)] = (float(matched.group(3)),
                                                        float(matched.group(4)))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("script, recipe, extra", [
    ("tpo_8b.sh", llama3_8b, []),
    ("tpo_70b.sh", llama3_70b, []),
    ("tpo_70b_separate.sh", llama3_70b, ["experiment=llama3_70b_separate"]),
])
def test_each_gpu_recipe_fits_the_allocation_its_script_asks_for_in_every_phase_of_the_loop(
        monkeypatch, capsys, recipe_files, script, recipe, extra):
    files, tmp = recipe_files
    world = trainer_tasks(script)
    code, out, err = dry_run(monkeypatch, capsys, world, [*recipe(files, tmp), *extra])
    assert code == 0, err
    fits = fit_lines(out)
    # Every phase the loop enters, on the trainer's first pipeline stage: the dry run ran it.
    stage_zero = {phase for phase, gpu in fits if gpu.endswith("pipeline stage 0")}
    assert stage_zero == set(PHASES), out
    for (phase, gpu), (used, capacity) in fits.items():
        assert used <= capacity, (phase, gpu)
    assert f"sized for world size {world} (the slurm launcher)" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra, world", [
    (llama3_8b, [], 8), (llama3_70b, [], 64),
    (llama3_70b, ["experiment=llama3_70b_separate"], 32)])
def test_on_a_login_node_the_dry_run_sizes_the_world_the_recipe_is_written_for(
        capsys, recipe_files, recipe, extra, world):
    """No launcher variables: the recipe's run.world_size (what its sbatch script starts)."""
    files, tmp = recipe_files
    code = main(["--dry-run", *recipe(files, tmp), *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"sized for world size {world} (the recipe's run.world_size)" in out, out
    code = main(["--dry-run", *recipe(files, tmp), *extra, "--nodes", "4"])
    out, err = capsys.readouterr()   # a refusal says what it sized too
    assert "sized for world size 32 (--nodes x --gpus-per-node (8))" in out + err, out + err


def test_the_cpu_recipes_say_their_memory_is_not_checked(monkeypatch, capsys, tmp_path):
    from tpo_fixtures import tiny_run_overrides

    code, out, err = dry_run(monkeypatch, capsys, 1, tiny_run_overrides(tmp_path))
    assert code == 0, err
    assert "memory per phase: not checked (run.hardware=cpu)" in out


@pytest.mark.slow
@pytest.mark.parametrize("world, change, phase, numbers, fix", [
    # The 70B recipe as it shipped: 4 nodes, DP=1 (the optimizer unsharded beside the
    # awake engine), and before that an engine of TP=1 holding 131 GiB of weights.
    (32, [], "parity check", "82.1 of 79.6 GiB",
     "rollout.vllm.gpu_memory_utilization=0.46"),
    (64, ["rollout.vllm.tensor_parallel_size=1"], "engine start-up",
     "need 134.4 GiB, more than rollout.vllm.gpu_memory_utilization=0.5 x 79.6 GiB",
     "rollout.vllm.tensor_parallel_size=4"),
    # The 70B judge's engine on one GPU.
    (64, ["judge.pairwise.vllm.tensor_parallel_size=1"], "engine start-up",
     "judge pool", "judge.pairwise.vllm.tensor_parallel_size=2"),
])
def test_a_70b_misfit_is_refused_naming_phase_gpu_numbers_and_a_fix_that_fits(
        monkeypatch, capsys, recipe_files, world, change, phase, numbers, fix):
    files, tmp = recipe_files
    code, out, err = dry_run(monkeypatch, capsys, world, [*llama3_70b(files, tmp), *change])
    assert code == 2 and out == "", out
    assert f"does not fit: {phase} on h100-80gb GPU" in err, err
    assert numbers in err and f"smallest fix: {fix}" in err, err
    # The fix is no guess: with it, the same allocation fits.
    key, value = fix.split("=")
    code, out, err = dry_run(monkeypatch, capsys, world,
                             [*llama3_70b(files, tmp), *change, f"{key}={value}"])
    assert code == 0, err


def judging_lines(trace: Path) -> list:
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    return [line for line in lines if line["phase"] in ("judging", "held-out judging")]


def test_the_8b_recipe_judges_with_the_reward_model_awake_and_the_policy_engine_asleep(
        monkeypatch, capsys, recipe_files):
    """The 8B run's first held-out judging put ArmoRM on the GPU beside the awake engine
    (84 GiB of 80 at t=0). The dry run runs the loop's own phases: the engine sleeps."""
    files, tmp = recipe_files
    trace = tmp / "ledger.jsonl"
    code, out, err = dry_run(monkeypatch, capsys, 8, [*llama3_8b(files, tmp),
                                                      "--trace", str(trace)])
    assert code == 0, err
    judged = judging_lines(trace)
    assert [line["phase"] for line in judged] == ["held-out judging", "judging",
                                                  "held-out judging"]
    for line in judged:
        held = line["gpus"]["h100-80gb GPU of pipeline stage 0"]
        assert held["tenants"]["reward model"]["state"] == "awake"
        assert held["tenants"]["policy engine"]["state"].startswith("asleep")
        assert held["total_bytes"] <= held["capacity_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("change, phase, fix", [
    # Level 0 pauses scheduling and frees nothing: the engine is awake in effect.
    (["rollout.vllm.sleep_level=0"], "held-out judging", "rollout.vllm.sleep_level=1"),
    # vLLM's CPU build has no sleep mode: nothing is released for the judge or the trainer.
    (["rollout.vllm.sleep_mode=false"], "held-out judging", "rollout.vllm.sleep_mode=true"),
    # ArmoRM resident all run, beside the awake engine and the trainer.
    (["judge.reward_model.offload_between_phases=false"], "parity check",
     "judge.reward_model.offload_between_phases=true"),
])
def test_the_8b_recipe_with_its_engine_awake_in_judging_or_its_judge_resident_is_refused(
        monkeypatch, capsys, recipe_files, change, phase, fix):
    files, tmp = recipe_files
    code, _, err = dry_run(monkeypatch, capsys, 8, [*llama3_8b(files, tmp), *change])
    assert code == 2, err
    assert f"does not fit: {phase} on h100-80gb GPU of pipeline stage 0" in err, err
    assert f"smallest fix: {fix}" in err, err


@pytest.mark.slow
def test_a_reward_model_too_large_for_the_card_is_refused_in_judging(monkeypatch, capsys,
                                                                       recipe_files):
    files, tmp = recipe_files
    huge = write_checkpoint_config(tmp / "reward_70b", "llama3_70b")
    code, _, err = dry_run(monkeypatch, capsys, 8, [*llama3_8b(files, tmp),
                                                    f"judge.reward_model.path={huge}"])
    assert code == 2, err
    assert "does not fit: held-out judging on h100-80gb GPU" in err, err
    assert "reward model (awake) 1" in err, err


def test_a_judge_whose_size_cannot_be_known_is_refused_not_skipped(monkeypatch, capsys,
                                                                    recipe_files, tmp_path):
    """The 8B recipe's default ArmoRM is a hub id: without a local copy (or a warm cache)
    every rank would download it at start-up, and nothing could size it before."""
    files, tmp = recipe_files
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = [o for o in llama3_8b(files, tmp) if not o.startswith("judge.reward_model.path")]
    code, _, err = dry_run(monkeypatch, capsys, 8, overrides)
    assert code == 2, err
    assert "judge.reward_model.path=RLHFlow/ArmoRM-Llama3-8B-v0.1: no config.json there" in err
    assert "hf download" in err, err


@pytest.mark.slow
def test_the_phase_peaks_add_up_to_the_planner_items(recipe_files):
    """The trainer's share of the DPO phase is the planner's training memory, the engine's
    share of the rollout its whole claim; the two phases differ by exactly those items."""
    from megatron_tpo.dry_run import dry_run as run_dry
    from megatron_tpo.plan.cost.tenants import ENGINE_ASLEEP_GIB, nccl_communicators, stage_memories
    from megatron_tpo.plan.hardware import GIB, find_gpu
    from megatron_tpo.plan.workload import Assumptions

    files, tmp = recipe_files
    config = compose_config(llama3_8b(files, tmp))
    lines = {(line.phase, gpu.gpu): gpu for line in run_dry(config, 8).ledger.lines
             for gpu in line.gpus}
    memory = stage_memories(config, 8)[0]
    # TP2 x DP4 in one world: three communicators (world, TP, DP); the TP1 engine none.
    assert nccl_communicators(config, 8) == 3
    nccl = 3 * Assumptions().nccl_communicator_gib * GIB
    gpu = "h100-80gb GPU of pipeline stage 0"
    assert lines["train", gpu].total == pytest.approx(memory.total + nccl
                                                      + ENGINE_ASLEEP_GIB * GIB)
    claim = config.rollout.vllm.gpu_memory_utilization * find_gpu("h100-80gb").memory_bytes
    resident = memory.weights + memory.gradients + memory.optimizer + memory.runtime_reserve
    assert lines["rollout", gpu].total == pytest.approx(resident + nccl + claim)


@pytest.mark.slow
def test_tpo_plan_judges_a_layout_of_a_recipe_as_its_dry_run_does(monkeypatch, capsys,
                                                                   recipe_files):
    """One memory model, one verdict: the layout that fits the trainer alone on 4 nodes is
    refused by tpo-plan --experiment with the dry run's own phase, numbers and fix."""
    from megatron_tpo.cli import plan

    files, tmp = recipe_files
    recipe = llama3_70b(files, tmp)
    layout = ["--layout", "tp=8,pp=4,mbs=2", "--recompute", "full"]
    assert plan.main(["--experiment", "llama3_70b", "--nodes", "4", *layout,
                      *recipe[1:]]) == 0
    out = capsys.readouterr().out
    assert "Verdict: the trainer runs and fits" in out, out
    whole = out[out.index("Whole run"):]
    code, _, err = dry_run(monkeypatch, capsys, 32, recipe)
    assert code == 2
    refusal = err[err.index("does not fit"):err.index("\ntpo-run: sized")]
    assert refusal in whole, (refusal, whole)
    # Without --experiment tpo-plan says what it left out.
    assert plan.main(["--model", "llama3_70b", "--nodes", "4", "--seq-len", "3072",
                      "--global-batch", "64", *layout]) == 0
    assert "Counted: the trainer only." in capsys.readouterr().out


@pytest.mark.slow
def test_the_plan_tpo_plan_emits_for_a_recipe_is_accepted_by_its_dry_run(monkeypatch, capsys,
                                                                         recipe_files):
    from megatron_tpo.cli import plan

    files, tmp = recipe_files
    recipe = llama3_70b(files, tmp)
    emitted = tmp / "plans"
    assert plan.main(["--experiment", "llama3_70b", "--nodes", "8", "--emit", str(emitted),
                      *recipe[1:]]) == 0
    out = capsys.readouterr().out
    assert "fits in every phase" in out and "tpo_run_overrides.txt" in out, out
    overrides = (emitted / "tpo_run_overrides.txt").read_text().split()
    code, out, err = dry_run(monkeypatch, capsys, 64, [*recipe, *overrides])
    assert code == 0, err
