"""Run metrics: one JSONL file (what `tpo-plan --check` and the plots read), TensorBoard,
and Weights & Biases when configured. Only rank 0 writes; every rank may call.

Record kinds in ``metrics.jsonl``: ``train_step`` (one per DPO step), ``iteration`` (one
per TPO iteration: stage timings under ``timing/``, counts, data summary, held-out
score), ``rank_memory`` (peak memory of every rank, once per iteration) and, on a GPU,
``memory`` (one per phase: the ledger's prediction for rank 0's GPU beside what the
device held).
"""

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from tqdm.auto import tqdm

from megatron_tpo.parallel.collectives import world
from megatron_tpo.report.metrics_file import METRICS_FILE, read_metric_records


class RunMetrics:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.timings: Dict[str, float] = {}
        self._tensorboard = self._wandb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            if wandb_project:
                import wandb

                self._wandb = wandb.init(project=wandb_project, config=config,
                                         dir=str(run_dir), resume="allow")

    @contextmanager
    def timer(self, name: str):
        """Add the block's wall time to ``name`` (summed within the iteration)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started

    def progress(self, iterable: Iterable, description: str):
        """A progress bar on rank 0; without a terminal (a Slurm log) a line a minute
        instead of a redraw every few milliseconds."""
        attached = sys.stderr.isatty()
        return tqdm(iterable, desc=description, disable=not self.enabled, leave=False,
                    mininterval=0.1 if attached else 60.0)

    def _write(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "kind"}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(f"{record['kind']}/{key}", value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({f"{record['kind']}/{k}": v for k, v in scalars.items()})

    def log(self, values: dict, step: int, kind: str = "counts") -> None:
        if values:
            self._write({"kind": kind, "step": step, **values}, step)

    def log_train_step(self, iteration: int, step: int, values: dict, global_step: int) -> None:
        self._write({"kind": "train_step", "iteration": iteration, "step": step,
                     "rank": world()[0], **values}, global_step)

    def log_device_memory(self, phase: str, iteration: Optional[int], predicted: float) -> None:
        """At the end of a phase on a GPU: the ledger's prediction for this GPU beside the
        allocator's peak reservation during the phase (the placement reset it when the
        phase began) and what the whole device holds now (other allocators included: a
        vLLM engine's, NCCL's), so the first run on a cluster calibrates the model."""
        free, total = torch.cuda.mem_get_info()
        self.log({"phase": phase, "predicted_bytes": predicted,
                  "reserved_peak_bytes": float(torch.cuda.max_memory_reserved()),
                  "device_used_bytes": float(total - free)},
                 step=iteration or 0, kind="memory")

    def end_iteration(self, iteration: int, record: dict) -> None:
        """Write the iteration's record with its stage timings, and every rank's peak memory."""
        self._write({"kind": "iteration", "iteration": iteration, **record, **self.timings},
                    iteration)
        self.timings = {}
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        peaks: List = [peak]
        if torch.distributed.is_initialized():
            peaks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(peaks, peak)
        for rank, value in enumerate(peaks):
            self._write({"kind": "rank_memory", "iteration": iteration, "rank": rank,
                         "peak_memory_bytes": value}, iteration)

    def records(self, kind: str) -> List[dict]:
        return read_metric_records(self.path).get(kind, [])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
