"""JSON Lines read one object a line, every error naming the file and the line: the one
reader of prompt sets, evaluation sets and metrics files."""

import json
from pathlib import Path
from typing import Iterator, Tuple, Type

from megatron_tpo.config.errors import ConfigError


def json_objects(path: Path, error: Type[ConfigError] = ConfigError
                 ) -> Iterator[Tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line of ``path``; a line that is not a
    JSON object raises ``error`` naming ``path`` and the line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as problem:
                raise error(f"{path}:{number}: not valid JSON ({problem.msg})") from problem
            if not isinstance(record, dict):
                raise error(f"{path}:{number}: expected a JSON object, got "
                            f"{type(record).__name__}")
            yield number, record
