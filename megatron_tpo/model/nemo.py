"""NeMo checkpoints of Llama in and out, without nemo-toolkit.

Reads a NeMo 2 directory (``context/`` + ``weights/``) or a NeMo 1 ``.nemo`` tarball
(``model_config.yaml`` + ``model_weights/``, a megatron dist checkpoint), and writes
NeMo 2 directories: ``context/{io.json, model.yaml, nemo_tokenizer/}`` and
``weights/{.metadata, __*_0.distcp, common.pt, metadata.json}``. Every conversion goes
through HF-named tensors one layer at a time (``get(hf_name, shape)`` sources), so the
HF and megatron-shard writers of ``conversion`` are reused and memory holds one layer.
"""

import json
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from tqdm import tqdm

from megatron_tpo.config import ConfigError, ModelConfig
from megatron_tpo.model import llama_layout as layout
from megatron_tpo.model.conversion import (
    ConversionSummary, _copy_tokenizer, check_before_writing,
    check_model_for_layout, open_mcore, write_hf_directory, write_mcore_shards,
)
from megatron_tpo.model.dist_weights import DistWeightsReader, DistWeightsWriter
from megatron_tpo.model.hf_checkpoint import HFCheckpointReader
from megatron_tpo.model.hf_config import hf_config_from_model, model_config_from_hf, read_hf_config_dict
from megatron_tpo.model.nemo1_rank_files import (
    RankFilesSource, find_rank_files, padded_vocab_rows,
)
from megatron_tpo.model.nemo_config import (
    TOKENIZER_DIR, llama_config_from_io_json, model_config_from_nemo1, model_config_from_nemo2,
    nemo2_io_json, nemo2_model_yaml, read_yaml,
)
from megatron_tpo.model.output_dir import refuse_non_empty, staged_output

NEMO2_PREFIX = "module."
COMPLETE_MARKER = Path("weights") / "metadata.json"


@dataclass
class NemoCheckpoint:
    """An opened NeMo checkpoint: its model, an HF-named tensor source, its tokenizer."""

    model: ModelConfig
    weights: "NemoTensorSource"
    tokenizer_dir: Optional[Path]
    dtype: str
    source: str


def _megatron_layer_shapes(model: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """TP=1 megatron shape of each layer weight, derived from the HF table."""
    hf = layout.hf_layer_shapes(model)
    hidden = model.hidden_size
    qkv_rows = sum(hf[f"self_attn.{p}_proj.weight"][0] for p in "qkv")
    return {
        "self_attention.linear_qkv.weight": (qkv_rows, hidden),
        "self_attention.linear_proj.weight": hf["self_attn.o_proj.weight"],
        "mlp.linear_fc1.weight": (2 * model.ffn_hidden_size, hidden),
        "mlp.linear_fc2.weight": hf["mlp.down_proj.weight"],
        **{local: hf[hf_name] for local, hf_name in layout.REPLICATED_LAYER_WEIGHTS.items()},
    }


class NemoTensorSource:
    """HF-named tensors of a dist checkpoint; keeps the one layer last asked for."""

    def __init__(self, reader: DistWeightsReader, model: ModelConfig):
        self.reader, self.model = reader, model
        self._layer, self._tensors = None, {}

    def check_shapes(self) -> None:
        """Compare every tensor's global shape with the config, before anything is written."""
        model, reader = self.model, self.reader
        # A tied model's checkpoint holds the embedding alone (megatron's last stage maps
        # its output layer to the embedding's key).
        vocab_tables = (layout.EMBEDDING,) if model.tie_word_embeddings else (
            layout.EMBEDDING, layout.OUTPUT_LAYER)
        for name in vocab_tables:
            rows, hidden = reader.global_shape(name)
            if hidden != model.hidden_size or rows < model.vocab_size:
                self._shape_error(name, (rows, hidden), f"({model.vocab_size}+, {model.hidden_size})")
        if reader.global_shape(layout.FINAL_NORM) != (model.hidden_size,):
            self._shape_error(layout.FINAL_NORM, reader.global_shape(layout.FINAL_NORM),
                              (model.hidden_size,))
        # Stacked keys hold every layer; per-layer keys are checked layer by layer.
        layers = [0] if reader.stacked else range(model.num_layers)
        for layer in layers:
            for local_name, shape in _megatron_layer_shapes(model).items():
                for key in reader._layer_keys(layer, local_name):
                    got = tuple(reader.tensors[key].size)
                    expected = ((model.num_layers,) + shape) if reader.stacked else shape
                    if got != expected and not key.endswith(("_w", "_v")):
                        self._shape_error(key[len(reader.prefix):], got, expected)

    def check_tensors(self, expected) -> None:
        """Every tensor present at the config's shape (from ``.metadata``; done at open,
        and again here, cheaply, for the writers' common check)."""
        self.check_shapes()

    def _shape_error(self, name, got, expected):
        raise ConfigError(f"{self.reader.weights_dir}: {self.reader.prefix}{name} has shape "
                          f"{tuple(got)}, the config implies {expected}; a checkpoint of "
                          "another model shape?")

    def get(self, name: str, expected_shape=None) -> torch.Tensor:
        if name in (layout.HF_EMBEDDING, layout.HF_OUTPUT_LAYER):
            rows = self.reader.read(layout.EMBEDDING if name == layout.HF_EMBEDDING
                                    else layout.OUTPUT_LAYER)
            # Slicing, not merge_vocab's concatenation: one vocab-sized copy fewer.
            return rows if rows.shape[0] == self.model.vocab_size \
                else rows[: self.model.vocab_size].clone()
        if name == layout.HF_FINAL_NORM:
            return self.reader.read(layout.FINAL_NORM)
        layer = int(name.split(".")[2])
        if layer != self._layer:
            self._tensors = {}  # free the previous layer before reading the next
            self._tensors = layout.merge_layer([self.reader.read_layer(layer)], self.model)
            self._layer = layer
        return self._tensors.pop(name[len(layout.hf_layer_prefix(layer)):])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _open_dist(weights_dir: Path, model_of, source: str, tokenizer_dir) -> NemoCheckpoint:
    reader = DistWeightsReader(weights_dir, num_layers=0)
    embedding_rows = reader.global_shape(layout.EMBEDDING)[0]
    model = model_of(embedding_rows)
    reader.num_layers = model.num_layers
    tensors = NemoTensorSource(reader, model)
    tensors.check_shapes()
    dtype = _dtype_name(reader.tensors[reader.prefix + layout.EMBEDDING].properties.dtype)
    return NemoCheckpoint(model, tensors, tokenizer_dir, dtype, source)


def _tokenizer_vocab_size(tokenizer_dir: Path) -> Optional[int]:
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        return None
    body = json.loads(path.read_text())
    return len(body["model"]["vocab"]) + len(body.get("added_tokens", []))


def open_nemo2(nemo_dir: Path) -> NemoCheckpoint:
    """Open a NeMo 2 checkpoint directory; the config comes from ``context/model.yaml``
    (as NeMo's exporters read it), or from ``context/io.json`` when that is missing."""
    nemo_dir = Path(nemo_dir)
    context, weights = nemo_dir / "context", nemo_dir / "weights"
    if not weights.is_dir():
        raise ConfigError(f"{nemo_dir}: no weights/ directory; not a NeMo 2 checkpoint")
    if (context / "model.yaml").is_file():
        config, source = read_yaml(context / "model.yaml").get("config") or {}, context / "model.yaml"
    else:
        config, source = llama_config_from_io_json(context / "io.json"), context / "io.json"
    tokenizer_dir = context / TOKENIZER_DIR
    tokenizer_dir = tokenizer_dir if tokenizer_dir.is_dir() else None
    return _open_dist(weights, lambda rows: model_config_from_nemo2(config, str(source), rows),
                      str(nemo_dir), tokenizer_dir)


def open_nemo1(nemo_file: Path, work_dir: Path) -> NemoCheckpoint:
    """Unpack a NeMo 1 ``.nemo`` tarball (plain tar, or gzip) into ``work_dir`` and open
    its ``model_weights/`` dist checkpoint (keys prefixed ``model.``) or, in older files,
    its per-rank ``model_weights.ckpt`` state dicts (``nemo1_rank_files``)."""
    nemo_file = Path(nemo_file)
    try:
        with tarfile.open(nemo_file, "r:*") as archive:
            archive.extractall(work_dir, filter="data")  # refuses links and paths outside
    except (tarfile.TarError, OSError) as error:
        raise ConfigError(f"{nemo_file}: not a readable .nemo tarball ({error})") from error
    config = read_yaml(work_dir / "model_config.yaml")
    source = f"{nemo_file}:model_config.yaml"
    weights = work_dir / "model_weights"
    if weights.is_dir():
        return _open_dist(weights, lambda rows: model_config_from_nemo1(config, source, rows),
                          str(nemo_file), None)
    rank_files = find_rank_files(work_dir)
    if not rank_files:
        raise ConfigError(f"{nemo_file}: neither a model_weights/ dist checkpoint nor "
                          "per-rank model_weights.ckpt files")
    model = model_config_from_nemo1(config, source, padded_vocab_rows(rank_files))
    tensors = RankFilesSource(rank_files, model)
    dtype = _dtype_name(tensors.get(layout.HF_FINAL_NORM).dtype)
    return NemoCheckpoint(model, tensors, None, dtype, str(nemo_file))


def open_nemo(path: Path, work_dir: Path) -> NemoCheckpoint:
    """A NeMo 2 directory or a NeMo 1 ``.nemo`` file."""
    path = Path(path)
    if path.is_dir():
        return open_nemo2(path)
    if path.is_file():
        return open_nemo1(path, Path(work_dir))
    raise ConfigError(f"{path}: no such NeMo checkpoint")


def nemo_to_hf(nemo_path: Path, out_dir: Path, max_shard_bytes: int = 5 * 1024**3,
               progress: bool = True, overwrite: bool = False) -> ConversionSummary:
    """A NeMo checkpoint -> an HF directory (padding rows of the vocab dropped)."""
    refuse_non_empty(out_dir, overwrite)
    with tempfile.TemporaryDirectory(prefix="nemo1-") as work_dir:
        checkpoint = open_nemo(nemo_path, work_dir)
        return write_hf_directory(checkpoint.weights, checkpoint.model, checkpoint.dtype, out_dir,
                                  tokenizer_dir=checkpoint.tokenizer_dir,
                                  max_shard_bytes=max_shard_bytes, progress=progress,
                                  direction="nemo -> hf", source=checkpoint.source,
                                  overwrite=overwrite)


def nemo_to_mcore(nemo_path: Path, out_dir: Path, tp: int, pp: int,
                  progress: bool = True, overwrite: bool = False) -> ConversionSummary:
    """A NeMo checkpoint -> megatron per-rank shards for TP=``tp``, PP=``pp``."""
    refuse_non_empty(out_dir, overwrite)
    with tempfile.TemporaryDirectory(prefix="nemo1-") as work_dir:
        checkpoint = open_nemo(nemo_path, work_dir)
        raw_config = hf_config_from_model(checkpoint.model, torch_dtype=checkpoint.dtype).to_dict()
        return write_mcore_shards(checkpoint.weights, checkpoint.model, out_dir, tp, pp,
                                  raw_config=raw_config, tokenizer_dir=checkpoint.tokenizer_dir,
                                  progress=progress, direction="nemo -> mcore",
                                  source=checkpoint.source, overwrite=overwrite)


def write_dist_checkpoint(source, model: ModelConfig, weights_dir: Path, prefix: str,
                          progress: bool = True, direction: str = "-> dist",
                          source_name: str = "") -> ConversionSummary:
    """Stacked megatron dist checkpoint from an HF-named ``source``, one layer at a time."""
    started = time.perf_counter()
    check_model_for_layout(model)
    writer = DistWeightsWriter(weights_dir, prefix, model.num_layers)
    steps = tqdm(total=model.num_layers + 2, desc=direction, unit="part", disable=not progress)
    hidden = model.hidden_size
    writer.write_whole({layout.EMBEDDING: source.get(layout.HF_EMBEDDING, (model.vocab_size, hidden))})
    steps.update()
    for layer in range(model.num_layers):
        prefix_hf = layout.hf_layer_prefix(layer)
        hf = {name: source.get(prefix_hf + name, shape)
              for name, shape in layout.hf_layer_shapes(model).items()}
        writer.write_layer(layer, layout.shard_layer(hf, model, 1)[0])
        del hf
        steps.update()
    last = {layout.FINAL_NORM: source.get(layout.HF_FINAL_NORM, (hidden,))}
    if not model.tie_word_embeddings:   # tied: the embedding is the output layer, stored once
        last[layout.OUTPUT_LAYER] = source.get(layout.HF_OUTPUT_LAYER, (model.vocab_size, hidden))
    writer.write_whole(last)
    steps.update()
    steps.close()
    writer.finish()
    tensors = (1 + len(last) + model.num_layers * len(layout.REPLICATED_LAYER_WEIGHTS)
               + model.num_layers * 4)
    return ConversionSummary(direction, source_name, str(weights_dir), tensors,
                             writer.bytes_written, writer.part + 3, time.perf_counter() - started)


def _write_context(context: Path, model: ModelConfig, dtype: str, tokenizer_dir) -> None:
    import yaml

    context.mkdir(parents=True, exist_ok=True)
    (context / "io.json").write_text(json.dumps(nemo2_io_json(model, dtype), indent=2))
    (context / "model.yaml").write_text(yaml.safe_dump(nemo2_model_yaml(model, dtype)))
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), context / TOKENIZER_DIR)
        generation = Path(tokenizer_dir) / "generation_config.json"
        if generation.is_file():
            (context / "artifacts").mkdir(exist_ok=True)
            shutil.copy2(generation, context / "artifacts" / generation.name)


def write_nemo2(source, model: ModelConfig, dtype: str, out_dir: Path, tokenizer_dir=None,
                progress: bool = True, direction: str = "-> nemo",
                source_name: str = "", overwrite: bool = False) -> ConversionSummary:
    """A NeMo 2 directory from an HF-named tensor ``source``; the config is checked as
    the model builder checks it, and every tensor's shape, before the first byte is
    written, into a temporary sibling of ``out_dir`` renamed at the end."""
    check_before_writing(source, model, out_dir, overwrite)
    with staged_output(out_dir, overwrite) as staging:
        summary = write_dist_checkpoint(source, model, staging / "weights", NEMO2_PREFIX,
                                        progress, direction, source_name)
        _write_context(staging / "context", model, dtype, tokenizer_dir)
    summary.destination = str(out_dir)
    return summary


def hf_to_nemo(hf_dir: Path, out_dir: Path, progress: bool = True,
               overwrite: bool = False) -> ConversionSummary:
    """An HF Llama directory -> a NeMo 2 checkpoint directory."""
    hf_dir = Path(hf_dir)
    refuse_non_empty(out_dir, overwrite)
    raw = read_hf_config_dict(hf_dir)
    model = model_config_from_hf(raw, str(hf_dir / "config.json"), name=hf_dir.name)
    model.make_vocab_size_divisible_by = _largest_power_of_two_divisor(model.vocab_size)
    reader = HFCheckpointReader(hf_dir)
    dtype = _dtype_name(reader.get(layout.HF_EMBEDDING).dtype)
    return write_nemo2(reader, model, dtype, out_dir, tokenizer_dir=hf_dir, progress=progress,
                       direction="hf -> nemo", source_name=str(hf_dir), overwrite=overwrite)


def _largest_power_of_two_divisor(vocab_size: int, limit: int = 128) -> int:
    """NeMo's importer: the largest power of two up to 128 that divides the vocab."""
    divisor = limit
    while vocab_size % divisor:
        divisor //= 2
    return divisor


def mcore_to_nemo(mcore_dir: Path, out_dir: Path, progress: bool = True,
                  overwrite: bool = False) -> ConversionSummary:
    """Megatron per-rank shards (any TP/PP) -> a NeMo 2 checkpoint directory."""
    refuse_non_empty(out_dir, overwrite)
    checkpoint = open_mcore(mcore_dir)
    return write_nemo2(checkpoint.weights, checkpoint.info.model, checkpoint.info.dtype, out_dir,
                       tokenizer_dir=checkpoint.tokenizer_dir, progress=progress,
                       direction="mcore -> nemo", source_name=str(mcore_dir),
                       overwrite=overwrite)


def hf_to_dist(hf_dir: Path, out_dir: Path, progress: bool = True,
               overwrite: bool = False) -> ConversionSummary:
    """An HF Llama directory -> a megatron-core dist checkpoint (no key prefix, stacked
    layers, TE norm names) that ``dist_weights.load_into_model`` loads at any TP/PP,
    written into a temporary sibling of ``out_dir`` renamed at the end."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    refuse_non_empty(out_dir, overwrite)
    model = model_config_from_hf(read_hf_config_dict(hf_dir), str(hf_dir / "config.json"),
                                 name=hf_dir.name)
    reader = HFCheckpointReader(hf_dir)
    check_before_writing(reader, model, out_dir, overwrite)
    with staged_output(out_dir, overwrite) as staging:
        summary = write_dist_checkpoint(reader, model, staging, "", progress, "hf -> dist",
                                        str(hf_dir))
    summary.destination = str(out_dir)
    return summary
