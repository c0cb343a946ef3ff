"""evaluation/chunks.py in one process: rows are computed and stored chunk by chunk, a
re-run computes only the chunks not stored, and a directory made with other settings is
refused."""

import json

import pytest

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.evaluation.chunks import SETTINGS, ChunkStore, rank_zero_value, run_in_chunks


class Counting:
    """compute(): one row per item; remembers the chunks it was asked for; can fail."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, items):
        if items[0] == self.fail_at:
            raise RuntimeError("interrupted")
        self.calls.append(list(items))
        return [{"item": item, "square": item * item} for item in items]


def test_rows_are_stored_per_chunk_and_a_rerun_resumes_after_the_last_stored(tmp_path):
    store = ChunkStore(tmp_path / "answers", {"model": "m"}, chunk_size=3)
    items = list(range(8))
    interrupted = Counting(fail_at=6)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_in_chunks(store, items, interrupted, "test", progress=False)
    assert interrupted.calls == [[0, 1, 2], [3, 4, 5]]
    assert store.finished(3) == [True, True, False]
    assert json.loads((tmp_path / "answers" / "chunk_00001.json").read_text())[0] == \
        {"item": 3, "square": 9}
    assert json.loads((tmp_path / "answers" / SETTINGS).read_text()) == \
        {"model": "m", "chunk_size": 3}

    resumed = Counting()
    rows = run_in_chunks(store, items, resumed, "test", progress=False)
    assert resumed.calls == [[6, 7]]
    assert rows == [{"item": i, "square": i * i} for i in items]

    finished = Counting()
    assert run_in_chunks(store, items, finished, "test", progress=False) == rows
    assert finished.calls == []


def test_other_settings_or_chunk_size_are_refused(tmp_path):
    run_in_chunks(ChunkStore(tmp_path, {"model": "m"}, 2), [1, 2, 3], Counting(), "t",
                  progress=False)
    with pytest.raises(ConfigError, match=r"other settings \(model: 'm' there, 'n' now\)"):
        run_in_chunks(ChunkStore(tmp_path, {"model": "n"}, 2), [1, 2, 3], Counting(), "t",
                      progress=False)
    with pytest.raises(ConfigError, match=r"\(chunk_size: 2 there, 3 now\)"):
        ChunkStore(tmp_path, {"model": "m"}, 3).open()
    with pytest.raises(ConfigError, match="--chunk-size=0: must be >= 1"):
        ChunkStore(tmp_path, {}, 0)


def test_compute_must_return_a_row_per_item(tmp_path):
    with pytest.raises(RuntimeError, match="t: 1 rows for 2 items"):
        run_in_chunks(ChunkStore(tmp_path, {}, 2), [1, 2], lambda items: [{}], "t",
                      progress=False)


def test_rank_zero_value_in_one_process():
    assert rank_zero_value(lambda: 42) == 42

    def refused():
        raise ConfigError("no")

    with pytest.raises(ConfigError, match="^no$"):
        rank_zero_value(refused)
