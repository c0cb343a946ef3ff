"""NeMo 1's non-distributed weights: one ``torch.save(state_dict)`` per model-parallel rank.

Inside an unpacked ``.nemo``: ``model_weights.ckpt`` (TP=PP=1),
``mp_rank_<tp:02d>/model_weights.ckpt`` (PP=1) or
``tp_rank_<tp:02d>_pp_rank_<pp:03d>/model_weights.ckpt``. Keys are megatron-core names
under ``model.`` (``model.module.`` with O2) with *pipeline-local* layer numbers, and each
rank holds megatron's per-rank layout, so ``llama_layout.merge_layer`` joins the TP
ranks. Files are opened with ``weights_only=True`` and memory-mapped: only the layer
being converted is paged in.
"""

import re
from pathlib import Path
from typing import Dict, Tuple

import torch

from megatron_tpo.config import ConfigError, ModelConfig
from megatron_tpo.model import llama_layout as layout
from megatron_tpo.model.dist_weights import LAYER_WEIGHTS, checkpoint_name

FILE_NAME = "model_weights.ckpt"
_RANK_DIR = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))$")


def find_rank_files(root: Path) -> Dict[Tuple[int, int], Path]:
    """``{(tp_rank, pp_rank): path}``; empty when ``root`` has no per-rank weights."""
    root = Path(root)
    if (root / FILE_NAME).is_file():
        return {(0, 0): root / FILE_NAME}
    files = {}
    for path in root.glob(f"*/{FILE_NAME}"):
        match = _RANK_DIR.match(path.parent.name)
        if match:
            tp = int(match.group(1) or match.group(2))
            files[(tp, int(match.group(3) or 0))] = path
    return files


def _load(path: Path) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # zip, pickle and size errors all mean a damaged file
        raise ConfigError(f"{path}: unreadable weights file ({error})") from error
    return state.get("state_dict", state)


def padded_vocab_rows(files: Dict[Tuple[int, int], Path]) -> int:
    """Embedding rows over all TP ranks: the vocab (with megatron's padding) when the
    config does not record it, as NeMo 1 configs leave it to the tokenizer."""
    state = _load(files[(0, 0)])
    rows = next(t.shape[0] for k, t in state.items() if k.endswith(layout.EMBEDDING))
    return rows * (1 + max(tp for tp, _ in files))


class RankFilesSource:
    """HF-named tensors of per-rank NeMo 1 weights; keeps the one layer last asked for."""

    def __init__(self, files: Dict[Tuple[int, int], Path], model: ModelConfig):
        self.model, self.files = model, files
        self.tp = 1 + max(tp for tp, _ in files)
        self.pp = 1 + max(pp for _, pp in files)
        missing = [(t, p) for t in range(self.tp) for p in range(self.pp) if (t, p) not in files]
        if missing:
            raise ConfigError(f"{next(iter(files.values())).parent.parent}: no weights for "
                              f"tp_rank/pp_rank {missing[0]} of TP={self.tp}, PP={self.pp}")
        if model.num_layers % self.pp:
            raise ConfigError(f"{files[(0, 0)]}: PP={self.pp} does not divide "
                              f"num_layers={model.num_layers}")
        self.states = {rank: _load(path) for rank, path in files.items()}
        first = self.states[(0, 0)]
        self.prefix = next((p for p in ("model.module.", "model.", "")
                            if p + layout.EMBEDDING in first), None)
        if self.prefix is None:
            raise ConfigError(f"{files[(0, 0)]}: no embedding.word_embeddings.weight; "
                              "not a megatron-core GPT checkpoint")
        self._layer, self._tensors = None, {}
        self.check_shapes()

    def _tensor(self, rank: Tuple[int, int], name: str) -> torch.Tensor:
        for candidate in (name, checkpoint_name_full(name)):
            if self.prefix + candidate in self.states[rank]:
                return self.states[rank][self.prefix + candidate]
        raise ConfigError(f"{self.files[rank]}: has no {self.prefix}{name}")

    def _local(self, layer: int) -> Tuple[int, int]:
        per_stage = self.model.num_layers // self.pp
        return layer // per_stage, layer % per_stage

    def check_shapes(self) -> None:
        """Every rank's layer tensors against the shapes TP sharding of the config gives
        (computed on the meta device, so nothing is allocated), before any work."""
        hf = {name: torch.empty(shape, device="meta")
              for name, shape in layout.hf_layer_shapes(self.model).items()}
        expected = layout.shard_layer(hf, self.model, self.tp)
        for layer in range(self.model.num_layers):
            stage, local = self._local(layer)
            for tp_rank in range(self.tp):
                for name in LAYER_WEIGHTS:
                    got = self._tensor((tp_rank, stage), f"decoder.layers.{local}.{name}")
                    if tuple(got.shape) != tuple(expected[tp_rank][name].shape):
                        raise ConfigError(
                            f"{self.files[(tp_rank, stage)]}: {self.prefix}decoder.layers.{local}."
                            f"{checkpoint_name(name)} has shape {tuple(got.shape)}, the config "
                            f"implies {tuple(expected[tp_rank][name].shape)} at TP={self.tp}")

    def check_vocab_tables(self) -> None:
        """The embedding, final norm and output layer of every TP rank: vocab rows split
        evenly over TP, at least the config's vocab in all, the config's hidden size."""
        hidden, last = self.model.hidden_size, self.pp - 1
        tables = [(0, layout.EMBEDDING)] + ([] if self.model.tie_word_embeddings
                                            else [(last, layout.OUTPUT_LAYER)])
        for stage, name in tables:
            shapes = [tuple(self._tensor((t, stage), name).shape) for t in range(self.tp)]
            rows = shapes[0][0]
            if any(shape != (rows, hidden) for shape in shapes) or rows * self.tp < \
                    self.model.vocab_size:
                raise ConfigError(f"{self.files[(0, stage)]}: {self.prefix}{name} has shapes "
                                  f"{shapes} over TP={self.tp}, the config implies "
                                  f"({self.model.vocab_size}+ rows in all, {hidden})")
        norm = tuple(self._tensor((0, last), layout.FINAL_NORM).shape)
        if norm != (hidden,):
            raise ConfigError(f"{self.files[(0, last)]}: {self.prefix}{layout.FINAL_NORM} has "
                              f"shape {norm}, the config implies ({hidden},)")

    def check_tensors(self, expected) -> None:
        """Every tensor the conversion reads, present at the config's shape, before any
        output is written (the files are memory-mapped: shapes cost no reads)."""
        self.check_shapes()
        self.check_vocab_tables()

    def get(self, name: str, expected_shape=None) -> torch.Tensor:
        last = self.pp - 1
        if name in (layout.HF_EMBEDDING, layout.HF_OUTPUT_LAYER):
            stage, mcore = (0, layout.EMBEDDING) if name == layout.HF_EMBEDDING \
                else (last, layout.OUTPUT_LAYER)
            return layout.merge_vocab([self._tensor((t, stage), mcore) for t in range(self.tp)],
                                      self.model.vocab_size)
        if name == layout.HF_FINAL_NORM:
            return self._tensor((0, last), layout.FINAL_NORM)
        layer = int(name.split(".")[2])
        if layer != self._layer:
            stage, local = self._local(layer)
            per_rank = [{weight: self._tensor((t, stage), f"decoder.layers.{local}.{weight}")
                         for weight in LAYER_WEIGHTS} for t in range(self.tp)]
            self._tensors = layout.merge_layer(per_rank, self.model)
            self._layer = layer
        return self._tensors.pop(name[len(layout.hf_layer_prefix(layer)):])


def checkpoint_name_full(name: str) -> str:
    """``decoder.layers.<i>.input_layernorm.weight`` -> its Transformer Engine name."""
    head, _, tail = name.rpartition(".layers.")
    if not head:
        return name
    local, _, weight = tail.partition(".")
    return f"{head}.layers.{local}.{checkpoint_name(weight)}"
