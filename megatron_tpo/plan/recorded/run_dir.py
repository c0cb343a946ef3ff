"""Read what a TPO run recorded: its resolved config and its metrics.

    RUN_DIR/config.yaml     model, parallel, train, rollout, judge, prompts, run groups
    RUN_DIR/metrics.jsonl   one JSON object a line: "train_step" (rank 0's view of each
                            optimizer step), "rank_memory" (each rank's peak), and
                            "iteration" (seconds per stage under "timing/<stage>", counts)

Only the model, parallel and train groups are loaded into their typed configs; of the
others the planner reads a handful of keys, so the planner imports neither torch nor
the engines (tpo-run has validated the whole config when it wrote the file).
"""

import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_tpo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_tpo.train.config import DPOTrainingConfig
from megatron_tpo.report.metrics_file import METRICS_FILE, read_metric_records

CONFIG_FILE = "config.yaml"
STAGES = ("rollout", "judge", "reference_logprobs", "train", "weight_sync", "checkpoint")


def _typed(schema, values: Any, where: str):
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {error}") from error


@dataclass(frozen=True)
class RecordedRun:
    """The parts of a recorded run's resolved config (its config.yaml) the planner uses."""

    model: ModelConfig
    parallel: ParallelConfig
    train: DPOTrainingConfig
    world_size: Optional[int]      # run.world_size; read_run_dir falls back on the ranks
    hardware: str                  # a GPU-table name, or "cpu"
    samples_per_prompt: int        # rollout.sampling.n (K)
    max_new_tokens: int            # rollout.sampling.max_new_tokens
    prompts_per_iteration: int
    max_prompt_tokens: int
    judge_kind: str
    pairwise_max_pairs: Optional[int]
    pairwise_verdict_tokens: int   # judge.pairwise.sampling.max_new_tokens
    pairs_per_step: Optional[int] = None  # run.pairs_per_step, if the loop records it

    @property
    def micro_batch_sequences(self) -> int:
        return 2 * self.train.micro_batch_pairs  # chosen and rejected

    @property
    def recompute(self) -> str:
        return self.train.recompute_granularity or "none"


def read_recorded_run(path: Union[str, Path]) -> RecordedRun:
    """A run's ``config.yaml`` (or any YAML with its top-level groups)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path}: {error}") from error
    missing = [group for group in ("model", "parallel", "run") if group not in raw]
    if missing:
        raise ConfigError(f"{path}: no top-level {', '.join(missing)} (a run's config.yaml "
                          "has model, parallel, train, rollout, judge, prompts and run)")
    plain = OmegaConf.to_container(raw, resolve=True)

    def get(*keys, default=None):
        return _lookup(plain, keys, default)

    return RecordedRun(
        model=_typed(ModelConfig, plain["model"], f"{path}: model"),
        parallel=_typed(ParallelConfig, plain["parallel"], f"{path}: parallel"),
        train=_typed(DPOTrainingConfig, plain.get("train") or {}, f"{path}: train"),
        world_size=get("run", "world_size"),
        hardware=str(get("run", "hardware", default="cpu")),
        samples_per_prompt=int(get("rollout", "sampling", "n", default=8)),
        max_new_tokens=int(get("rollout", "sampling", "max_new_tokens", default=2048)),
        prompts_per_iteration=int(get("prompts", "prompts_per_iteration", default=5000)),
        max_prompt_tokens=int(get("prompts", "max_tokens", default=1024)),
        judge_kind=str(get("judge", "kind", default="reward_model")),
        pairwise_max_pairs=get("judge", "pairwise", "max_pairs_per_prompt"),
        pairwise_verdict_tokens=int(get("judge", "pairwise", "sampling", "max_new_tokens",
                                        default=1024)),
        pairs_per_step=get("run", "pairs_per_step"),
    )


def _lookup(tree: Dict, keys, default):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return default
        tree = tree[key]
    return default if tree is None else tree


@dataclass(frozen=True)
class RunMetrics:
    train_steps: List[Dict[str, Any]]
    rank_memory: List[Dict[str, Any]]
    iterations: List[Dict[str, Any]]

    def step_seconds(self) -> Optional[float]:
        """Median optimizer-step time; the median keeps the first, warming-up step out."""
        times = [row["seconds"] for row in self.train_steps if row.get("seconds") is not None]
        return statistics.median(times) if times else None

    def peak_memory_bytes(self) -> Optional[int]:
        """The largest peak any rank recorded (rank_memory rows, else the steps' own)."""
        rows = self.rank_memory or self.train_steps
        peaks = [row["peak_memory_bytes"] for row in rows
                 if row.get("peak_memory_bytes") is not None]
        return max(peaks) if peaks else None

    def stage_seconds(self, stage: str) -> Optional[float]:
        """Mean over iterations of ``timing/<stage>``."""
        values = [row[f"timing/{stage}"] for row in self.iterations
                  if row.get(f"timing/{stage}") is not None]
        return statistics.fmean(values) if values else None

    def iteration_mean(self, key: str) -> Optional[float]:
        values = [row[key] for row in self.iterations if row.get(key) is not None]
        return statistics.fmean(values) if values else None

    def steps_per_iteration(self) -> Optional[float]:
        counts: Dict[int, int] = {}
        for row in self.train_steps:
            counts[row.get("iteration", 0)] = counts.get(row.get("iteration", 0), 0) + 1
        return statistics.fmean(counts.values()) if counts else None


def read_run_metrics(path: Union[str, Path]) -> RunMetrics:
    """``metrics.jsonl``; a malformed line is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run metrics not found: {path}")
    records = read_metric_records(path)
    return RunMetrics(*(records.get(kind, []) for kind in ("train_step", "rank_memory",
                                                              "iteration")))


def read_run_dir(run_dir: Union[str, Path]):
    """(RecordedRun, RunMetrics) of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    config = read_recorded_run(run_dir / CONFIG_FILE)
    metrics = read_run_metrics(run_dir / METRICS_FILE)
    if config.world_size is None:
        # Every rank writes one rank_memory row per iteration: their ranks are the world.
        ranks = {row.get("rank") for row in metrics.rank_memory}
        if not ranks:
            raise ConfigError(f"{run_dir / CONFIG_FILE}: run.world_size is missing and "
                              f"{METRICS_FILE} has no rank_memory rows to count ranks from")
        config = replace(config, world_size=len(ranks))
    return config, metrics
