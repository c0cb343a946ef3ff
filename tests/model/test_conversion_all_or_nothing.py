"""A conversion writes its whole output or nothing: damaged input is caught from the files'
headers before a byte is written, a failure partway leaves neither --out nor a temporary
sibling, and a non-empty --out is refused unless --overwrite (which then replaces it whole)."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from file_damage import truncate
from llama_fixtures import save_random_hf_llama, tiny_model_config
from megatron_tpo.cli.convert import main as convert_main
from megatron_tpo.config import ConfigError
from megatron_tpo.model import conversion, mcore_shards
from megatron_tpo.model.hf_checkpoint import INDEX_NAME
from megatron_tpo.model.nemo import hf_to_dist, hf_to_nemo

LAST_LAYER_DOWN = "model.layers.3.mlp.down_proj.weight"  # the tiny model has 4 layers


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return save_random_hf_llama(tiny_model_config(), tmp_path_factory.mktemp("source") / "hf")


@pytest.fixture(scope="module")
def tiny_mcore(tmp_path_factory, tiny_hf) -> Path:
    out = tmp_path_factory.mktemp("mcore") / "tp2_pp2"
    conversion.hf_to_mcore(tiny_hf, out, 2, 2, progress=False)
    return out


def copy_hf(source: Path, destination: Path) -> Path:
    destination.mkdir(parents=True)
    for path in source.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


def file_holding(hf_dir: Path, name: str) -> Path:
    weight_map = json.loads((hf_dir / INDEX_NAME).read_text())["weight_map"]
    return hf_dir / weight_map[name]


def rewrite_tensor(hf_dir: Path, name: str, change) -> None:
    """Rewrite the safetensors file holding ``name`` with ``change(tensors)`` applied."""
    path = file_holding(hf_dir, name)
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def wrong_shape(hf_dir: Path) -> None:
    rewrite_tensor(hf_dir, LAST_LAYER_DOWN,
                   lambda tensors: tensors.update(
                       {LAST_LAYER_DOWN: tensors[LAST_LAYER_DOWN][:, :-1].contiguous()}))


def missing_tensor(hf_dir: Path) -> None:
    """Gone from its file and from the index: a checkpoint consistent in itself, short of
    one tensor of its last layer."""
    rewrite_tensor(hf_dir, LAST_LAYER_DOWN, lambda tensors: tensors.pop(LAST_LAYER_DOWN))
    index = json.loads((hf_dir / INDEX_NAME).read_text())
    del index["weight_map"][LAST_LAYER_DOWN]
    (hf_dir / INDEX_NAME).write_text(json.dumps(index))


def truncated_file(hf_dir: Path) -> None:
    truncate(file_holding(hf_dir, LAST_LAYER_DOWN))


def assert_nothing_left(out: Path) -> None:
    """Neither the destination nor a temporary sibling of it exists."""
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    siblings = out.parent.iterdir() if out.parent.exists() else []
    leftovers = [p.name for p in siblings if out.name in p.name]
    assert leftovers == [], leftovers


HF_DIRECTIONS = {
    "hf-to-mcore": lambda hf, out: conversion.hf_to_mcore(hf, out, 2, 2, progress=False),
    "hf-to-nemo": lambda hf, out: hf_to_nemo(hf, out, progress=False),
    "hf-to-dist": lambda hf, out: hf_to_dist(hf, out, progress=False),
}


@pytest.mark.parametrize("damage, message", [
    (wrong_shape, r"mlp.down_proj.weight has shape \(64, 175\), the config implies \(64, 176\)"),
    (missing_tensor, r"no tensor model.layers.3.mlp.down_proj.weight"),
    (truncated_file, r"unreadable safetensors file"),
])
@pytest.mark.parametrize("direction", sorted(HF_DIRECTIONS))
def test_damaged_hf_source_is_named_and_nothing_is_written(tmp_path, tiny_hf, damage, message,
                                                           direction):
    source = copy_hf(tiny_hf, tmp_path / "hf")
    damage(source)
    out = tmp_path / "converted" / "out"
    with pytest.raises(ConfigError, match=message):
        HF_DIRECTIONS[direction](source, out)
    assert_nothing_left(out)
    assert not out.parent.exists()  # the parent folder the conversion would have made


def test_damaged_megatron_shard_is_named_before_anything_is_written(tmp_path, tiny_mcore):
    damaged = tmp_path / "mcore"
    damaged.mkdir()
    for path in tiny_mcore.rglob("*"):
        if path.is_file():
            target = damaged / path.relative_to(tiny_mcore)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    # The last file the conversion would read: final norm and output layer of TP rank 1.
    final = damaged / "tp01_pp001" / "final.safetensors"
    tensors = load_file(str(final))
    tensors[mcore_shards.OUTPUT_LAYER] = tensors[mcore_shards.OUTPUT_LAYER][:, :8].contiguous()
    save_file(tensors, str(final))
    for command in ("mcore-to-hf", "mcore-to-nemo"):
        out = tmp_path / command
        assert convert_main([command, "--mcore", str(damaged), "--out", str(out), "--quiet"]) == 2
        assert_nothing_left(out)


def test_a_failure_partway_leaves_nothing_and_keeps_what_was_there(tmp_path, tiny_hf,
                                                                   monkeypatch, capsys):
    out = tmp_path / "out"
    assert convert_main(["hf-to-mcore", "--hf", str(tiny_hf), "--out", str(out), "--tp", "2",
                         "--pp", "2", "--quiet"]) == 0
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    saved = []
    original = conversion.atomic_save_file

    def disk_full_at_the_fifth_file(tensors, path, metadata=None):
        if len(saved) == 4:
            raise OSError(28, "No space left on device")
        saved.append(path)
        original(tensors, path, metadata)

    monkeypatch.setattr(conversion, "atomic_save_file", disk_full_at_the_fifth_file)
    with pytest.raises(OSError, match="No space left"):
        conversion.hf_to_mcore(tiny_hf, out, 1, 1, progress=False, overwrite=True)
    assert len(saved) == 4  # it did write, into the temporary sibling
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_non_empty_destination_is_refused_unless_overwrite_replaces_it_whole(
        tmp_path, tiny_hf, capsys):
    out = tmp_path / "out"
    convert = ["hf-to-mcore", "--hf", str(tiny_hf), "--out", str(out), "--quiet"]
    assert convert_main(convert + ["--tp", "2", "--pp", "2"]) == 0
    capsys.readouterr()
    assert convert_main(convert) == 2
    error = capsys.readouterr().err
    assert f"tpo-convert: error: {out}: exists and is not empty" in error
    assert "--overwrite" in error
    assert sorted(p.name for p in out.glob("tp*")) == ["tp00_pp000", "tp00_pp001",
                                                      "tp01_pp000", "tp01_pp001"]
    assert convert_main(convert + ["--overwrite"]) == 0
    # The TP1 conversion alone: no rank folder of the TP2/PP2 one is left beside it.
    assert sorted(p.name for p in out.glob("tp*")) == ["tp00_pp000"]
    assert mcore_shards.read_manifest(out).tensor_parallel_size == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_empty_destination_folder_is_filled(tmp_path, tiny_hf):
    out = tmp_path / "made_by_the_scheduler"
    out.mkdir()
    hf_to_dist(tiny_hf, out, progress=False)
    assert (out / "metadata.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
