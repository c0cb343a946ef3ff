"""Evaluation sets in every format tpo-eval reads, the errors that name file and line,
and fetch-sets' checks (on archives built here: tests download nothing)."""

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.evaluation import fetch
from megatron_tpo.evaluation.sets import SetFileError, load_eval_set

ALPACA = [{"instruction": "Name a colour.", "output": "Blue.", "generator": "x",
           "dataset": "oasst", "datasplit": "eval"},
          {"instruction": "Add 2 and 3.", "output": "5", "generator": "x",
           "dataset": "vicuna", "datasplit": "eval"}]
MT_BENCH = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
            {"question_id": 101, "category": "reasoning", "turns": ["Who is second?", "Why?"]}]
MT_REFERENCE = [{"question_id": 101, "model_id": "gpt-4",
                 "choices": [{"index": 0, "turns": ["Second place.", "Because."]}]}]


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_built_in_sets_read_from_the_sets_directory(tmp_path):
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(ALPACA))
    _jsonl(tmp_path / "mt_bench.jsonl", MT_BENCH)
    _jsonl(tmp_path / "mt_bench_reference.jsonl", MT_REFERENCE)
    alpaca = load_eval_set("alpaca_eval", tmp_path)
    assert [(i.instruction, i.reference, i.category, i.index) for i in alpaca.items] == [
        ("Name a colour.", "Blue.", "oasst", 0), ("Add 2 and 3.", "5", "vicuna", 1)]
    mt = load_eval_set("mt_bench", tmp_path)
    assert [(i.id, i.instruction, i.category, i.reference) for i in mt.items] == [
        ("81", "Write a poem.", "writing", None), ("101", "Who is second?", "reasoning", "Second place.")]


def test_arena_hard_question_files_of_both_versions(tmp_path):
    v01 = _jsonl(tmp_path / "v01.jsonl", [{"question_id": "abc", "category": "arena-hard-v0.1",
                                           "cluster": "c", "turns": [{"content": "Solve it."}]}])
    v2 = _jsonl(tmp_path / "v2.jsonl", [{"uid": "u1", "category": "hard_prompt",
                                         "subcategory": "coding", "prompt": "Write code."}])
    old, new = load_eval_set(f"arena_hard={v01}", tmp_path), load_eval_set(f"arena_hard={v2}", tmp_path)
    assert (old.id_field, old.items[0].id, old.items[0].instruction) == ("question_id", "abc", "Solve it.")
    assert (new.id_field, new.items[0].id, new.items[0].category) == ("uid", "u1", "coding")


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a"}\n{"instruction": 3}\n', ":2: field 'instruction'"),
    ('{"instruction": "a"}\n\n[1, 2]\n', ":3: expected a JSON object"),
    ('{"instruction": "a"\n', ":1: not valid JSON"),
])
def test_a_bad_line_is_named(tmp_path, content, message):
    path = tmp_path / "mine.jsonl"
    path.write_text(content)
    with pytest.raises(SetFileError, match=message):
        load_eval_set(f"mine={path}", tmp_path)


def test_a_bad_alpaca_file_and_an_unknown_set_are_named(tmp_path):
    (tmp_path / "alpaca_eval.json").write_text('[{"instruction": "a"},\n {"instruction": }]')
    with pytest.raises(SetFileError, match=r"alpaca_eval.json:2: not valid JSON"):
        load_eval_set("alpaca_eval", tmp_path)
    with pytest.raises(ConfigError, match="not a built-in set"):
        load_eval_set("vicuna_bench", tmp_path)
    with pytest.raises(SetFileError, match="fetch-sets"):
        load_eval_set("mt_bench", tmp_path)


def _archives(directory: Path):
    """An sdist and a wheel shaped like alpaca-eval's and flexeval's."""
    alpaca = json.dumps(ALPACA).encode()
    sdist = directory / "alpaca_eval-0.6.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        info = tarfile.TarInfo("alpaca_eval-0.6.6/example/outputs.json")
        info.size = len(alpaca)
        archive.addfile(info, io.BytesIO(alpaca))
    wheel = directory / "flexeval-0.18.3-py3-none-any.whl"
    mt = "".join(json.dumps(r) + "\n" for r in MT_BENCH).encode()
    reference = "".join(json.dumps(r) + "\n" for r in MT_REFERENCE).encode()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(fetch._MT_BENCH_DIR + "mt-en.jsonl", mt)
        archive.writestr(fetch._MT_BENCH_DIR + "mt-en-ref-gpt4.jsonl", reference)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in
               (("alpaca", alpaca), ("mt", mt), ("reference", reference))}
    return {fetch.ALPACA_EVAL: sdist, fetch.FLEXEVAL: wheel}, digests


def test_fetch_sets_writes_checked_files_and_refuses_altered_ones(tmp_path, monkeypatch):
    archives, digests = _archives(tmp_path)
    monkeypatch.setattr(fetch, "_download", lambda requirement, directory: archives[requirement])
    files = {
        fetch.ALPACA_EVAL: [(m, f, digests["alpaca"]) for m, f, _ in fetch.SET_FILES[fetch.ALPACA_EVAL]],
        fetch.FLEXEVAL: [(m, f, digests["mt" if f == "mt_bench.jsonl" else "reference"])
                         for m, f, _ in fetch.SET_FILES[fetch.FLEXEVAL]]}
    monkeypatch.setattr(fetch, "SET_FILES", files)
    written = fetch.fetch_sets(tmp_path / "sets")
    assert sorted(written) == ["alpaca_eval.json", "mt_bench.jsonl", "mt_bench_reference.jsonl"]
    assert len(load_eval_set("alpaca_eval", tmp_path / "sets").items) == 2
    assert len(load_eval_set("mt_bench", tmp_path / "sets").items) == 2

    files[fetch.ALPACA_EVAL] = [(m, f, "0" * 64) for m, f, _ in files[fetch.ALPACA_EVAL]]
    with pytest.raises(ConfigError, match="sha256 differs"):
        fetch.fetch_sets(tmp_path / "other")
    assert not (tmp_path / "other" / "alpaca_eval.json").exists()


REAL_SETS = Path(__file__).resolve().parents[2] / "data" / "eval"


@pytest.mark.skipif(not (REAL_SETS / "alpaca_eval.json").is_file(),
                    reason="tpo-eval fetch-sets --out data/eval has not been run")
def test_the_fetched_sets_hold_805_and_80_instructions():
    from collections import Counter

    alpaca = load_eval_set("alpaca_eval", REAL_SETS)
    assert Counter(i.category for i in alpaca.items) == {
        "selfinstruct": 252, "oasst": 188, "koala": 156, "helpful_base": 129, "vicuna": 80}
    mt = load_eval_set("mt_bench", REAL_SETS)
    assert len(mt.items) == 80 and sum(i.reference is not None for i in mt.items) == 30
