"""A checkpoint directory's manifest: every file's size and sha256, written last.

The manifest is what makes a directory a checkpoint: it is written after every other
file, and a load first checks each listed file against it, so a truncated, altered or
missing file is reported by name before anything is read into the model. Hashing a
70B checkpoint (about 1 TB with Adam state) on one rank would take many minutes, so
under torch.distributed each rank hashes every world_size-th file and the results are
gathered; without a process group one process does it all.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from megatron_tpo.checkpoint.config import CheckpointError
from megatron_tpo.files import atomic_write, file_sha256
from megatron_tpo.parallel.collectives import broadcast_from_rank_zero, world

MANIFEST = "manifest.json"
FORMAT = "megatron_tpo.training_checkpoint/1"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gathered(value: Any) -> List[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not _distributed():
        return [value]
    values: List[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def _listed_files(directory: Path) -> List[str]:
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*")
                  if path.is_file() and path.name != MANIFEST)


def _my_share(names: List[str]) -> List[str]:
    rank, world_size = world()
    return names[rank::world_size]


def file_records(directory: Path) -> Dict[str, Dict[str, Any]]:
    """COLLECTIVE. ``{relative path: {"bytes", "sha256"}}`` of every file under ``directory``."""
    names = broadcast_from_rank_zero(_listed_files(directory))
    mine = {name: {"bytes": (directory / name).stat().st_size,
                   "sha256": file_sha256(directory / name)} for name in _my_share(names)}
    records: Dict[str, Dict[str, Any]] = {}
    for share in gathered(mine):
        records.update(share)
    return dict(sorted(records.items()))


def write_manifest(directory: Path, step: int, files: Dict[str, Dict[str, Any]]) -> None:
    body = {"format": FORMAT, "step": step, "files": files}
    atomic_write(directory / MANIFEST, lambda handle: handle.write(
        json.dumps(body, indent=1).encode()))


def read_manifest(directory: Path) -> Optional[Dict[str, Any]]:
    """The manifest of ``directory``, None if it has none; a malformed one is an error."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: corrupt manifest ({error})") from error
    if not isinstance(body, dict) or body.get("format") != FORMAT or "files" not in body:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    return body


def _problem(directory: Path, name: str, record: Dict[str, Any]) -> Optional[str]:
    path = directory / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{path}: {size} bytes, the manifest says {record['bytes']} (truncated or altered)"
    if file_sha256(path) != record["sha256"]:
        return f"{path}: sha256 differs from the manifest (altered)"
    return None


def verify_files(directory: Path, manifest: Dict[str, Any]) -> None:
    """COLLECTIVE. Raise ``CheckpointError`` on every rank if any listed file is wrong."""
    files = manifest["files"]
    mine = [_problem(directory, name, files[name]) for name in _my_share(sorted(files))]
    problems = sorted(problem for share in gathered(mine) for problem in share if problem)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {directory} fails its manifest: {problems[0]}{more}")
