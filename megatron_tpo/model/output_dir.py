"""A conversion's output directory, all or nothing.

Every ``tpo-convert`` direction writes into a temporary sibling of ``--out``
(``.<name>.partial-XXXX``, same file system) and renames it into place only after its
last file: a conversion that stops partway, for a damaged tensor or a full disk, leaves
neither ``--out`` nor the temporary sibling behind. A destination that already holds
files is refused unless ``overwrite`` is given: a TP1 conversion written over a TP2/PP2
one would otherwise leave the old rank folders beside the new ones.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

from megatron_tpo.config import ConfigError

PARTIAL_PREFIX = ".{name}.partial-"
REPLACED_PREFIX = ".{name}.replaced-"


def refuse_non_empty(out_dir: Path, overwrite: bool) -> None:
    """Stop before any work when ``out_dir`` already has content and ``overwrite`` is off."""
    out_dir = Path(out_dir)
    if overwrite or not out_dir.exists():
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    what = "is a file" if not out_dir.is_dir() else "exists and is not empty"
    raise ConfigError(f"{out_dir}: {what}; choose another --out, or pass --overwrite to "
                      "replace it once the conversion has finished")


def _missing_ancestors(directory: Path) -> List[Path]:
    """``directory`` and its parents that do not exist yet, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    return missing


@contextmanager
def staged_output(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out_dir`` to write into; on success it becomes
    ``out_dir`` (replacing an empty one, or any with ``overwrite``), on any error it is
    removed, with the parent folders this call created."""
    out_dir = Path(out_dir).absolute()
    refuse_non_empty(out_dir, overwrite)
    created = _missing_ancestors(out_dir.parent)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX.format(name=out_dir.name),
                                    dir=out_dir.parent))
    try:
        yield staging
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in created:  # deepest first; only those still empty
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        raise


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; what was there is set aside first and removed
    last, so a failure here never leaves a half-replaced directory."""
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(staging, out_dir)
        return
    if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.rename(staging, out_dir)
        return
    replaced = Path(tempfile.mkdtemp(prefix=REPLACED_PREFIX.format(name=out_dir.name),
                                     dir=out_dir.parent))
    set_aside = replaced / out_dir.name
    os.rename(out_dir, set_aside)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(set_aside, out_dir)
        shutil.rmtree(replaced, ignore_errors=True)
        raise
    shutil.rmtree(replaced, ignore_errors=True)
