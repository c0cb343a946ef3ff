"""Reading ``metrics.jsonl`` back: one reader for the loop (summaries, plots) and for
``tpo-plan --check`` / ``--calibrate``. JSON only, so the planner stays free of torch."""

import json
from pathlib import Path
from typing import Dict, List, Union

from megatron_tpo.config.errors import ConfigError

METRICS_FILE = "metrics.jsonl"


def read_metric_records(path: Union[str, Path]) -> Dict[str, List[dict]]:
    """``{kind: [records in file order]}``; a malformed line is an error naming the file
    and the line. A missing file has no records."""
    path = Path(path)
    records: Dict[str, List[dict]] = {}
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{number}: not JSON ({error.msg})") from error
            if not isinstance(record, dict) or "kind" not in record:
                raise ConfigError(f"{path}:{number}: a metrics line needs a \"kind\"")
            records.setdefault(record["kind"], []).append(record)
    return records
