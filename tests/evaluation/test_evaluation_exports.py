"""evaluation/exports.py: AlpacaEval's model_outputs.json and Arena-Hard's model_answer
lines, field by field; an answer that did not parse is exported empty, never its raw
output or thought."""

import hashlib
import json

from megatron_tpo.evaluation.exports import write_exports
from megatron_tpo.evaluation.sets import EvalSet

ROWS = [
    {"id": "q1", "instruction": "Say hi", "category": "helpful_base", "output": "T R hi",
     "thought": "T", "response": "# Hi\n- **there**", "parse_ok": True, "response_tokens": 5},
    {"id": "q2", "instruction": "Count", "category": "oasst", "output": "secret thought",
     "thought": None, "response": None, "parse_ok": False, "response_tokens": 0},
]
HI_COUNTS = {"header_count": {"h1": 1, "h2": 0, "h3": 0, "h4": 0, "h5": 0, "h6": 0},
             "list_count": {"ordered": 0, "unordered": 1},
             "bold_count": {"**": 1, "__": 0}}


def _answer_id(generator, question):
    return hashlib.sha256(f"{generator}/{question}".encode()).hexdigest()[:22]


def test_alpaca_eval_outputs_field_by_field(tmp_path):
    paths = write_exports(ROWS, "m1", EvalSet("alpaca_eval", "set.json", []), tmp_path)
    assert paths == [tmp_path / "exports" / "alpaca_eval" / "m1" / "model_outputs.json"]
    assert json.loads(paths[0].read_text()) == [
        {"instruction": "Say hi", "output": "# Hi\n- **there**", "generator": "m1",
         "dataset": "helpful_base", "datasplit": "eval"},
        {"instruction": "Count", "output": "", "generator": "m1", "dataset": "oasst",
         "datasplit": "eval"}]
    # Other sets have no dataset / datasplit, and no Arena-Hard file.
    other = write_exports(ROWS, "m1", EvalSet("mt_bench", "q.jsonl", []), tmp_path)
    assert len(other) == 1
    assert json.loads(other[0].read_text())[0] == {"instruction": "Say hi",
                                                   "output": "# Hi\n- **there**",
                                                   "generator": "m1"}


def test_arena_hard_v01_answers_field_by_field(tmp_path):
    paths = write_exports(ROWS, "m1", EvalSet("arena_hard", "q.jsonl", [], "question_id"),
                          tmp_path)
    assert paths[1] == tmp_path / "exports" / "arena_hard" / "model_answer" / "m1.jsonl"
    lines = [json.loads(line) for line in paths[1].read_text().splitlines()]
    assert len(lines) == 2
    first, failed = lines
    assert isinstance(first.pop("tstamp"), float)
    assert first == {"question_id": "q1", "answer_id": _answer_id("m1", "q1"),
                     "model_id": "m1",
                     "choices": [{"index": 0, "turns": [{"content": "# Hi\n- **there**",
                                                         "token_len": 5}]}],
                     "conv_metadata": {"token_len": 5, **HI_COUNTS}}
    assert failed["choices"][0]["turns"][0] == {"content": "", "token_len": 0}
    assert "secret" not in paths[1].read_text()


def test_arena_hard_v2_answers_field_by_field(tmp_path):
    paths = write_exports(ROWS[:1], "m1", EvalSet("arena_hard", "q.jsonl", [], "uid"), tmp_path)
    line = json.loads(paths[1].read_text())
    assert isinstance(line.pop("tstamp"), float)
    assert line == {"uid": "q1", "ans_id": _answer_id("m1", "q1"), "model": "m1",
                    "messages": [{"role": "user", "content": "Say hi"},
                                 {"role": "assistant",
                                  "content": {"answer": "# Hi\n- **there**"}}],
                    "metadata": {"token_len": 5, **HI_COUNTS}}
