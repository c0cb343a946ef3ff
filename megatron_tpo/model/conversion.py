"""Stream a Llama checkpoint between the HF layout and megatron per-rank shards.

Both directions go one layer at a time and write each layer before reading the next,
so converting 70B holds one layer's full tensors (plus, for HF output, the shard being
filled) rather than the model.
"""

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from tqdm import tqdm

from megatron_tpo.config import ConfigError, ParallelConfig
from megatron_tpo.model import llama_layout as layout
from megatron_tpo.model import mcore_shards as shards
from megatron_tpo.model.hf_checkpoint import (
    HFCheckpointReader, atomic_save_file, plan_shards, shard_file_names, write_index,
)
from megatron_tpo.model.hf_config import (
    hf_config_from_model, model_config_from_hf, read_hf_config_dict,
)
from megatron_tpo.model.output_dir import refuse_non_empty, staged_output

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass
class ConversionSummary:
    direction: str
    source: str
    destination: str
    tensors: int
    bytes_written: int
    files_written: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.direction}: {self.tensors} tensors, {self.bytes_written / 1e6:.1f} MB in "
                f"{self.files_written} files, {self.seconds:.1f} s -> {self.destination}")


def _copy_tokenizer(source: Path, destination: Path) -> None:
    present = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if present:
        destination.mkdir(parents=True, exist_ok=True)
        for name in present:
            shutil.copy2(source / name, destination / name)


class StreamSource:
    """``get(name)`` over an HF-ordered ``(name, tensor)`` stream, asked in the same order
    (megatron shards read back layer by layer)."""

    def __init__(self, stream: Iterator, checked_by: str):
        self.stream, self.buffer, self.checked_by = stream, {}, checked_by

    def check_tensors(self, expected) -> None:
        """Nothing to do: the stream's files were checked, from their headers, by
        ``checked_by`` before the stream was made."""

    def get(self, name: str, expected_shape=None) -> torch.Tensor:
        while name not in self.buffer:
            try:
                produced, tensor = next(self.stream)
            except StopIteration:
                raise ConfigError(f"source ended before {name}") from None
            self.buffer[produced] = tensor
        return self.buffer.pop(name)


def _hf_layer(reader: HFCheckpointReader, model, layer: int) -> Dict[str, torch.Tensor]:
    prefix = layout.hf_layer_prefix(layer)
    return {name: reader.get(prefix + name, shape)
            for name, shape in layout.hf_layer_shapes(model).items()}


def hf_to_mcore(hf_dir: Path, out_dir: Path, tp: int, pp: int,
                make_vocab_size_divisible_by: int = 128,
                progress: bool = True, overwrite: bool = False) -> ConversionSummary:
    """Convert an HF Llama directory into megatron shards for TP=``tp``, PP=``pp``.

    The vocab is padded to a multiple of ``make_vocab_size_divisible_by * tp``
    (megatron's default is 128) with zero rows.
    """
    hf_dir = Path(hf_dir)
    refuse_non_empty(out_dir, overwrite)
    raw_config = read_hf_config_dict(hf_dir)
    model = model_config_from_hf(raw_config, str(hf_dir / "config.json"), name=hf_dir.name)
    model.make_vocab_size_divisible_by = make_vocab_size_divisible_by
    return write_mcore_shards(HFCheckpointReader(hf_dir), model, out_dir, tp, pp,
                              raw_config=raw_config, tokenizer_dir=hf_dir, progress=progress,
                              direction="hf -> mcore", source=str(hf_dir), overwrite=overwrite)


def check_model_for_layout(model, tp: int = 1, pp: int = 1) -> None:
    """Every check the model builder runs, before a single tensor is read or written."""
    from megatron_tpo.model.llama import check_buildable

    check_buildable(model, ParallelConfig(tensor_model_parallel_size=tp,
                                          pipeline_model_parallel_size=pp))


def check_before_writing(source, model, out_dir: Path, overwrite: bool, tp: int = 1,
                         pp: int = 1) -> None:
    """What a conversion checks before it writes a byte: the destination, every check of
    the model builder, and every tensor's presence and shape (from the files' headers)."""
    refuse_non_empty(out_dir, overwrite)
    check_model_for_layout(model, tp, pp)
    source.check_tensors(layout.hf_model_shapes(model))


def write_mcore_shards(reader, model, out_dir: Path, tp: int, pp: int, raw_config: Dict,
                       tokenizer_dir: Path = None, progress: bool = True,
                       direction: str = "hf -> mcore", source: str = "",
                       overwrite: bool = False) -> ConversionSummary:
    """Write megatron shards from ``reader.get(hf_name, shape)`` (an HF-named source),
    one layer at a time, into a temporary sibling of ``out_dir`` renamed at the end."""
    started = time.perf_counter()
    check_before_writing(reader, model, out_dir, overwrite, tp, pp)
    with staged_output(out_dir, overwrite) as staging:
        written = _write_shards(reader, model, staging, tp, pp, raw_config, tokenizer_dir,
                                progress, direction)
    return ConversionSummary(direction, source, str(out_dir), written["tensors"],
                             written["bytes"], written["files"], time.perf_counter() - started)


def _write_shards(reader, model, out_dir: Path, tp: int, pp: int, raw_config: Dict,
                  tokenizer_dir, progress: bool, direction: str) -> Dict[str, int]:
    embedding = reader.get(layout.HF_EMBEDDING, (model.vocab_size, model.hidden_size))
    info = shards.ShardedCheckpointInfo(
        model=model, tensor_parallel_size=tp, pipeline_parallel_size=pp,
        padded_vocab_size=model.padded_vocab_size(tp),
        dtype=str(embedding.dtype).removeprefix("torch."),
    )
    (out_dir / "hf_config.json").write_text(json.dumps(raw_config, indent=2))
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), out_dir / "tokenizer")

    written = {"tensors": 0, "bytes": 0, "files": 0}

    def save(tensors: Dict[str, torch.Tensor], path: Path, tp_rank: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_file(tensors, path, metadata={"tp_rank": str(tp_rank), "tp_size": str(tp)})
        written["tensors"] += len(tensors)
        written["bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
        written["files"] += 1

    steps = tqdm(total=model.num_layers + 2, desc=direction, unit="part", disable=not progress)
    for tp_rank, shard in enumerate(layout.shard_vocab(embedding, info.padded_vocab_size, tp)):
        save({layout.EMBEDDING: shard}, shards.embedding_file(out_dir, tp_rank), tp_rank)
    del embedding
    steps.update()

    def convert_layer(layer: int) -> None:
        # A function of its own so the layer's tensors are freed before the next is read.
        prefix = layout.mcore_layer_prefix(layer)
        stage = info.stage_of_layer(layer)
        rank_shards = layout.shard_layer(_hf_layer(reader, model, layer), model, tp)
        for tp_rank, shard in enumerate(rank_shards):
            save({prefix + name: tensor for name, tensor in shard.items()},
                 shards.layer_file(out_dir, tp_rank, stage, layer), tp_rank)

    for layer in range(model.num_layers):
        convert_layer(layer)
        steps.update()
    norm = reader.get(layout.HF_FINAL_NORM, (model.hidden_size,))
    if model.tie_word_embeddings:
        # The output layer is the embedding: stored once, in the embedding files.
        for tp_rank in range(tp):
            save({layout.FINAL_NORM: norm}, shards.final_file(out_dir, tp_rank, info), tp_rank)
    else:
        output = reader.get(layout.HF_OUTPUT_LAYER, (model.vocab_size, model.hidden_size))
        for tp_rank, shard in enumerate(layout.shard_vocab(output, info.padded_vocab_size, tp)):
            save({layout.FINAL_NORM: norm, layout.OUTPUT_LAYER: shard},
                 shards.final_file(out_dir, tp_rank, info), tp_rank)
    steps.update()
    steps.close()
    shards.write_manifest(out_dir, info)
    return written


def _hf_names_and_sizes(model, element_size: int) -> List[tuple]:
    return [(name, math.prod(shape) * element_size)
            for name, shape in layout.hf_model_shapes(model)]


def _hf_tensors_in_order(root: Path, info: shards.ShardedCheckpointInfo):
    """Yield ``(hf_name, tensor)`` in HF order, reading one layer's TP shards at a time."""
    model, tp = info.model, info.tensor_parallel_size
    embeddings = [shards.load_shard_file(shards.embedding_file(root, r))[layout.EMBEDDING]
                  for r in range(tp)]
    yield layout.HF_EMBEDDING, layout.merge_vocab(embeddings, model.vocab_size)
    del embeddings
    for layer in range(model.num_layers):
        prefix = layout.mcore_layer_prefix(layer)
        stage = info.stage_of_layer(layer)
        rank_shards = []
        for tp_rank in range(tp):
            tensors = shards.load_shard_file(shards.layer_file(root, tp_rank, stage, layer))
            rank_shards.append({name[len(prefix):]: t for name, t in tensors.items()})
        for name, tensor in layout.merge_layer(rank_shards, model).items():
            yield layout.hf_layer_prefix(layer) + name, tensor
    finals = [shards.load_shard_file(shards.final_file(root, r, info)) for r in range(tp)]
    yield layout.HF_FINAL_NORM, finals[0][layout.FINAL_NORM]
    if model.tie_word_embeddings:
        return
    yield layout.HF_OUTPUT_LAYER, layout.merge_vocab([f[layout.OUTPUT_LAYER] for f in finals],
                                                     model.vocab_size)


@dataclass
class McoreCheckpoint:
    """A complete directory of megatron shards, opened for reading."""

    info: shards.ShardedCheckpointInfo
    weights: StreamSource   # its tensors merged over TP, in HF order
    tokenizer_dir: Optional[Path]


def open_mcore(mcore_dir: Path) -> McoreCheckpoint:
    """Read the manifest and check that every shard file it names is there, before any
    tensor is read."""
    mcore_dir = Path(mcore_dir)
    info = shards.read_manifest(mcore_dir)
    shards.check_complete(mcore_dir, info)
    tokenizer_dir = mcore_dir / "tokenizer"
    return McoreCheckpoint(
        info, StreamSource(_hf_tensors_in_order(mcore_dir, info), "mcore_shards.check_complete"),
        tokenizer_dir if tokenizer_dir.is_dir() else None)


def mcore_to_hf(mcore_dir: Path, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                progress: bool = True, overwrite: bool = False) -> ConversionSummary:
    """Convert megatron shards back into an HF directory (sharded safetensors + index)."""
    refuse_non_empty(out_dir, overwrite)
    checkpoint = open_mcore(mcore_dir)
    return write_hf_directory(
        checkpoint.weights, checkpoint.info.model, checkpoint.info.dtype, out_dir,
        base_config=shards.read_hf_config_copy(Path(mcore_dir)),
        tokenizer_dir=checkpoint.tokenizer_dir,
        max_shard_bytes=max_shard_bytes, progress=progress, direction="mcore -> hf",
        source=str(mcore_dir), overwrite=overwrite)


def write_hf_directory(tensor_source, model, dtype: str, out_dir: Path, base_config=None,
                       tokenizer_dir: Path = None,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                       direction: str = "mcore -> hf", source: str = "",
                       overwrite: bool = False) -> ConversionSummary:
    """Write an HF directory from ``tensor_source.get(hf_name, shape)``, asked in HF order,
    saving each safetensors shard as soon as its last tensor arrives, into a temporary
    sibling of ``out_dir`` renamed at the end."""
    started = time.perf_counter()
    check_before_writing(tensor_source, model, out_dir, overwrite)
    element_size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    sizes = _hf_names_and_sizes(model, element_size)
    plan = plan_shards(sizes, max_shard_bytes)
    with staged_output(out_dir, overwrite) as staging:
        total = _write_hf_shards(tensor_source, model, staging, plan, progress, direction)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), staging)
        hf_config = hf_config_from_model(model, base_config, torch_dtype=dtype)
        hf_config.save_pretrained(staging)
    return ConversionSummary(direction, source, str(out_dir), len(sizes), total,
                             len(plan), time.perf_counter() - started)


def _write_hf_shards(tensor_source, model, out_dir: Path, plan: List[List[str]], progress: bool,
                     direction: str) -> int:
    """The safetensors shards of ``plan`` (and their index); returns the bytes written."""
    file_names = shard_file_names(len(plan))
    file_of = {name: file_names[i] for i, names in enumerate(plan) for name in names}
    last_name_of_file = {names[-1]: file_names[i] for i, names in enumerate(plan)}
    pending: Dict[str, torch.Tensor] = {}
    total = 0
    shapes = layout.hf_model_shapes(model)
    steps = tqdm(total=len(shapes), desc=direction, unit="tensor", disable=not progress)
    for name, shape in shapes:
        tensor = tensor_source.get(name, shape)
        pending[name] = tensor
        total += tensor.numel() * tensor.element_size()
        if name in last_name_of_file:
            atomic_save_file(pending, out_dir / last_name_of_file[name],
                             metadata={"format": "pt"})
            pending = {}
        steps.update()
    steps.close()
    if len(plan) > 1:
        write_index(out_dir, file_of, total)
    return total
