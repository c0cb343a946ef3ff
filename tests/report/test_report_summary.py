"""report/summary.py: an iteration's record and the run's summary read back from a store
written here, each number computed again by hand; a redone iteration counts once; the
table and the timing shares of known records."""

import json

import pytest

from megatron_tpo.data.storage import IterationStore
from megatron_tpo.report.summary import (iteration_record, last_per_iteration, run_summary,
                                         summary_table, timing_shares, write_summary)


def _rollout(finish_reason, prompt_tokens, output_tokens, parse_ok=True, thought="abc"):
    return {"prompt_id": 0, "sample_index": 0, "parse_ok": parse_ok, "thought": thought,
            "finish_reason": finish_reason, "prompt_token_ids": list(range(prompt_tokens)),
            "output_token_ids": list(range(output_tokens))}


def _heldout(instruction, score, win, parse_ok=True, response="r"):
    return {"instruction": instruction, "score": score, "win_against_first": win,
            "parse_ok": parse_ok, "response": response}


def _write(store, t, stage, rows):
    store.write(t, stage, rows, seed=0, config_digest="d")


@pytest.fixture
def store(tmp_path):
    store = IterationStore(tmp_path)
    _write(store, 0, "rollouts", [_rollout("stop", 4, 10), _rollout("length", 6, 24),
                                  _rollout("stop", 5, 2, parse_ok=False, thought="")])
    _write(store, 0, "judgments", [{"score": 1.0, "response_length": 10},
                                   {"score": 3.0, "response_length": 30}])
    _write(store, 0, "pairs", [{"score_margin": 2.0, "length_margin": -20}])
    _write(store, 0, "heldout", [_heldout("a", 1.0, 0.5), _heldout("b", 0.0, 0.5)])
    _write(store, 1, "heldout", [_heldout("a", 2.0, 1.0, response="longer"),
                                 _heldout("b", 1.0, 0.0, parse_ok=False)])
    return store


def test_iteration_record_by_hand(store):
    record = iteration_record(store, 0, sync={"seconds": 1.5, "bytes": 64})
    assert record["samples"] == 3.0 and record["pairs"] == 1.0
    assert record["parse_rate"] == pytest.approx(2 / 3)
    assert record["mean_score"] == 2.0 and record["mean_score_margin"] == 2.0
    assert record["truncated_rate"] == pytest.approx(1 / 3)
    assert record["mean_prompt_tokens"] == 5.0
    assert record["mean_completion_tokens"] == 12.0
    assert record["heldout/score"] == 0.5 and record["heldout/win_rate_vs_m0"] == 0.5
    assert record["heldout/parse_rate"] == 1.0
    assert record["weight_sync/seconds"] == 1.5 and record["weight_sync/bytes"] == 64
    for stage in ("rollouts", "judgments", "pairs"):   # an iteration without held-out rows
        _write(store, 2, stage, store.read(0, stage))
    assert not any(key.startswith("heldout/") for key in iteration_record(store, 2))


def test_run_summary_lists_every_heldout_and_the_last_record_of_each_iteration(store):
    records = [{"iteration": 0, "loss": 1.0}, {"iteration": 1, "loss": 0.9},
               {"iteration": 1, "loss": 0.8}]   # iteration 1 redone after a crash
    summary = run_summary(store, records, iterations=2, thought="generic")
    assert summary["thought"] == "generic"
    assert summary["heldout_score"] == [0.5, 1.5]
    assert summary["heldout_win_rate_vs_m0"] == [0.5, 0.5]
    assert summary["heldout_parse_rate"] == [1.0, 0.5]
    assert len(summary["heldout_lc_win_rate_vs_m0"]) == 2
    assert summary["iterations"] == [{"iteration": 0, "loss": 1.0},
                                     {"iteration": 1, "loss": 0.8}]


def test_last_per_iteration_orders_by_iteration():
    assert last_per_iteration([{"iteration": 2, "v": 1}, {"iteration": 0, "v": 2},
                               {"iteration": 2, "v": 3}]) == [{"iteration": 0, "v": 2},
                                                              {"iteration": 2, "v": 3}]


def test_write_summary_replaces_the_file_whole(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    write_summary({"thought": "x", "heldout_score": [0.25]}, path)
    assert json.loads(path.read_text()) == {"thought": "x", "heldout_score": [0.25]}
    assert list(tmp_path.iterdir()) == [path]


def test_summary_table_and_timing_shares():
    table = summary_table({"tpo": {"heldout_score": [0.5, 0.625], "heldout_win_rate_vs_m0":
                                   [0.5, 0.75]},
                           "base": {"heldout_score": [0.5], "heldout_win_rate_vs_m0": [0.5]}})
    assert table.splitlines() == [
        "| model | tpo score | tpo win vs M_0 | base score | base win vs M_0 |",
        "|---|---|---|---|---|",
        "| M_0 | 0.500 | 0.500 | 0.500 | 0.500 |",
        "| M_1 | 0.625 | 0.750 |  |  |"]
    shares = timing_shares([{"timing/rollout": 6.0, "timing/train": 1.0, "loss": 9.0},
                            {"timing/rollout": 2.0, "timing/train": 1.0}])
    assert list(shares) == ["rollout", "train"]
    assert shares == {"rollout": pytest.approx(0.8), "train": pytest.approx(0.2)}
    assert timing_shares([]) == {}
