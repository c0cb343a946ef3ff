"""model/output_dir.py on a tmp dir: a conversion's output appears whole or not at all,
with no staging sibling left behind; a destination with files is refused before any work
unless overwrite is given, and then replaced whole."""

import pytest

from megatron_tpo.config import ConfigError
from megatron_tpo.model.output_dir import refuse_non_empty, staged_output


def _write_into(directory, *names):
    for name in names:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(name)


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_success_renames_the_staging_dir_into_place(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with staged_output(out) as staging:
        assert staging.parent == out.parent and staging.name.startswith(".out.partial-")
        assert not out.exists()
        _write_into(staging, "config.json", "mp_rank_00/w.pt")
    assert _tree(tmp_path) == ["a", "a/b", "a/b/out", "a/b/out/config.json",
                               "a/b/out/mp_rank_00", "a/b/out/mp_rank_00/w.pt"]


def test_a_failure_leaves_nothing_not_even_the_parents_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="damaged tensor"):
        with staged_output(tmp_path / "kept" / "new" / "deeper" / "out") as staging:
            _write_into(staging, "half.pt")
            raise RuntimeError("damaged tensor")
    assert _tree(tmp_path) == ["kept"]


def test_a_full_destination_is_refused_before_any_work_unless_overwritten(tmp_path):
    out = tmp_path / "out"
    _write_into(out, "old/rank_folder.pt")
    entered = []
    with pytest.raises(ConfigError, match="out: exists and is not empty; choose another --out, "
                                          "or pass --overwrite"):
        with staged_output(out):
            entered.append(True)
    assert entered == [] and _tree(out) == ["old", "old/rank_folder.pt"]

    with staged_output(out, overwrite=True) as staging:
        _write_into(staging, "new.pt")
    assert _tree(tmp_path) == ["out", "out/new.pt"]   # the old folders are gone, no set-aside


def test_an_empty_destination_is_replaced_and_a_file_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    refuse_non_empty(empty, overwrite=False)
    with staged_output(empty) as staging:
        _write_into(staging, "w.pt")
    assert _tree(empty) == ["w.pt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="file: is a file"):
        refuse_non_empty(a_file, overwrite=False)
    refuse_non_empty(a_file, overwrite=True)
