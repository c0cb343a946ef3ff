"""Reading ``metrics.jsonl`` back: one reader for the loop (summaries, plots) and for
``tpo-plan --check`` / ``--calibrate``. JSON only, so the planner stays free of torch."""

from pathlib import Path
from typing import Dict, List, Union

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data.jsonl import json_objects

METRICS_FILE = "metrics.jsonl"


def read_metric_records(path: Union[str, Path]) -> Dict[str, List[dict]]:
    """``{kind: [records in file order]}``; a malformed line is an error naming the file
    and the line. A missing file has no records."""
    path = Path(path)
    records: Dict[str, List[dict]] = {}
    if not path.is_file():
        return records
    for number, record in json_objects(path):
        if "kind" not in record:
            raise ConfigError(f"{path}:{number}: a metrics line needs a \"kind\"")
        records.setdefault(record["kind"], []).append(record)
    return records
