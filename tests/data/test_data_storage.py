import json
import math
import os

import pytest

from megatron_tpo.data import IterationStore, config_hash
from megatron_tpo.judge import JudgeConfig

ROLLOUTS = [
    {"prompt_id": 0, "sample_index": 0, "prompt": "Schreib ein Gedicht über Käse 🧀",
     "output": "Gedanke<R>Käse ist gut", "thought": "Gedanke", "response": "Käse ist gut",
     "parse_status": "ok", "num_tokens": 9},
    {"prompt_id": 0, "sample_index": 1, "prompt": "Schreib ein Gedicht über Käse 🧀",
     "output": "no marker", "thought": None, "response": None,
     "parse_status": "no_response_marker", "num_tokens": 2},
]
JUDGMENTS = [{"prompt_id": 3, "sample_index": k, "score": s, "extras": [s, -s]}
             for k, s in enumerate([0.1, 1 / 3, -2.5e-300, math.pi])]


def test_round_trip_is_exact(tmp_path):
    store = IterationStore(tmp_path)
    digest = config_hash(JudgeConfig(kind="format"))
    manifest = store.write(2, "rollouts", ROLLOUTS, seed=11, config_digest=digest,
                           counts={"no_response_marker": 1})
    store.write(2, "judgments", JUDGMENTS, seed=11, config_digest=digest)
    assert store.read(2, "rollouts") == ROLLOUTS
    assert store.read(2, "judgments") == JUDGMENTS        # float64 bit-exact
    assert store.read_dataset(2, "judgments")["score"] == [r["score"] for r in JUDGMENTS]
    on_disk = json.loads((tmp_path / "iteration_002" / "rollouts.manifest.json").read_text())
    assert on_disk == manifest
    assert (manifest["rows"], manifest["seed"], manifest["counts"]) == \
        (2, 11, {"no_response_marker": 1})
    assert manifest["config_hash"] == digest
    assert sorted(os.listdir(tmp_path / "iteration_002")) == [
        "judgments.manifest.json", "judgments.parquet",
        "rollouts.manifest.json", "rollouts.parquet"]      # no temporary files left


def test_restart_tells_finished_from_unfinished(tmp_path):
    store = IterationStore(tmp_path)
    assert not store.is_finished(0, "pairs")
    store.write(0, "pairs", [{"prompt_id": 1, "chosen": "a", "rejected": "b"}],
                seed=0, config_digest="abc")
    assert store.is_finished(0, "pairs")
    assert store.is_finished(0, "pairs", config_digest="abc")
    assert not store.is_finished(0, "pairs", config_digest="other settings")

    # A crash after the Parquet rename but before the manifest: not finished.
    (tmp_path / "iteration_000" / "pairs.manifest.json").unlink()
    assert not store.is_finished(0, "pairs")
    with pytest.raises(FileNotFoundError, match="not finished"):
        store.read(0, "pairs")

    # Data that no longer matches its manifest (a torn or foreign file): not finished.
    store.write(0, "pairs", [{"prompt_id": 1, "chosen": "a", "rejected": "b"}],
                seed=0, config_digest="abc")
    (tmp_path / "iteration_000" / "pairs.parquet").write_bytes(b"PAR1 torn")
    assert not store.is_finished(0, "pairs")


def test_failed_write_leaves_nothing_behind(tmp_path):
    store = IterationStore(tmp_path)
    with pytest.raises(Exception):
        # Mixed types in one column cannot become an Arrow table.
        store.write(1, "rollouts", [{"x": 1}, {"x": "one"}], seed=0, config_digest="d")
    assert not store.is_finished(1, "rollouts")
    # Not even the iteration's directory: the rows fail before anything is created.
    assert os.listdir(tmp_path) == []


def test_config_hash_is_stable_and_sensitive():
    assert config_hash(JudgeConfig(kind="format")) == config_hash(JudgeConfig(kind="format"))
    changed = JudgeConfig(kind="format")
    changed.length_control.rho = 0.1
    assert config_hash(changed) != config_hash(JudgeConfig(kind="format"))
    assert config_hash({"b": 1, "a": 2}) == config_hash({"a": 2, "b": 1})


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'scores'"):
        IterationStore(tmp_path).write(0, "scores", [], seed=0, config_digest="d")
