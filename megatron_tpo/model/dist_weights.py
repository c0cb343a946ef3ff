"""Llama weights in a megatron-core ``torch_dist`` checkpoint, one layer at a time.

This is the weight store of NeMo 2 (``<ckpt>/weights``, keys prefixed ``module.``), of
NeMo 1 dist checkpoints (``model_weights/``, prefix ``model.``) and of Megatron-LM
(no prefix). Layers are *stacked*: ``decoder.layers.self_attention.linear_qkv.weight``
has shape ``[L, (nh + 2 ng) d, H]`` and layer ``i`` is the chunk at offset ``i`` of the
first axis. The norms carry Transformer Engine's fused names
(``linear_qkv.layer_norm_weight``). Global tensors are the TP=1 megatron tensors, so
``llama_layout``'s TP=1 shard/merge converts them to HF and back.

Reading asks torch DCP's reader for one layer's chunks only; writing saves one part
(embedding, a layer, the final norm and output) per ``torch.distributed.checkpoint``
save, then merges the parts' metadata into the single ``.metadata`` a loader reads.
Either way one layer's tensors are in memory at a time, and no process group is needed.
"""

import dataclasses
import io
import json
import os
import pickle
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megatron_tpo.config import ConfigError
from megatron_tpo.files import atomic_write, file_sha256
from megatron_tpo.model.llama_layout import EMBEDDING, TE_NAME_FOR_LOCAL

Tensor = torch.Tensor
LAYER_WEIGHTS = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                 "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
                 "input_layernorm.weight", "pre_mlp_layernorm.weight")
# Transformer Engine keeps FP8 bookkeeping per linear layer; loaders built on the TE spec
# request these entries, so a writer aimed at NeMo emits them (empty: no FP8 state).
EXTRA_STATE_MODULES = ("self_attention.core_attention", "self_attention.linear_qkv",
                       "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}
KNOWN_PREFIXES = ("module.", "model.", "")
# Written by this project next to the checkpoint files: torch DCP has no checksums, so
# without it a flipped byte inside a tensor goes unnoticed. Loaders ignore the file.
CHECKSUMS = "tpo_checksums.json"


@contextmanager
def _without_process_group_warning():
    # Conversions run in one process on purpose; torch warns that it assumes so.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_name(local_name: str) -> str:
    """The name a layer weight has in checkpoints (TE's fused norm names)."""
    return TE_NAME_FOR_LOCAL.get(local_name, local_name)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch DCP's ``.metadata`` (a pickle, so code could hide in it) allowing
    only the checkpoint metadata classes, ``torch.Size`` and dtypes. megatron-core's
    ``MCoreMetadata``/``MCoreSavePlan`` subclasses read as torch's own classes, so neither
    megatron nor its version is needed to read a NeMo checkpoint."""

    def find_class(self, module: str, name: str):
        from torch.distributed.checkpoint.metadata import Metadata
        from torch.distributed.checkpoint.planner import SavePlan

        if module == "megatron.core.dist_checkpointing.strategies.torch":
            stand_in = {"MCoreMetadata": Metadata, "MCoreSavePlan": SavePlan}.get(name)
            if stand_in is not None:
                return stand_in
        if module.startswith("torch.distributed.checkpoint.") or \
                (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"),
                                   ("collections", "OrderedDict")):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")


def read_dcp_metadata(weights_dir: Path):
    """torch DCP's ``Metadata`` of ``weights_dir``, with a named error when unreadable."""
    path = Path(weights_dir) / ".metadata"
    if not path.is_file():
        raise ConfigError(f"{path}: missing; {weights_dir} is not a torch_dist checkpoint")
    try:
        with open(path, "rb") as handle:
            return _MetadataUnpickler(handle).load()
    except Exception as error:  # pickle raises many types on a damaged file
        raise ConfigError(f"{path}: unreadable checkpoint metadata ({error})") from error


def _reader(weights_dir: Path, metadata):
    """torch's ``FileSystemReader`` that uses the metadata read (safely) above."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedMetadataReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedMetadataReader(str(weights_dir))


def _chunk_loader(offsets_of: Dict[str, Tuple[int, ...]]):
    from torch.distributed.checkpoint import DefaultLoadPlanner, LoadPlan
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class ChunkLoadPlanner(DefaultLoadPlanner):
        """Reads, for each key, only the region of the global tensor at ``offsets_of``."""

        def create_local_plan(self):
            requests = []
            for key, tensor in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets_of[key]),
                                             sizes=tensor.size())
                requests += create_read_items_for_chunk_list(
                    key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(requests)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]

    return ChunkLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


class DistWeightsReader:
    """The TP=1 megatron tensors of a torch_dist checkpoint, read one layer at a time.

    Accepts stacked keys (NeMo 2, megatron-core's default) and per-layer keys
    (``decoder.layers.<i>.``, with fc1 possibly split into ``weight_w``/``weight_v``), with
    TE or local norm names, under any of the prefixes ``module.``, ``model.`` or none.
    """

    def __init__(self, weights_dir: Path, num_layers: int, verify_checksums: bool = True):
        self.weights_dir = Path(weights_dir)
        self.num_layers = num_layers
        self.metadata = read_dcp_metadata(self.weights_dir)
        self.tensors = {key: md for key, md in self.metadata.state_dict_metadata.items()
                        if hasattr(md, "chunks")}
        self.prefix = next((p for p in KNOWN_PREFIXES if p + EMBEDDING in self.tensors), None)
        if self.prefix is None:
            raise ConfigError(f"{self.weights_dir}: no embedding.word_embeddings.weight under "
                              f"any of the prefixes {KNOWN_PREFIXES}; not a Llama checkpoint")
        self.stacked = self.prefix + "decoder.layers." + checkpoint_name(LAYER_WEIGHTS[0]) \
            in self.tensors
        self.check_files()
        if verify_checksums:  # off where only the metadata is needed and files are large
            self.verify_checksums()

    def check_files(self) -> None:
        """Every data file ``.metadata`` names exists and is long enough for its items:
        a missing or truncated file is named, with a tensor it holds, before any work."""
        sizes: Dict[str, int] = {}
        for index, info in self.metadata.storage_data.items():
            path = self.weights_dir / info.relative_path
            if info.relative_path not in sizes:
                if not path.is_file():
                    raise ConfigError(f"{path}: missing; it holds {index.fqn}")
                sizes[info.relative_path] = path.stat().st_size
            if info.offset + info.length > sizes[info.relative_path]:
                raise ConfigError(f"{path}: truncated to {sizes[info.relative_path]} bytes; "
                                  f"{index.fqn} needs bytes up to {info.offset + info.length}")

    def verify_checksums(self) -> None:
        """Every file listed in ``tpo_checksums.json`` hashes as listed (reads every byte)."""
        path = self.weights_dir / CHECKSUMS
        if not path.is_file():
            return  # checkpoints written by NeMo or megatron carry none
        try:
            expected = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: corrupt checksum list ({error})") from error
        for name, digest in expected.items():
            if file_sha256(self.weights_dir / name) != digest:
                held = sorted({i.fqn for i, info in self.metadata.storage_data.items()
                               if info.relative_path == name})
                raise ConfigError(f"{self.weights_dir / name}: checksum differs from {CHECKSUMS} "
                                  f"(altered or damaged); it holds {', '.join(held[:3]) or name}")

    def _key(self, name: str) -> str:
        key = self.prefix + name
        if key not in self.tensors:
            raise ConfigError(f"{self.weights_dir}: checkpoint has no tensor {key}")
        return key

    def _load(self, requests: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], object]]):
        """``{key: (offsets, sizes, dtype)}`` -> ``{key: tensor}`` read from the files."""
        import torch.distributed.checkpoint as dcp

        buffers = {key: torch.empty(sizes, dtype=dtype) for key, (_, sizes, dtype) in requests.items()}
        try:
            with _without_process_group_warning():
                dcp.load(buffers, storage_reader=_reader(self.weights_dir, self.metadata),
                         planner=_chunk_loader({k: r[0] for k, r in requests.items()}),
                         no_dist=True)
        except Exception as error:  # torch wraps reader errors in CheckpointException
            files = sorted({info.relative_path for index, info in self.metadata.storage_data.items()
                            if index.fqn in buffers})
            raise ConfigError(f"{self.weights_dir}: cannot read {', '.join(buffers)} from "
                              f"{', '.join(files)} ({str(error).strip()[-300:]})") from error
        return buffers

    def global_shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.tensors[self._key(name)].size)

    def read(self, name: str) -> Tensor:
        """A whole tensor outside the layers (embedding, final norm, output layer)."""
        key = self._key(name)
        md = self.tensors[key]
        return self._load({key: ((0,) * len(md.size), tuple(md.size), md.properties.dtype)})[key]

    def _layer_keys(self, layer: int, local_name: str) -> List[str]:
        """Checkpoint keys holding ``local_name`` of ``layer``; fc1 may be two halves."""
        for name in (checkpoint_name(local_name), local_name):
            key = self.prefix + (f"decoder.layers.{name}" if self.stacked
                                 else f"decoder.layers.{layer}.{name}")
            if key in self.tensors:
                return [key]
            if key + "_w" in self.tensors and key + "_v" in self.tensors:
                return [key + "_w", key + "_v"]  # megatron's per-layer gate/up split
        raise ConfigError(f"{self.weights_dir}: layer {layer} has no {checkpoint_name(local_name)}"
                          f" (stacked={self.stacked}, prefix={self.prefix!r})")

    def _layer_requests(self, layer: int):
        requests, keys_of = {}, {}
        for local_name in LAYER_WEIGHTS:
            keys_of[local_name] = self._layer_keys(layer, local_name)
            for key in keys_of[local_name]:
                md = self.tensors[key]
                size = tuple(md.size)
                if self.stacked:
                    if size[0] != self.num_layers:
                        raise ConfigError(f"{self.weights_dir}: {key} stacks {size[0]} layers, "
                                          f"the config has {self.num_layers}")
                    requests[key] = ((layer,) + (0,) * (len(size) - 1), (1,) + size[1:],
                                     md.properties.dtype)
                else:
                    requests[key] = ((0,) * len(size), size, md.properties.dtype)
        return requests, keys_of

    def read_layer(self, layer: int) -> Dict[str, Tensor]:
        """Layer ``layer``'s TP=1 megatron tensors, under ``llama_layout``'s local names."""
        if not 0 <= layer < self.num_layers:
            raise ConfigError(f"{self.weights_dir}: layer {layer} of {self.num_layers}")
        requests, names = self._layer_requests(layer)
        loaded = self._load(requests)
        tensors = {}
        for local_name, keys in names.items():
            parts = [loaded[key][0] if self.stacked else loaded[key] for key in keys]
            tensors[local_name] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        return tensors


class DistWeightsWriter:
    """Writes a stacked torch_dist checkpoint part by part; ``finish`` makes it loadable.

    Parts are saved as ``__<part>_0.distcp``; ``.metadata`` is written by ``finish`` from
    the merged metadata of all parts, then ``common.pt`` and ``metadata.json`` (the file
    megatron-core checks first), so an interrupted write is never taken for a checkpoint.
    """

    def __init__(self, weights_dir: Path, prefix: str, num_layers: int):
        self.weights_dir = Path(weights_dir)
        self.prefix, self.num_layers = prefix, num_layers
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("metadata.json", ".metadata", "common.pt", CHECKSUMS):
            (self.weights_dir / stale).unlink(missing_ok=True)
        self.part = 0
        self.state_dict_metadata, self.storage_data = {}, {}
        self.bytes_written = 0

    def write_part(self, tensors: Dict[str, Tuple[Tensor, Tuple[int, ...], Tuple[int, ...]]],
                   objects: Optional[Dict[str, object]] = None) -> None:
        """Save ``{key: (chunk, global_offsets, global_shape)}`` and byte objects as one file."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        scratch = self.weights_dir / f".part_{self.part}"
        shutil.rmtree(scratch, ignore_errors=True)
        state = {key: chunk for key, (chunk, _, _) in tensors.items()}
        for key, value in (objects or {}).items():
            buffer = io.BytesIO()
            torch.save(value, buffer)
            buffer.seek(0)
            state[key] = buffer
        with _without_process_group_warning():
            metadata = dcp.save(state, no_dist=True, storage_writer=FileSystemWriter(
                str(scratch), single_file_per_rank=True))
        file_name = f"__{self.part}_0.distcp"
        os.replace(scratch / "__0_0.distcp", self.weights_dir / file_name)
        shutil.rmtree(scratch)
        self._merge(metadata, tensors, file_name)
        self.bytes_written += sum(c.numel() * c.element_size() for c, _, _ in tensors.values())
        self.part += 1

    def _merge(self, metadata, tensors, file_name: str) -> None:
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata,
        )

        for index, info in metadata.storage_data.items():
            info = dataclasses.replace(info, relative_path=file_name)
            if index.fqn not in tensors:  # a byte object
                self.state_dict_metadata[index.fqn] = metadata.state_dict_metadata[index.fqn]
                self.storage_data[MetadataIndex(index.fqn)] = info
                continue
            chunk, offsets, global_shape = tensors[index.fqn]
            md = metadata.state_dict_metadata[index.fqn]
            merged = self.state_dict_metadata.setdefault(index.fqn, TensorStorageMetadata(
                properties=md.properties, size=torch.Size(global_shape), chunks=[]))
            merged.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                      sizes=chunk.size()))
            self.storage_data[MetadataIndex(index.fqn, torch.Size(offsets),
                                            len(merged.chunks) - 1)] = info

    def write_layer(self, layer: int, tensors: Dict[str, Tensor]) -> None:
        """One layer's TP=1 megatron tensors (``llama_layout``'s local names), stacked."""
        chunks = {}
        for local_name, tensor in tensors.items():
            key = f"{self.prefix}decoder.layers.{checkpoint_name(local_name)}"
            chunks[key] = (tensor.unsqueeze(0), (layer,) + (0,) * tensor.dim(),
                           (self.num_layers,) + tuple(tensor.shape))
        objects = {f"{self.prefix}decoder.layers.{module}._extra_state/"
                   f"shard_{layer}_{self.num_layers}": [None] for module in EXTRA_STATE_MODULES}
        self.write_part(chunks, objects)

    def write_whole(self, tensors: Dict[str, Tensor]) -> None:
        """Tensors outside the layers, saved whole under ``prefix + name``."""
        self.write_part({self.prefix + name: (t, (0,) * t.dim(), tuple(t.shape))
                         for name, t in tensors.items()})

    def finish(self, common: Optional[dict] = None) -> None:
        from torch.distributed.checkpoint.metadata import Metadata

        self._check_complete()
        metadata = Metadata(state_dict_metadata=self.state_dict_metadata,
                            storage_data=self.storage_data)
        _atomic_write_bytes(self.weights_dir / ".metadata", pickle.dumps(metadata))
        buffer = io.BytesIO()
        torch.save(common if common is not None else {"content_metadata": {}}, buffer)
        _atomic_write_bytes(self.weights_dir / "common.pt", buffer.getvalue())
        files = [f"__{part}_0.distcp" for part in range(self.part)] + [".metadata", "common.pt"]
        checksums = {name: file_sha256(self.weights_dir / name) for name in files}
        _atomic_write_bytes(self.weights_dir / CHECKSUMS, json.dumps(checksums, indent=1).encode())
        _atomic_write_bytes(self.weights_dir / "metadata.json",
                            json.dumps(METADATA_JSON).encode())

    def _check_complete(self) -> None:
        for key, md in self.state_dict_metadata.items():
            if not hasattr(md, "chunks"):
                continue
            covered = sum(torch.Size(c.sizes).numel() for c in md.chunks)
            if covered != md.size.numel():
                raise ConfigError(f"{self.weights_dir}: {key} has {covered} of "
                                  f"{md.size.numel()} elements written; the write is incomplete")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def load_into_model(gpt_model, weights_dir: Path, prefix: str = "module.") -> None:
    """Load a stacked dist checkpoint into this rank's ``GPTModel`` chunk with
    megatron-core's own ``dist_checkpointing.load``, resharding to the model's TP/PP.

    ``prefix`` is ``module.`` for NeMo 2, ``model.`` for NeMo 1 and empty for checkpoints
    written by ``tpo-convert hf-to-dist``. Megatron's local layers already map their norm
    names to Transformer Engine's in ``sharded_state_dict``, so either spec loads.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    sharded = gpt_model.sharded_state_dict(prefix=prefix)
    # FP8 bookkeeping, not weights: a checkpoint without it (or with other recipes) loads.
    sharded = {key: value for key, value in sharded.items() if "_extra_state" not in key}
    loaded = dist_checkpointing.load(sharded, str(weights_dir),
                                     strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    # `loaded` also holds common.pt's entries (not under the prefix, not tensors).
    state = {key[len(prefix):]: value for key, value in loaded.items()
             if key.startswith(prefix) and key in sharded}
    missing, unexpected = gpt_model.load_state_dict(state, strict=False)
    missing = [name for name in missing if "_extra_state" not in name]
    if missing or unexpected:
        raise ConfigError(f"{weights_dir}: does not match the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
