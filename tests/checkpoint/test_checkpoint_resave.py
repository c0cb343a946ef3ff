"""Saving a step that already exists: a kill -9 at any point of the swap leaves a loadable
checkpoint, the old one before the new is in place and the new one after.

One process per kill point saves steps 1 and 2, trains a step, and saves step 2 again
with ``MEGATRON_TPO_CRASH_AT`` set, so SIGKILL ends it inside ``_publish``; a last process
loads each killed root and returns the weights.
"""

import os
import pickle
import signal
from pathlib import Path

import pytest
import torch

from dpo_fixtures import my_pairs, random_pairs, start_trainer, trainer_weights
from llama_fixtures import tiny_model_config
from megatron_tpo.checkpoint import CheckpointConfig, TrainingCheckpointer
from megatron_tpo.checkpoint.manifest import read_manifest, verify_files
from megatron_tpo.fault_injection import CRASH_AT_VARIABLE
from megatron_tpo.parallel.local_launch import spawn_local

pytestmark = pytest.mark.slow

# Where the re-save of step 2 is killed, and which copy must be found afterwards.
KILL_POINTS = {"2:checkpoint_set_aside": "old", "2:checkpoint_renamed": "new",
               "2:checkpoint_latest": "new"}


def _resave_killed_worker(rank, world_size, model, root, pairs, crash_at):
    root = Path(root)
    # A process group of its own, named in a file: the checkpoint writer's helper
    # processes outlive this SIGKILLed worker, and the fixture ends them by that group.
    os.setpgid(0, 0)
    (root / "pgid").write_text(str(os.getpgid(0)))
    trainer = start_trainer(model, (1, 1, None), seed=1234)
    mine = my_pairs(pairs, trainer.reference_logprobs(pairs))
    checkpointer = TrainingCheckpointer(root / "run", CheckpointConfig(keep_last=2))
    for step in (1, 2):
        trainer.step(mine)
        checkpointer.save(step, trainer.ddp_chunks, trainer.optimizer, trainer.scheduler, {})
    versions = {"old": trainer_weights(trainer),
                "old_manifest": read_manifest(checkpointer.step_dir(2))}
    trainer.step(mine)
    versions["new"] = trainer_weights(trainer)
    with open(root / "versions.pkl", "wb") as handle:  # this process will not return
        pickle.dump(versions, handle)
    os.environ[CRASH_AT_VARIABLE] = crash_at
    checkpointer.save(2, trainer.ddp_chunks, trainer.optimizer, trainer.scheduler, {})


def _load_worker(rank, world_size, model, runs):
    from megatron.core import parallel_state

    loaded = []
    for run in runs:
        trainer = start_trainer(model, (1, 1, None), seed=99)  # other weights until the load
        state = TrainingCheckpointer(run, CheckpointConfig()).load_latest(
            trainer.ddp_chunks, trainer.optimizer, trainer.scheduler)
        loaded.append((state, trainer_weights(trainer)))
        parallel_state.destroy_model_parallel()
    return loaded


def _end_process_group(pgid_file: Path) -> None:
    """SIGKILL what the killed worker left running (its group's orphaned helpers)."""
    try:
        os.killpg(int(pgid_file.read_text()), signal.SIGKILL)
    except ProcessLookupError:
        pass   # nothing was left


@pytest.fixture(scope="module")
def killed_resaves(tmp_path_factory):
    from torch.multiprocessing import ProcessExitedException

    model = tiny_model_config()
    roots = {}
    for crash_at in KILL_POINTS:
        root = tmp_path_factory.mktemp(crash_at.replace(":", "_"))
        with pytest.raises(ProcessExitedException) as killed:
            spawn_local(_resave_killed_worker, 1, model, root, random_pairs(model.vocab_size),
                        crash_at)
        assert killed.value.signal_name == "SIGKILL"
        _end_process_group(root / "pgid")
        roots[crash_at] = root
    listings = {crash_at: sorted(p.name for p in (root / "run").iterdir())
                for crash_at, root in roots.items()}
    loads = spawn_local(_load_worker, 1, model, [root / "run" for root in roots.values()])[0]
    return {crash_at: {"root": root, "listing_after_kill": listings[crash_at], "loaded": load}
            for (crash_at, root), load in zip(roots.items(), loads)}


def test_the_kill_points_are_inside_the_swap(killed_resaves):
    # Between the renames step 2 exists only as the set-aside copy; after them it is back.
    assert killed_resaves["2:checkpoint_set_aside"]["listing_after_kill"] == [
        ".step_00000002.partial", ".step_00000002.replaced", "latest", "step_00000001"]
    for crash_at in ("2:checkpoint_renamed", "2:checkpoint_latest"):
        assert killed_resaves[crash_at]["listing_after_kill"] == [
            ".step_00000002.replaced", "latest", "step_00000001", "step_00000002"]


@pytest.mark.parametrize("crash_at", sorted(KILL_POINTS))
def test_a_resave_killed_at_any_point_loads_a_complete_step(killed_resaves, crash_at):
    case = killed_resaves[crash_at]
    with open(case["root"] / "versions.pkl", "rb") as handle:
        versions = pickle.load(handle)
    expected = KILL_POINTS[crash_at]
    state, weights = case["loaded"]
    assert state == {"step": 2}
    assert all(torch.equal(a, b) for a, b in zip(weights, versions[expected])), expected
    other = "new" if expected == "old" else "old"
    assert not all(torch.equal(a, b) for a, b in zip(weights, versions[other]))
    run = case["root"] / "run"
    # The load finished the interrupted swap: no set-aside copy, every file verified (a
    # dead .partial directory stays until the next save clears it, as after any kill).
    assert [p.name for p in sorted(run.iterdir()) if not p.name.endswith(".partial")] == [
        "latest", "step_00000001", "step_00000002"]
    manifest = read_manifest(run / "step_00000002")
    verify_files(run / "step_00000002", manifest)
    assert (manifest == versions["old_manifest"]) == (expected == "old")
    assert TrainingCheckpointer(run, CheckpointConfig()).latest_step() == 2
