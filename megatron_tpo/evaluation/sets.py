"""Evaluation sets: AlpacaEval's 805 instructions, MT-Bench's 80 first turns, Arena-Hard's
questions, or any JSONL of instructions, read into one shape.

Nothing here is committed or downloaded at run time: ``fetch.py`` puts the public sets
under a directory (``tpo-eval fetch-sets``); Arena-Hard's question file is the user's.
A file that does not parse is reported by file and line before any work starts.

Spec strings (``--sets``): ``alpaca_eval`` and ``mt_bench`` (read from ``--sets-dir``),
``arena_hard=PATH`` (its ``question.jsonl``), ``NAME=PATH`` (JSONL with ``instruction``,
optional ``id``, ``category`` and ``output`` as a reference answer).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data.jsonl import json_objects

ALPACA_EVAL_FILE = "alpaca_eval.json"
MT_BENCH_FILE = "mt_bench.jsonl"
MT_BENCH_REFERENCE_FILE = "mt_bench_reference.jsonl"
BUILT_IN = ("alpaca_eval", "mt_bench")


class SetFileError(ConfigError):
    """An evaluation set file that cannot be read; the message names file and line."""


@dataclass(frozen=True)
class EvalItem:
    """One instruction of a set. ``reference`` is the set's own answer, when it has one
    (AlpacaEval's ``output``); ``category`` is AlpacaEval's ``dataset``, MT-Bench's and
    Arena-Hard's ``category``; ``index`` is the item's position in its file."""

    id: str
    instruction: str
    category: str = ""
    reference: Optional[str] = None
    index: int = 0


@dataclass(frozen=True)
class EvalSet:
    name: str
    path: str
    items: List[EvalItem]
    # The id field of the file's format ("question_id" for Arena-Hard v0.1, "uid" for v2):
    # the answer export writes the same format back.
    id_field: str = "id"


def _json_lines(path: Path):
    """(line number, object) of every non-blank line; a bad line raises SetFileError."""
    if not path.is_file():
        raise SetFileError(f"{path}: evaluation set not found (tpo-eval fetch-sets writes the "
                           "public ones)")
    yield from json_objects(path, SetFileError)


def _text(path: Path, number: int, record: dict, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise SetFileError(f"{path}:{number}: field {field!r} is missing or not a non-empty string")
    return value


def load_alpaca_eval(path: Path) -> EvalSet:
    """AlpacaEval's ``example/outputs.json``: a JSON list of ``instruction``, ``output`` (a
    reference answer), ``dataset`` (the source set, used as category)."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SetFileError(f"{path}: evaluation set not found (tpo-eval fetch-sets writes "
                           "it)") from None
    except json.JSONDecodeError as error:
        raise SetFileError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(records, list):
        raise SetFileError(f"{path}:1: expected a JSON list of AlpacaEval records")
    items = []
    for index, record in enumerate(records):
        where = f"record {index}"
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise SetFileError(f"{path}: {where} has no string 'instruction'")
        items.append(EvalItem(id=str(index), instruction=record["instruction"],
                              category=str(record.get("dataset", "")),
                              reference=record.get("output"), index=index))
    return EvalSet("alpaca_eval", str(path), items)


def load_mt_bench(path: Path, reference_path: Optional[Path] = None) -> EvalSet:
    """MT-Bench's questions (``question_id``, ``category``, ``turns``): the first turns, a
    single-turn set; GPT-4's reference answers (30 of 80) attached where present."""
    references = {}
    if reference_path is not None and reference_path.is_file():
        for number, record in _json_lines(reference_path):
            try:
                references[str(record["question_id"])] = record["choices"][0]["turns"][0]
            except (KeyError, IndexError, TypeError):
                raise SetFileError(f"{reference_path}:{number}: expected question_id and "
                                   "choices[0].turns[0]") from None
    items = []
    for number, record in _json_lines(path):
        turns = record.get("turns")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise SetFileError(f"{path}:{number}: field 'turns' must be a list of strings")
        question = str(record.get("question_id", number))
        items.append(EvalItem(id=question, instruction=turns[0],
                              category=str(record.get("category", "")),
                              reference=references.get(question), index=len(items)))
    return EvalSet("mt_bench", str(path), items, id_field="question_id")


def load_arena_hard(path: Path) -> EvalSet:
    """Arena-Hard's ``question.jsonl``: v0.1 (``question_id``, ``turns[0].content``) or
    v2.0 (``uid``, ``prompt``); ``category`` (v2: ``subcategory`` when present)."""
    items, id_field = [], None
    for number, record in _json_lines(path):
        if "uid" in record:
            fields = ("uid", _text(path, number, record, "prompt"))
        elif "question_id" in record:
            try:
                content = record["turns"][0]["content"]
            except (KeyError, IndexError, TypeError):
                raise SetFileError(f"{path}:{number}: expected turns[0].content") from None
            fields = ("question_id", content)
        else:
            raise SetFileError(f"{path}:{number}: neither 'uid' (Arena-Hard v2) nor "
                               "'question_id' (v0.1)")
        if id_field not in (None, fields[0]):
            raise SetFileError(f"{path}:{number}: mixes 'uid' and 'question_id' records")
        id_field = fields[0]
        category = record.get("subcategory") or record.get("category") or ""
        items.append(EvalItem(id=str(record[id_field]), instruction=fields[1],
                              category=str(category), index=len(items)))
    return EvalSet("arena_hard", str(path), items, id_field=id_field or "question_id")


def load_instruction_jsonl(name: str, path: Path) -> EvalSet:
    """Any JSONL: ``instruction`` required; ``id``, ``category``, ``output`` optional."""
    items = []
    for number, record in _json_lines(path):
        reference = record.get("output")
        if reference is not None and not isinstance(reference, str):
            raise SetFileError(f"{path}:{number}: field 'output' is not a string")
        items.append(EvalItem(id=str(record.get("id", len(items))),
                              instruction=_text(path, number, record, "instruction"),
                              category=str(record.get("category", "")), reference=reference,
                              index=len(items)))
    return EvalSet(name, str(path), items)


def load_eval_set(spec: str, sets_dir: Path) -> EvalSet:
    """One ``--sets`` entry (see the module docstring)."""
    name, equals, location = spec.partition("=")
    if not equals:
        if name == "alpaca_eval":
            return load_alpaca_eval(Path(sets_dir) / ALPACA_EVAL_FILE)
        if name == "mt_bench":
            return load_mt_bench(Path(sets_dir) / MT_BENCH_FILE,
                                 Path(sets_dir) / MT_BENCH_REFERENCE_FILE)
        raise ConfigError(f"--sets {spec}: not a built-in set ({', '.join(BUILT_IN)}); give "
                          "others as NAME=PATH (arena_hard=PATH for Arena-Hard's question.jsonl)")
    if not name.isidentifier():
        raise ConfigError(f"--sets {spec}: the set name {name!r} must be a plain identifier")
    path = Path(location)
    if name == "arena_hard":
        return load_arena_hard(path)
    if name == "alpaca_eval" and path.suffix == ".json":
        return load_alpaca_eval(path)
    if name == "mt_bench":
        return load_mt_bench(path, path.with_name(MT_BENCH_REFERENCE_FILE))
    return load_instruction_jsonl(name, path)
