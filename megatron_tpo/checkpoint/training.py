"""Training checkpoints: model, optimizer, LR schedule, RNG and loop state, resharded on load.

```
<root>/latest                          "step_00000004": the newest complete checkpoint
<root>/step_00000004/manifest.json     written last: size and sha256 of every file below
<root>/step_00000004/state.json        step, loop state, LR scheduler, layout, tensor shapes
<root>/step_00000004/rng/rank_00003.json   each rank's generators
<root>/step_00000004/dist/             megatron-core dist_checkpointing (torch_dist)
<root>/.step_00000006.partial/         a save in progress (or killed); never read
```

A save writes everything under ``.step_<n>.partial``, hashes it into the manifest, renames
the directory to ``step_<n>`` and only then rewrites ``latest`` (each rename atomic and
fsynced), so a kill at any moment leaves ``latest`` naming a complete checkpoint (a step
saved again moves its old directory to ``.step_<n>.replaced`` first, which the next load
or save puts back if the kill came before the new one was in place). Loads
check every file against the manifest and every tensor shape against the model before
they touch the model or the optimizer.
"""

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from megatron_tpo.checkpoint import manifest as manifests
from megatron_tpo.checkpoint import sharded_state
from megatron_tpo.checkpoint.config import CheckpointConfig, CheckpointError
from megatron_tpo.checkpoint.rng import capture_rng_state, restore_rng_state
from megatron_tpo.fault_injection import crash_point
from megatron_tpo.files import atomic_write
from megatron_tpo.lifetime import die_with_parent
from megatron_tpo.parallel.collectives import barrier, broadcast_from_rank_zero, is_rank_zero, world

logger = logging.getLogger(__name__)
LATEST = "latest"
_STEP_DIR = re.compile(r"step_(\d{8})")


def _write_json(path: Path, body: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(json.dumps(body).encode()))


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _layout() -> Dict[str, Optional[int]]:
    from megatron.core import parallel_state as ps

    return {"tensor": ps.get_tensor_model_parallel_world_size(),
            "pipeline": ps.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline": ps.get_virtual_pipeline_model_parallel_world_size(),
            "data": ps.get_data_parallel_world_size(),
            "world": torch.distributed.get_world_size()}


def _rank_zero_answer(ask: Callable[[], Any]) -> Any:
    """COLLECTIVE. What ``ask()`` returns on rank 0, on every rank; a ``CheckpointError`` it
    raises there is raised on every rank, so all ranks fail or go on together."""
    answer = None
    if is_rank_zero():
        try:
            answer = ask()
        except CheckpointError as error:
            answer = error
    answer = broadcast_from_rank_zero(answer)
    if isinstance(answer, CheckpointError):
        raise answer
    return answer


def _gathered_shapes(chunks: List, metadata: Dict[str, Any]) -> Dict[str, Any]:
    shapes: Dict[str, Any] = {}
    for share in manifests.gathered(sharded_state.model_tensor_shapes(chunks, metadata)):
        shapes.update(share)
    return dict(sorted(shapes.items()))


def shield_writer_queue_from_slurm_signals() -> None:
    """Start megatron's checkpoint-writer results queue, if not yet started, with SIGTERM
    and SIGUSR1 blocked, in a helper that dies with this rank.

    megatron's async file writer keeps its write results in a multiprocessing Manager, a
    spawned process made at the first save and reused by every later one. Slurm signals
    every process of a job step (USR1 before the time limit, TERM on preemption or an
    operator's requeue); the ranks catch those to save once more (parallel/preemption.py),
    but the Manager would die of either and that save would fail. Spawned while this
    thread blocks both, the Manager inherits the blocked mask and lives until its rank
    shuts it down; a signal meant for the rank meanwhile stays pending and arrives once
    the mask is restored. Since no signal a rank may survive can end it, it is also tied
    to the rank's life (``lifetime.die_with_parent``): a rank killed outright takes it
    along, and with it multiprocessing's resource tracker, which ends when its last
    client has.
    """
    from multiprocessing import get_context, resource_tracker
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    # Spawning starts multiprocessing's resource tracker first if it is not running, and
    # that start unblocks SIGTERM in this thread: have it running before the mask is set.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    try:
        # What megatron's _get_write_results_queue makes (a spawned Manager's Queue, which
        # keeps its Manager alive), started with the initializer megatron cannot pass.
        manager = SyncManager(ctx=get_context("spawn"))
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class TrainingCheckpointer:
    """Save and resume one run's training state under ``root`` (a shared file system)."""

    def __init__(self, root, config: CheckpointConfig):
        config.validate()
        self.root = Path(root)
        self.config = config

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    # ------------------------------------------------------------------ save

    def save(self, step: int, chunks: List, optimizer, scheduler,
             loop_state: Dict[str, Any]) -> Path:
        """COLLECTIVE. Write step ``step``'s checkpoint, move ``latest`` to it, prune.

        ``loop_state`` is a small JSON-able dict the loop gets back from ``load_latest``.
        """
        from megatron.core import dist_checkpointing

        json.dumps(loop_state)  # not JSON-able: fail on every rank before any file exists
        shield_writer_queue_from_slurm_signals()
        partial = self._begin(step)
        metadata = sharded_state.sharding_metadata(optimizer)
        state = sharded_state.with_optimizer(
            sharded_state.model_sharded_state_dict(chunks, metadata), optimizer, metadata,
            is_loading=False)
        dist_checkpointing.save(state, str(partial / "dist"),
                                sharded_strategy=self._save_strategy())
        _write_json(partial / "rng" / f"rank_{world()[0]:05d}.json", capture_rng_state())
        shapes = _gathered_shapes(chunks, metadata)
        if is_rank_zero():
            _write_json(partial / "state.json", {
                "step": step, "loop_state": loop_state, "scheduler": scheduler.state_dict(),
                "layout": _layout(), "sharding_metadata": metadata, "tensors": shapes,
                "optimizer_saved": "optimizer" in state})
        barrier()
        files = manifests.file_records(partial)
        if is_rank_zero():
            manifests.write_manifest(partial, step, files)
            self._publish(partial, step)
            self._prune(step)
        barrier()
        return self.step_dir(step)

    def _begin(self, step: int) -> Path:
        """An empty ``.step_<n>.partial`` directory; leftovers of killed saves removed."""
        partial = self.root / f".{self.step_dir(step).name}.partial"
        if is_rank_zero():
            self.root.mkdir(parents=True, exist_ok=True)
            self._restore_set_aside()
            # Saves are collective and one at a time: any partial directory is a dead one.
            for stale in self.root.glob(".step_*.partial"):
                shutil.rmtree(stale)
            (partial / "dist").mkdir(parents=True)
        barrier()
        return partial

    @staticmethod
    def _save_strategy():
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.serialization import (
            get_default_save_sharded_strategy,
        )
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )

        # Data-parallel replicas split the writing instead of DP rank 0 writing it all.
        return FullyParallelSaveStrategyWrapper(
            get_default_save_sharded_strategy(),
            parallel_state.get_data_parallel_group(with_context_parallel=True))

    @staticmethod
    def _load_strategy(dist_dir: Path):
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.serialization import (
            get_default_load_sharded_strategy,
        )
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelLoadStrategyWrapper,
        )

        strategy = get_default_load_sharded_strategy(str(dist_dir))
        if not torch.cuda.is_available():
            # The exchange below moves tensors with .cuda(), which the CPU adapter
            # cannot redirect: on CPU every replica reads its own slices.
            return strategy
        # Each data-parallel replica reads a share and broadcasts it to the others,
        # instead of every replica reading the whole model from the file system.
        return FullyParallelLoadStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True))

    def _set_aside(self, step: int) -> Path:
        return self.root / f".{self.step_dir(step).name}.replaced"

    def _publish(self, partial: Path, step: int) -> None:
        """Rename ``partial`` to ``step_<n>``, then point ``latest`` at it.

        A step saved again (after a resume from an earlier one) first moves the old
        directory aside, since a rename cannot replace a non-empty directory. Until the
        new one is in place ``latest`` may name a missing directory; ``_restore_set_aside``
        puts the old one back before any load or save, so every moment leaves a loadable
        checkpoint. Unique directory names per save would avoid the window too, but every
        reader, the pruning and the loop find a step's directory by its number.
        """
        final = self.step_dir(step)
        aside = self._set_aside(step)
        if final.exists():
            os.replace(final, aside)
            _fsync_directory(self.root)
            crash_point(step, "checkpoint_set_aside")
        os.replace(partial, final)
        _fsync_directory(self.root)
        crash_point(step, "checkpoint_renamed")
        atomic_write(self.root / LATEST, lambda handle: handle.write(f"{final.name}\n".encode()))
        crash_point(step, "checkpoint_latest")
        shutil.rmtree(aside, ignore_errors=True)

    def _restore_set_aside(self) -> None:
        """Finish a re-save that was killed in ``_publish`` (rank 0, or one process)."""
        for aside in self.root.glob(".step_*.replaced"):
            final = self.root / aside.name[1:-len(".replaced")]
            if final.exists():  # the new copy is in place: the old one is stale
                shutil.rmtree(aside)
            else:  # killed between the two renames: the old copy is the checkpoint
                os.replace(aside, final)
                _fsync_directory(self.root)

    def _prune(self, saved_step: int) -> None:
        """Keep ``keep_last`` complete checkpoints up to ``saved_step``; later ones are left."""
        older = [step for step in self.complete_steps() if step < saved_step]
        for step in older[:max(0, len(older) - (self.config.keep_last - 1))]:
            shutil.rmtree(self.step_dir(step))

    # ------------------------------------------------------------------ find

    def complete_steps(self) -> List[int]:
        """Steps whose directory holds a manifest, oldest first (files not yet verified)."""
        if not self.root.is_dir():
            return []
        return sorted(int(match.group(1)) for path in self.root.iterdir()
                      if (match := _STEP_DIR.fullmatch(path.name))
                      and (path / manifests.MANIFEST).is_file())

    def latest_step(self) -> Optional[int]:
        """The step ``latest`` names; without ``latest``, the newest complete directory.

        Files are verified against the manifest by the loads, which read them anyway.
        Call it on rank 0 (or in one process): it may finish a re-save killed part way.
        """
        if self.root.is_dir():
            self._restore_set_aside()
        pointer = self.root / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            match = _STEP_DIR.fullmatch(name)
            if match is None or not (self.root / name / manifests.MANIFEST).is_file():
                raise CheckpointError(f"{pointer}: names {name!r}, which is not a complete "
                                      "checkpoint directory")
            return int(match.group(1))
        steps = self.complete_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ load

    def load_latest(self, chunks: List, optimizer, scheduler) -> Optional[Dict[str, Any]]:
        """COLLECTIVE. Restore model, optimizer, LR scheduler and (same layout) RNG.

        Returns the saved loop state with ``"step"`` added, or None when ``root`` holds no
        checkpoint. Raises ``CheckpointError`` before changing anything when a file fails
        the manifest or a tensor's shape differs from the model's.
        """
        step = _rank_zero_answer(self.latest_step)
        if step is None:
            return None
        state = self._load(step, chunks, optimizer)
        try:
            scheduler.load_state_dict(state["scheduler"])
        except AssertionError as error:  # megatron asserts the schedule was not changed
            raise CheckpointError(f"{self.step_dir(step) / 'state.json'}: {error}") from error
        self._restore_rng(step, state["layout"])
        return {**state["loop_state"], "step": step}

    def load_model_only(self, chunks: List, step: Optional[int] = None) -> Dict[str, Any]:
        """COLLECTIVE. Load only the weights (of ``step``, default the latest), at any layout.

        Returns the saved loop state with ``"step"``; no checkpoint is a ``CheckpointError``.
        """
        if step is None:
            step = _rank_zero_answer(self.latest_step)
        if step is None:
            raise CheckpointError(f"{self.root}: no checkpoint to load weights from")
        state = self._load(step, chunks, optimizer=None)
        return {**state["loop_state"], "step": step}

    def _verified_state(self, step: int) -> Dict[str, Any]:
        """COLLECTIVE. ``state.json`` of a directory whose files all match its manifest."""
        directory = self.step_dir(step)
        body = _rank_zero_answer(lambda: self._complete_manifest(directory))
        manifests.verify_files(directory, body)
        return json.loads((directory / "state.json").read_text())

    @staticmethod
    def _complete_manifest(directory: Path) -> Dict[str, Any]:
        body = manifests.read_manifest(directory)
        if body is None:
            raise CheckpointError(f"{directory}: no {manifests.MANIFEST}; not a complete "
                                  "checkpoint")
        return body

    def _load(self, step: int, chunks: List, optimizer) -> Dict[str, Any]:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.core import CheckpointingException
        from torch.distributed.checkpoint.api import CheckpointException

        state = self._verified_state(step)
        metadata = state["sharding_metadata"]
        self._check_shapes(step, chunks, state)
        wanted = sharded_state.model_sharded_state_dict(chunks, metadata)
        if optimizer is not None and state["optimizer_saved"]:
            wanted = sharded_state.with_optimizer(wanted, optimizer, metadata, is_loading=True)
        dist_dir = self.step_dir(step) / "dist"
        try:
            loaded = dist_checkpointing.load(wanted, str(dist_dir),
                                             sharded_strategy=self._load_strategy(dist_dir))
        except (CheckpointingException, CheckpointException) as error:
            # e.g. optimizer state saved by the ordinary optimizer, loaded by the distributed one
            raise CheckpointError(f"{dist_dir}: {error}") from error
        sharded_state.apply_loaded_state(chunks, optimizer, loaded)
        return state

    def _check_shapes(self, step: int, chunks: List, state: Dict[str, Any]) -> None:
        """COLLECTIVE. Every rank raises if any rank's tensors differ from the saved ones."""
        saved = {key: (shape, padded) for key, (shape, padded) in state["tensors"].items()}
        wanted = sharded_state.model_tensor_shapes(chunks, state["sharding_metadata"])
        problems = sorted(set(problem for share in manifests.gathered(
            sharded_state.shape_problems(saved, wanted)) for problem in share))
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(f"{self.step_dir(step) / 'dist'}: {problems[0]}{more}; "
                                  "the checkpoint is of another model shape")

    def _restore_rng(self, step: int, saved_layout: Dict[str, Any]) -> None:
        if saved_layout != _layout():
            # Rank r of another layout plays another role; its generators would mean nothing.
            if is_rank_zero():
                logger.warning("checkpoint %s was saved at layout %s, this run is %s: RNG "
                               "states are not restored", self.step_dir(step), saved_layout,
                               _layout())
            return
        path = self.step_dir(step) / "rng" / f"rank_{world()[0]:05d}.json"
        restore_rng_state(json.loads(path.read_text()))
