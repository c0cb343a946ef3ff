"""The manifest records every file's size and sha256 and names the file that no longer matches.

Without a process group one process lists, hashes and checks everything; the
collective path is exercised by tests/checkpoint/test_checkpoint_training.py.
"""

import hashlib
import json

import pytest

from megatron_tpo.checkpoint.config import CheckpointError
from megatron_tpo.checkpoint.manifest import (FORMAT, MANIFEST, file_records, read_manifest,
                                              verify_files, write_manifest)


@pytest.fixture
def directory(tmp_path):
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "__0_0.distcp").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "state.json").write_text('{"step": 7}')
    write_manifest(tmp_path, 7, file_records(tmp_path))
    return tmp_path


def test_records_hold_every_file_but_the_manifest_with_hashlib_digests(directory):
    body = json.loads((directory / MANIFEST).read_text())
    assert body["format"] == FORMAT and body["step"] == 7
    data = (directory / "dist" / "__0_0.distcp").read_bytes()
    assert body["files"] == {
        "dist/__0_0.distcp": {"bytes": 10240, "sha256": hashlib.sha256(data).hexdigest()},
        "state.json": {"bytes": 11, "sha256": hashlib.sha256(b'{"step": 7}').hexdigest()},
    }
    verify_files(directory, read_manifest(directory))  # untouched: no error


@pytest.mark.parametrize("damage, says", [
    (lambda path: path.write_bytes(path.read_bytes()[:100]), "100 bytes, the manifest says 10240"),
    (lambda path: path.write_bytes(b"\x01" + path.read_bytes()[1:]), "sha256 differs"),
    (lambda path: path.unlink(), "missing"),
])
def test_a_truncated_altered_or_missing_file_is_named(directory, damage, says):
    target = directory / "dist" / "__0_0.distcp"
    damage(target)
    with pytest.raises(CheckpointError) as error:
        verify_files(directory, read_manifest(directory))
    assert f"{target}: " in str(error.value) and says in str(error.value)


def test_a_manifest_that_is_not_json_or_not_ours_is_named(directory):
    assert read_manifest(directory / "dist") is None  # no manifest: not a checkpoint
    (directory / MANIFEST).write_text('{"files": ')
    with pytest.raises(CheckpointError, match=f"{directory / MANIFEST}: corrupt manifest"):
        read_manifest(directory)
    (directory / MANIFEST).write_text('{"format": "other/1", "files": {}}')
    with pytest.raises(CheckpointError, match="not a megatron_tpo.training_checkpoint/1"):
        read_manifest(directory)
