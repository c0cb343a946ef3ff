"""data/jsonl.py: one object a line, blank lines skipped, every error naming file and line."""

import pytest

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data.jsonl import json_objects


def test_objects_come_with_their_line_numbers_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"b": [2, 3]}\n')
    assert list(json_objects(path)) == [(1, {"a": 1}), (4, {"b": [2, 3]})]


@pytest.mark.parametrize("line, problem", [
    ('{"a": ', "not valid JSON (Expecting value)"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got str"),
])
def test_a_broken_line_is_an_error_naming_the_file_and_its_line(tmp_path, line, problem):
    path = tmp_path / "set.jsonl"
    path.write_text('{"ok": 1}\n\n' + line + "\n")
    reader = json_objects(path)
    assert next(reader) == (1, {"ok": 1})   # lines before the bad one are still read
    with pytest.raises(ConfigError) as error:
        next(reader)
    assert str(error.value) == f"{path}:3: {problem}"


def test_the_caller_chooses_the_error_class(tmp_path):
    class SetFileError(ConfigError):
        pass

    path = tmp_path / "set.jsonl"
    path.write_text("nope\n")
    with pytest.raises(SetFileError, match=r"set\.jsonl:1: not valid JSON"):
        list(json_objects(path, SetFileError))
