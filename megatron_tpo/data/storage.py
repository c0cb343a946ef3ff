"""Per-iteration stage outputs (held-out evaluation, rollouts, judgments, pairs, reference
log-probs) as Parquet with a manifest.

Layout: ``<root>/iteration_<t>/<stage>.parquet`` and ``<stage>.manifest.json``. Both are
written under a temporary name in the same directory, fsynced and renamed, the manifest
last: a stage is finished exactly when its manifest exists and matches its Parquet file,
so a run killed mid-write redoes that stage and never reads half of it.
"""

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_tpo.files import atomic_write, file_sha256

# In the order a TPO iteration produces them.
STAGES = ("heldout", "rollouts", "judgments", "pairs", "reference")


class RolloutRow(TypedDict):
    """One of the K samples of one prompt, e.g. prompt 3, sample 1::

        {"prompt_id": 3, "sample_index": 1, "instruction": "Add 12, 40 and 7.",
         "prompt_text": "<|begin_of_text|>...", "prompt_token_ids": [1, 5, ...],
         "output": "Here is my thought process: ... Here is my response: The answer is 59.",
         "output_token_ids": [88, 12, ...], "finish_reason": "stop",
         "thought": "...", "response": "The answer is 59.", "parse_ok": True,
         "parse_failure": None}
    """

    prompt_id: int
    sample_index: int
    instruction: str
    prompt_text: str
    prompt_token_ids: List[int]
    output: str
    output_token_ids: List[int]
    finish_reason: str            # "stop" or "length" (cut at max_new_tokens)
    thought: Optional[str]
    response: Optional[str]
    parse_ok: bool
    parse_failure: Optional[str]  # a ParseFailure value when parse_ok is False


class JudgmentRow(TypedDict, total=False):
    """The judge's score of one judged sample (judge-specific extras may follow)."""

    prompt_id: int
    sample_index: int
    score: float
    response_length: int          # in length_control.unit


class PairRow(TypedDict, total=False):
    """One prompt's preference pair: full outputs (thought + response) and their token ids.

    The ``reference`` stage stores the same rows with ``reference_chosen`` and
    ``reference_rejected``: sequence log-probs under M_t, the iteration's frozen reference.
    """

    prompt_id: int
    instruction: str
    prompt_text: str
    prompt_token_ids: List[int]
    chosen: str
    rejected: str
    chosen_token_ids: List[int]
    rejected_token_ids: List[int]
    chosen_index: int
    rejected_index: int
    chosen_score: float
    rejected_score: Optional[float]   # None when the rejected output was invalid
    rejected_reason: str              # "judged", "parse_failure" or "truncated"
    score_margin: float
    length_margin: float
    controlled_margin: float
    reference_chosen: float
    reference_rejected: float


def config_hash(config: Any) -> str:
    """A stable digest of a (dataclass or plain) config, to tell runs with other settings apart."""
    plain = asdict(config) if is_dataclass(config) else config
    encoded = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


class IterationStore:
    def __init__(self, root):
        self.root = Path(root)

    def stage_dir(self, iteration: int) -> Path:
        return self.root / f"iteration_{iteration:03d}"

    def _paths(self, iteration: int, stage: str):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        directory = self.stage_dir(iteration)
        return directory / f"{stage}.parquet", directory / f"{stage}.manifest.json"

    def write(self, iteration: int, stage: str, rows: Sequence[Mapping[str, Any]], *,
              seed: Optional[int], config_digest: str,
              counts: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
        """Write one stage's rows atomically; returns the manifest."""
        data_path, manifest_path = self._paths(iteration, stage)
        # Rows first: a row source that fails (a bad prompt file) leaves no directory.
        table = pa.Table.from_pylist(list(rows))
        data_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(data_path, lambda handle: pq.write_table(table, handle))
        manifest = {
            "iteration": iteration, "stage": stage, "rows": table.num_rows,
            "seed": seed, "config_hash": config_digest,
            "counts": {key: int(value) for key, value in (counts or {}).items()},
            "sha256": file_sha256(data_path),
        }
        atomic_write(manifest_path,
                      lambda handle: handle.write(json.dumps(manifest, indent=2).encode()))
        return manifest

    def manifest(self, iteration: int, stage: str) -> Optional[Dict[str, Any]]:
        _, manifest_path = self._paths(iteration, stage)
        if not manifest_path.is_file():
            return None
        return json.loads(manifest_path.read_text())

    def is_finished(self, iteration: int, stage: str,
                    config_digest: Optional[str] = None) -> bool:
        """Manifest present, Parquet matching it, and (if given) written with this config."""
        data_path, _ = self._paths(iteration, stage)
        manifest = self.manifest(iteration, stage)
        if manifest is None or not data_path.is_file():
            return False
        if config_digest is not None and manifest["config_hash"] != config_digest:
            return False
        return file_sha256(data_path) == manifest["sha256"]

    def read_table(self, iteration: int, stage: str) -> pa.Table:
        if not self.is_finished(iteration, stage):
            raise FileNotFoundError(f"{self.stage_dir(iteration)}: stage {stage!r} is not "
                                    "finished (no manifest, or the data does not match it)")
        data_path, _ = self._paths(iteration, stage)
        return pq.read_table(data_path)

    def read(self, iteration: int, stage: str) -> List[Dict[str, Any]]:
        """The rows exactly as written."""
        return self.read_table(iteration, stage).to_pylist()

    def read_dataset(self, iteration: int, stage: str):
        """The stage as an in-memory ``datasets.Dataset`` (no cache files written)."""
        import datasets

        return datasets.Dataset(self.read_table(iteration, stage))
