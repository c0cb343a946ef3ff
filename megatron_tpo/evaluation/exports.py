"""A model's answers in the files the official tools read, responses only.

- AlpacaEval: ``model_outputs.json``, a list of ``instruction``, ``output``, ``generator``
  (and ``dataset``, ``datasplit`` where the set has them), for ``alpaca_eval
  --model_outputs``.
- Arena-Hard-Auto: one JSON line per question in ``model_answer/<generator>.jsonl``: for a
  v0.1 question file ``question_id``, ``answer_id``, ``model_id``, ``choices[0].turns[0]
  .content`` / ``token_len``, ``tstamp`` and ``conv_metadata`` (token length and markdown
  counts, which its style control reads); for v2.0 ``uid``, ``ans_id``, ``model``,
  ``messages`` (the answer as ``{"answer": ...}``), ``tstamp`` and ``metadata``.

An answer that did not parse is exported as an empty output: the hidden thought is never
written, and the raw output is not passed off as a response.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import List, Sequence

from megatron_tpo.evaluation.arena import markdown_counts
from megatron_tpo.evaluation.sets import EvalSet
from megatron_tpo.files import atomic_write


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(text.encode()))
    return path


def _response(row: dict) -> str:
    return row["response"] if row["parse_ok"] else ""


def alpaca_eval_outputs(rows: Sequence[dict], generator: str, eval_set: EvalSet) -> List[dict]:
    records = []
    for row in rows:
        record = {"instruction": row["instruction"], "output": _response(row),
                  "generator": generator}
        if eval_set.name == "alpaca_eval":
            record.update(dataset=row["category"], datasplit="eval")
        records.append(record)
    return records


def _answer_id(generator: str, question: str) -> str:
    # Deterministic, so a re-export writes the same file.
    return hashlib.sha256(f"{generator}/{question}".encode()).hexdigest()[:22]


def arena_hard_answers(rows: Sequence[dict], generator: str, eval_set: EvalSet,
                       timestamp: float) -> List[dict]:
    records = []
    for row in rows:
        answer = _response(row)
        tokens = row["response_tokens"] if row["parse_ok"] else 0
        metadata = {"token_len": tokens, **markdown_counts(answer)}
        if eval_set.id_field == "uid":
            records.append({"uid": row["id"], "ans_id": _answer_id(generator, row["id"]),
                            "model": generator,
                            "messages": [{"role": "user", "content": row["instruction"]},
                                         {"role": "assistant", "content": {"answer": answer}}],
                            "tstamp": timestamp, "metadata": metadata})
        else:
            records.append({"question_id": row["id"], "answer_id": _answer_id(generator, row["id"]),
                            "model_id": generator,
                            "choices": [{"index": 0, "turns": [{"content": answer,
                                                                "token_len": tokens}]}],
                            "tstamp": timestamp, "conv_metadata": metadata})
    return records


def write_exports(rows: Sequence[dict], generator: str, eval_set: EvalSet,
                  out_dir: Path) -> List[Path]:
    """Both formats for ``eval_set`` under ``out_dir/exports/<set>/``; returns the paths."""
    root = Path(out_dir) / "exports" / eval_set.name
    paths = [_write(root / generator / "model_outputs.json",
                    json.dumps(alpaca_eval_outputs(rows, generator, eval_set), indent=2,
                               ensure_ascii=False))]
    if eval_set.name == "arena_hard":
        lines = arena_hard_answers(rows, generator, eval_set, time.time())
        paths.append(_write(root / "model_answer" / f"{generator}.jsonl",
                            "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)))
    return paths
