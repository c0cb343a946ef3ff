"""Training checkpoints reshard, resume exactly, and refuse damaged or foreign files.

Four spawns of gloo processes: four processes change layout three times in one process
group (TP1/PP1/DP4 -> TP2/PP2 -> TP1/PP2/VPP2/DP2 -> TP1/PP1/DP4); two pairs of
processes at TP1/PP2/VPP2 are the uninterrupted and the resumed DPO run; and one
process damages copies of its checkpoints in every way the loader must notice.
"""

import ast
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_fixtures import TRAINING, my_pairs, random_pairs, start_trainer, trainer_weights
from file_damage import flip_byte, truncate
from llama_fixtures import tiny_model_config
from megatron_tpo.checkpoint import CheckpointConfig, CheckpointError, TrainingCheckpointer
from megatron_tpo.config import ConfigError, ParallelConfig
from megatron_tpo.parallel.local_launch import spawn_local

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_tpo"
SEQ_LEN = 12


def _logits(trainer, tokens):
    """Full-vocab logits of ``tokens`` on the last stage (None elsewhere).

    The trainer's output layer hands hidden states through for the fused kernel, so the
    logits are the hidden states times this rank's vocab rows, gathered over TP.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_tpo.train.pipeline_step import position_ids, unwrapped

    chunks, collected = trainer.ddp_chunks, []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, position_ids(batch), None)

        def collect(hidden):
            weight = unwrapped(model).output_layer.weight
            logits = gather_from_tensor_model_parallel_region(hidden @ weight.t())
            collected.append(logits[..., :trainer.model.vocab_size].clone())
            return hidden.new_zeros(()), {}

        return output, collect

    micro_batches = list(tokens.chunk(2))
    iterators = [iter(micro_batches) for _ in chunks]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=2,
            seq_length=SEQ_LEN, micro_batch_size=2, forward_only=True)
    return torch.cat(collected) if collected else None


def _reshard_worker(rank, world_size, model, root, pairs, tokens):
    from megatron.core import parallel_state

    checkpointer = TrainingCheckpointer(root, CheckpointConfig(keep_last=3))
    report = {}
    trainer = start_trainer(model, (1, 1, None), seed=1234)
    reference = trainer.reference_logprobs(pairs)
    mine = my_pairs(pairs, reference)
    trainer.step(mine)
    checkpointer.save(1, trainer.ddp_chunks, trainer.optimizer, trainer.scheduler,
                      {"iteration": 0, "step_in_iteration": 1})
    report["tp1_step1"] = _logits(trainer, tokens)
    report["tp1_second_step"] = trainer.step(mine)
    report["tp1_step2"] = _logits(trainer, tokens)
    parallel_state.destroy_model_parallel()

    # Other weights to start from, so only the load can make the logits equal.
    trainer = start_trainer(model, (2, 2, None), seed=99)
    report["tp2_loaded"] = checkpointer.load_latest(trainer.ddp_chunks, trainer.optimizer,
                                                    trainer.scheduler)
    report["tp2_step1"] = _logits(trainer, tokens)
    report["tp2_second_step"] = trainer.step(my_pairs(pairs, reference))
    report["tp2_step2"] = _logits(trainer, tokens)
    checkpointer.save(2, trainer.ddp_chunks, trainer.optimizer, trainer.scheduler,
                      {"iteration": 0, "step_in_iteration": 2})
    parallel_state.destroy_model_parallel()

    trainer = start_trainer(model, (1, 2, 2), seed=5)
    report["vpp_loaded"] = checkpointer.load_model_only(trainer.ddp_chunks, step=1)
    report["vpp_step1"] = _logits(trainer, tokens)
    parallel_state.destroy_model_parallel()

    trainer = start_trainer(model, (1, 1, None), seed=7)
    report["back_loaded"] = checkpointer.load_latest(trainer.ddp_chunks, trainer.optimizer,
                                                     trainer.scheduler)
    report["back_step2"] = _logits(trainer, tokens)
    report["back_lr"] = trainer.optimizer.param_groups[0]["lr"]
    return report


def _from_last_stage(reports, key):
    values = [report[key] for report in reports if report[key] is not None]
    assert values, f"no rank produced {key}"
    return values


@pytest.mark.slow
def test_a_checkpoint_saved_at_tp1_pp1_loads_at_tp2_pp2_and_vpp_and_back_with_equal_logits(
        tmp_path):
    model = tiny_model_config()
    tokens = torch.randint(0, model.vocab_size, (4, SEQ_LEN),
                           generator=torch.Generator().manual_seed(11))
    reports = spawn_local(_reshard_worker, 4, model, tmp_path / "run",
                          random_pairs(model.vocab_size), tokens)
    expected_step1 = _from_last_stage(reports, "tp1_step1")[0]
    for key in ("tp2_step1", "vpp_step1"):
        for got in _from_last_stage(reports, key):
            assert (got - expected_step1).abs().max().item() < 1e-5, key
    # The optimizer moments and step count came along: the step after the TP2/PP2 load
    # equals the TP1/PP1 one, and its result survives the way back to TP1/PP1.
    tp1_step, tp2_step = reports[0]["tp1_second_step"], reports[0]["tp2_second_step"]
    assert tp2_step["grad_norm"] == pytest.approx(tp1_step["grad_norm"], rel=1e-5)
    assert tp2_step["lr"] == tp1_step["lr"] == pytest.approx(TRAINING.lr)
    expected_step2 = _from_last_stage(reports, "tp1_step2")[0]
    assert (expected_step2 - expected_step1).abs().max().item() > 1e-3  # the step moved it
    for key in ("tp2_step2", "back_step2"):
        for got in _from_last_stage(reports, key):
            assert (got - expected_step2).abs().max().item() < 1e-5, key
    for report in reports:
        assert report["tp2_loaded"] == {"iteration": 0, "step_in_iteration": 1, "step": 1}
        assert report["vpp_loaded"]["step"] == 1
        assert report["back_loaded"] == {"iteration": 0, "step_in_iteration": 2, "step": 2}
        assert report["back_lr"] == tp1_step["lr"]


def _draws():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return [random.random(), float(np.random.rand()), torch.rand(3), tracked]


def _resume_worker(rank, world_size, model, root, pairs, reference, resume):
    from megatron_tpo.model.mcore_shards import with_global_layer_numbers

    checkpointer = TrainingCheckpointer(root, CheckpointConfig())
    trainer = start_trainer(model, (1, 2, 2), seed=4321 if resume else 1234)
    if reference is None:
        reference = trainer.reference_logprobs(pairs)
    mine = my_pairs(pairs, reference)
    report = {"reference": reference, "steps": []}
    if resume:
        report["loaded"] = checkpointer.load_latest(trainer.ddp_chunks, trainer.optimizer,
                                                    trainer.scheduler)
    else:
        report["steps"] = [trainer.step(mine) for _ in range(2)]
        checkpointer.save(2, trainer.ddp_chunks, trainer.optimizer, trainer.scheduler,
                          {"iteration": 0, "step_in_iteration": 2})
    report["draws"] = _draws()
    report["steps"] += [trainer.step(mine) for _ in range(2)]
    report["weights"] = {}
    for chunk in trainer.chunks:
        params = {name: p.detach().clone() for name, p in chunk.named_parameters()}
        report["weights"].update(with_global_layer_numbers(chunk, params))
    return report


@pytest.mark.slow
def test_a_dpo_run_resumed_from_step_2_equals_the_uninterrupted_run_bitwise(tmp_path):
    model = tiny_model_config()
    pairs = random_pairs(model.vocab_size)
    whole = spawn_local(_resume_worker, 2, model, tmp_path, pairs, None, False)
    resumed = spawn_local(_resume_worker, 2, model, tmp_path, pairs, whole[0]["reference"],
                          True)
    for uninterrupted, again in zip(whole, resumed):
        assert again["loaded"] == {"iteration": 0, "step_in_iteration": 2, "step": 2}
        assert len(uninterrupted["steps"]) == 4 and len(again["steps"]) == 2
        for before, after in zip(uninterrupted["steps"][2:], again["steps"]):
            for key in ("loss", "grad_norm", "lr", "rewards/margin"):
                assert (key in before) == (key in after)
                if key in before:
                    assert after[key] == before[key], key
        for first, second in zip(uninterrupted["draws"], again["draws"]):
            assert torch.equal(torch.as_tensor(first), torch.as_tensor(second))
        assert uninterrupted["weights"].keys() == again["weights"].keys()
        for name, weight in uninterrupted["weights"].items():
            assert torch.equal(weight, again["weights"][name]), name
    assert any("loss" in report["steps"][0] for report in resumed)
    assert whole[0]["steps"][2]["lr"] != whole[0]["steps"][3]["lr"]  # the schedule moves


def _same(first, second):
    return all(torch.equal(a, b) for a, b in zip(first, second))


def _file_hashes(root: Path):
    from megatron_tpo.files import file_sha256

    return {path.relative_to(root).as_posix(): file_sha256(path)
            for path in sorted(root.rglob("*")) if path.is_file()}


CORRUPTIONS = {"truncated": ("dist/__0_0.distcp", truncate),
               "flipped": ("dist/__0_1.distcp", flip_byte),
               "missing": ("dist/__0_1.distcp", Path.unlink),
               "missing_rng": ("rng/rank_00000.json", Path.unlink)}


def _damaged_copy_error(trainer, root: Path, case: str):
    """Load a damaged copy of ``root``: (error text, weights kept, other files untouched)."""
    relative, damage = CORRUPTIONS[case]
    copy = root.parent / case
    shutil.copytree(root, copy)
    checkpointer = TrainingCheckpointer(copy, CheckpointConfig())
    target = checkpointer.step_dir(checkpointer.latest_step()) / relative
    damage(target)
    hashes, weights = _file_hashes(copy), trainer_weights(trainer)
    try:
        checkpointer.load_latest(trainer.ddp_chunks, trainer.optimizer, trainer.scheduler)
        message = None
    except CheckpointError as error:
        message = str(error)
    return message, str(target), _same(weights, trainer_weights(trainer)), hashes == _file_hashes(copy)


def _save_failing_after_the_shards(checkpointer, trainer, step):
    """A save that dies once its shards are on disk, before the manifest (as a kill would)."""
    from megatron_tpo.checkpoint import manifest

    def killed(directory):
        raise RuntimeError("killed while hashing")

    original, manifest.file_records = manifest.file_records, killed
    try:
        checkpointer.save(step, trainer.ddp_chunks, trainer.optimizer, trainer.scheduler, {})
    except RuntimeError as error:
        return str(error)
    finally:
        manifest.file_records = original
    return None


def _audited_load(checkpointer, trainer):
    """load_latest with every torch.load call recorded as (caller, source, weights_only)."""
    calls, original = [], torch.load

    def recording_load(source, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__")
        name = Path(source).name if isinstance(source, (str, Path)) else type(source).__name__
        calls.append((caller, name, kwargs.get("weights_only")))
        return original(source, *args, **kwargs)

    torch.load = recording_load
    try:
        return checkpointer.load_latest(trainer.ddp_chunks, trainer.optimizer,
                                        trainer.scheduler), calls
    finally:
        torch.load = original


def _integrity_worker(rank, world_size, model, root, pairs):
    root = Path(root)
    trainer = start_trainer(model, (1, 1, None), seed=1234)
    mine = my_pairs(pairs, trainer.reference_logprobs(pairs))
    checkpointer = TrainingCheckpointer(root / "run", CheckpointConfig(keep_last=2))
    report = {"empty": checkpointer.load_latest(trainer.ddp_chunks, trainer.optimizer,
                                                trainer.scheduler)}
    for step in (1, 2, 3):
        trainer.step(mine)
        checkpointer.save(step, trainer.ddp_chunks, trainer.optimizer, trainer.scheduler,
                          {"step_in_iteration": step})
    report["kept"] = sorted(path.name for path in (root / "run").iterdir())
    saved = trainer_weights(trainer)
    trainer.step(mine)
    report["killed"] = _save_failing_after_the_shards(checkpointer, trainer, 4)
    report["after_kill"] = sorted(path.name for path in (root / "run").iterdir())
    report["latest_after_kill"] = checkpointer.latest_step()
    report["loaded"], report["torch_loads"] = _audited_load(checkpointer, trainer)
    report["weights_restored"] = _same(saved, trainer_weights(trainer))
    report["damaged"] = {case: _damaged_copy_error(trainer, root / "run", case)
                         for case in CORRUPTIONS}
    wider = _start_other_shape(model)
    weights = trainer_weights(wider)
    try:
        checkpointer.load_latest(wider.ddp_chunks, wider.optimizer, wider.scheduler)
        report["other_shape"] = None
    except CheckpointError as error:
        report["other_shape"] = str(error)
    report["other_shape_weights_kept"] = _same(weights, trainer_weights(wider))
    checkpointer.save(4, trainer.ddp_chunks, trainer.optimizer, trainer.scheduler, {})
    report["after_next_save"] = sorted(path.name for path in (root / "run").iterdir())
    with open(root / "report.pkl", "wb") as handle:  # this process will not return
        pickle.dump(report, handle)
    _save_killed_by_sigkill(checkpointer, trainer, 5)


def _save_killed_by_sigkill(checkpointer, trainer, step):
    """kill -9 of this process once step ``step``'s shards are on disk."""
    import os
    import signal

    import psutil

    from megatron_tpo.checkpoint import manifest

    def kill_nine(directory):
        for child in psutil.Process().children(recursive=True):  # megatron's writer queue
            child.kill()
        os.kill(os.getpid(), signal.SIGKILL)

    manifest.file_records = kill_nine
    checkpointer.save(step, trainer.ddp_chunks, trainer.optimizer, trainer.scheduler, {})


def _start_other_shape(model):
    from megatron_tpo.train.dpo_trainer import DPOTrainer

    other = tiny_model_config(ffn_hidden_size=model.ffn_hidden_size + 16)
    return DPOTrainer(other, ParallelConfig(), TRAINING)


@pytest.fixture(scope="module")
def integrity(tmp_path_factory):
    from torch.multiprocessing import ProcessExitedException

    model = tiny_model_config()
    root = tmp_path_factory.mktemp("integrity")
    with pytest.raises(ProcessExitedException) as killed:
        spawn_local(_integrity_worker, 1, model, root, random_pairs(model.vocab_size))
    with open(root / "report.pkl", "rb") as handle:
        report = pickle.load(handle)
    report["kill_signal"] = killed.value.signal_name
    report["root"] = root / "run"
    return report


@pytest.mark.slow
def test_an_empty_root_loads_nothing_and_keep_last_prunes_older_checkpoints(integrity):
    assert integrity["empty"] is None
    assert integrity["kept"] == ["latest", "step_00000002", "step_00000003"]


@pytest.mark.slow
def test_a_save_killed_part_way_leaves_latest_at_the_previous_checkpoint_which_loads(
        integrity):
    assert integrity["killed"] == "killed while hashing"
    assert ".step_00000004.partial" in integrity["after_kill"]
    assert integrity["latest_after_kill"] == 3
    assert integrity["loaded"] == {"step_in_iteration": 3, "step": 3}
    assert integrity["weights_restored"]
    # The next save clears the dead partial directory and prunes to keep_last.
    assert integrity["after_next_save"] == ["latest", "step_00000003", "step_00000004"]


@pytest.mark.slow
def test_a_save_killed_with_sigkill_leaves_the_previous_checkpoint_complete(integrity):
    from megatron_tpo.checkpoint.manifest import read_manifest, verify_files

    assert integrity["kill_signal"] == "SIGKILL"
    checkpointer = TrainingCheckpointer(integrity["root"], CheckpointConfig())
    assert checkpointer.latest_step() == 4
    assert any((integrity["root"] / ".step_00000005.partial" / "dist").glob("*.distcp"))
    directory = checkpointer.step_dir(4)
    verify_files(directory, read_manifest(directory))  # every file still matches


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_damaged_file_is_named_before_anything_is_overwritten(integrity, case):
    message, target, weights_kept, files_untouched = integrity["damaged"][case]
    assert message is not None, f"{case}: the damaged checkpoint loaded"
    assert target in message
    assert weights_kept and files_untouched


@pytest.mark.slow
def test_a_checkpoint_of_another_model_shape_names_the_tensor(integrity):
    message = integrity["other_shape"]
    assert message is not None and "decoder.layers.mlp.linear_fc1.weight" in message
    assert "/run/step_00000003/dist" in message and "[4, 352, 64]" in message
    assert integrity["other_shape_weights_kept"]


def _torch_load_calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"):
            yield node


def test_every_torch_load_in_the_package_is_weights_only():
    unsafe = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _torch_load_calls(path):
            flags = {k.arg: k.value for k in call.keywords}
            value = flags.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                unsafe.append(f"{path.relative_to(PACKAGE.parent)}:{call.lineno}")
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


@pytest.mark.slow
def test_loads_read_only_megatrons_common_pt_with_torch_load_and_that_is_weights_only(
        integrity, tmp_path):
    # Our own files are JSON. Each tensor record is loaded weights-only; megatron reads
    # common.pt with torch's default...
    calls = integrity["torch_loads"]
    assert ("megatron.core.dist_checkpointing.strategies.common", "common.pt", None) in calls
    assert any(call[2] is True for call in calls)
    # ...and torch's DCP planner unpickles non-tensor records (megatron's per-layer
    # `_extra_state` objects) with weights_only=False: checkpoints are trusted input,
    # which docs/checkpoints.md says.
    unsafe = {call for call in calls if call[2] is not True and call[1] != "common.pt"}
    assert unsafe == {("torch.distributed.checkpoint.default_planner", "BytesIO", False)}
    # ...which this torch resolves to weights_only=True: a pickled callable is refused.
    path = tmp_path / "payload.pt"
    path.write_bytes(pickle.dumps(print))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path)


def test_keep_last_below_one_is_refused_with_the_setting():
    with pytest.raises(ConfigError, match="checkpoint.keep_last=0"):
        TrainingCheckpointer("/nonexistent", CheckpointConfig(keep_last=0))


def test_latest_naming_an_incomplete_directory_is_an_error(tmp_path):
    (tmp_path / "step_00000005").mkdir()
    (tmp_path / "latest").write_text("step_00000005\n")
    with pytest.raises(CheckpointError, match="latest: names 'step_00000005'"):
        TrainingCheckpointer(tmp_path, CheckpointConfig()).latest_step()
    (tmp_path / "latest").unlink()
    assert TrainingCheckpointer(tmp_path, CheckpointConfig()).latest_step() is None
