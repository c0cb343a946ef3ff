"""Hugging Face safetensors checkpoints: lazy reading and sharded, indexed writing.

Reading opens every file memory-mapped and fetches one tensor at a time; writing plans
the shards from tensor sizes first, so shard names (``-00001-of-00004``) are known
before the first byte, then writes each shard as soon as its tensors are ready.
"""

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_tpo.config import ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class HFCheckpointReader:
    """Tensors of an HF checkpoint by name, read lazily from its safetensors files."""

    def __init__(self, hf_dir: Path):
        self.hf_dir = Path(hf_dir)
        index_path = self.hf_dir / INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ConfigError(f"{index_path}: not a safetensors index ({error})") from error
        elif (self.hf_dir / SINGLE_NAME).is_file():
            weight_map = None
        else:
            raise ConfigError(f"{self.hf_dir}: no {SINGLE_NAME} or {INDEX_NAME} "
                              "(only safetensors checkpoints are read)")
        self._handles = {}
        self.file_of: Dict[str, str] = {}
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        for file_name in files:
            handle = self._open(self.hf_dir / file_name)
            for name in handle.keys():
                self.file_of[name] = file_name
        if weight_map:
            missing = sorted(set(weight_map) - set(self.file_of))
            if missing:
                raise ConfigError(f"{index_path}: lists {missing[0]} (and {len(missing) - 1} more) "
                                  "that its files do not contain")

    def _open(self, path: Path):
        if path.name not in self._handles:
            if not path.is_file():
                raise ConfigError(f"{path}: listed in the index but missing")
            try:
                self._handles[path.name] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as error:
                raise ConfigError(f"{path}: unreadable safetensors file ({error})") from error
        return self._handles[path.name]

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def shape_of(self, name: str) -> Tuple[int, ...]:
        """A tensor's shape from its file's header, without reading its data."""
        if name not in self.file_of:
            raise ConfigError(f"{self.hf_dir}: checkpoint has no tensor {name}")
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def check_tensors(self, expected: Iterable[Tuple[str, Tuple[int, ...]]]) -> None:
        """Every ``(name, shape)`` present with that shape, from the headers alone: a
        conversion calls this before it writes anything."""
        for name, shape in expected:
            got = self.shape_of(name)   # first: it names a missing tensor
            check_shape(self.hf_dir / self.file_of[name], name, got, shape)

    def get(self, name: str, expected_shape: Tuple[int, ...] = None) -> torch.Tensor:
        if name not in self.file_of:
            raise ConfigError(f"{self.hf_dir}: checkpoint has no tensor {name}")
        file_name = self.file_of[name]
        try:
            tensor = self._handles[file_name].get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise ConfigError(f"{self.hf_dir / file_name}: cannot read {name} ({error})") from error
        if expected_shape is not None:
            check_shape(self.hf_dir / file_name, name, tensor.shape, expected_shape)
        return tensor


def check_shape(where, name: str, shape: Tuple[int, ...], expected: Tuple[int, ...]) -> None:
    """Refuse an HF tensor whose shape is not the one the model config implies."""
    if tuple(shape) != tuple(expected):
        raise ConfigError(f"{where}: {name} has shape {tuple(shape)}, "
                          f"the config implies {tuple(expected)}")


def atomic_save_file(tensors: Dict[str, torch.Tensor], path: Path, metadata=None) -> None:
    """Write a safetensors file under a temporary name, then rename it into place."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def plan_shards(sizes: Iterable[Tuple[str, int]], max_shard_bytes: int) -> List[List[str]]:
    """Group tensor names, in order, into shards of at most ``max_shard_bytes``.

    A tensor larger than the limit gets a shard of its own, as HF does.
    """
    shards: List[List[str]] = [[]]
    filled = 0
    for name, size in sizes:
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def shard_file_names(count: int) -> List[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(out_dir: Path, weight_map: Dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    temporary = Path(out_dir) / f".{INDEX_NAME}.tmp"
    temporary.write_text(json.dumps(index, indent=2))
    os.replace(temporary, Path(out_dir) / INDEX_NAME)
