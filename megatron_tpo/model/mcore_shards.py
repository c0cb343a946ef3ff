"""Megatron weights as per-rank safetensors shards, one file per layer.

```
<root>/mcore_config.json            written last: its presence marks a complete directory
<root>/hf_config.json               the source HF config (special tokens and the like)
<root>/tokenizer/                   the source tokenizer files, when there were any
<root>/tp00_pp000/embedding.safetensors
<root>/tp00_pp000/layer_00000.safetensors   megatron names, *global* layer numbers
<root>/tp00_pp001/final.safetensors         final norm and output layer
```

Layer files carry global layer numbers, so a rank finds its layers whatever pipeline
(or virtual pipeline) layout it runs with; only the TP size is fixed by the files.
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from megatron_tpo.config import ConfigError, ModelConfig, RopeScalingConfig
from megatron_tpo.model.llama_layout import (
    EMBEDDING, FINAL_NORM, OUTPUT_LAYER, TE_NAME_FOR_LOCAL, hf_layer_shapes, mcore_layer_prefix,
    shard_layer,
)

MANIFEST = "mcore_config.json"
FORMAT = "megatron_tpo.mcore_shards/1"


@dataclass
class ShardedCheckpointInfo:
    model: ModelConfig
    tensor_parallel_size: int
    pipeline_parallel_size: int
    padded_vocab_size: int
    dtype: str

    def stage_of_layer(self, layer: int) -> int:
        return layer // (self.model.num_layers // self.pipeline_parallel_size)


def rank_dir(root: Path, tp_rank: int, pp_rank: int) -> Path:
    return Path(root) / f"tp{tp_rank:02d}_pp{pp_rank:03d}"


def layer_file(root: Path, tp_rank: int, pp_rank: int, layer: int) -> Path:
    return rank_dir(root, tp_rank, pp_rank) / f"layer_{layer:05d}.safetensors"


def embedding_file(root: Path, tp_rank: int) -> Path:
    return rank_dir(root, tp_rank, 0) / "embedding.safetensors"


def final_file(root: Path, tp_rank: int, info: ShardedCheckpointInfo) -> Path:
    return rank_dir(root, tp_rank, info.pipeline_parallel_size - 1) / "final.safetensors"


def write_manifest(root: Path, info: ShardedCheckpointInfo) -> None:
    body = {"format": FORMAT, **asdict(info)}
    temporary = Path(root) / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(body, indent=2))
    os.replace(temporary, Path(root) / MANIFEST)


def read_manifest(root: Path) -> ShardedCheckpointInfo:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{root}: no {MANIFEST}; not a converted megatron checkpoint, "
                          "or its conversion did not finish")
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: corrupt manifest ({error})") from error
    if body.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {body.get('format')!r}, expected {FORMAT!r}")
    model = dict(body["model"])
    if model.get("rope_scaling"):
        model["rope_scaling"] = RopeScalingConfig(**model["rope_scaling"])
    return ShardedCheckpointInfo(
        model=ModelConfig(**model),
        tensor_parallel_size=body["tensor_parallel_size"],
        pipeline_parallel_size=body["pipeline_parallel_size"],
        padded_vocab_size=body["padded_vocab_size"],
        dtype=body["dtype"],
    )


def read_hf_config_copy(root: Path) -> Optional[Dict[str, Any]]:
    path = Path(root) / "hf_config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_shard_file(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"{path}: missing shard file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{path}: corrupt shard file ({error})") from error


def expected_file_shapes(root: Path, info: ShardedCheckpointInfo
                         ) -> Dict[Path, Dict[str, Tuple[int, ...]]]:
    """Each shard file of ``root`` and the shape of every tensor it must hold, from the
    manifest alone (TP sharding computed on the meta device: nothing is allocated)."""
    model, tp = info.model, info.tensor_parallel_size
    vocab_rows = (info.padded_vocab_size // tp, model.hidden_size)
    hf = {name: torch.empty(shape, device="meta")
          for name, shape in hf_layer_shapes(model).items()}
    layer_shapes = {name: tuple(t.shape) for name, t in shard_layer(hf, model, tp)[0].items()}
    final = {FINAL_NORM: (model.hidden_size,)}
    if not model.tie_word_embeddings:  # tied: the output layer is the embedding file's
        final[OUTPUT_LAYER] = vocab_rows
    files = {}
    for tp_rank in range(tp):
        files[embedding_file(root, tp_rank)] = {EMBEDDING: vocab_rows}
        for layer in range(model.num_layers):
            prefix = mcore_layer_prefix(layer)
            files[layer_file(root, tp_rank, info.stage_of_layer(layer), layer)] = {
                prefix + name: shape for name, shape in layer_shapes.items()}
        files[final_file(root, tp_rank, info)] = dict(final)
    return files


def _header_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    if not path.is_file():
        raise ConfigError(f"{path}: missing shard file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{path}: corrupt shard file ({error})") from error


def check_complete(root: Path, info: ShardedCheckpointInfo) -> None:
    """Every shard file present, readable and holding every tensor at the shape the
    manifest implies, from the files' headers: a conversion fails here, before it
    writes anything, not partway."""
    for path, expected in expected_file_shapes(root, info).items():
        found = _header_shapes(path)
        for name, shape in expected.items():
            if name not in found:
                raise ConfigError(f"{path}: has no tensor {name}")
            if found[name] != shape:
                raise ConfigError(f"{path}: {name} has shape {found[name]}, "
                                  f"{MANIFEST} implies {shape}")


def _global_layer_numbers(gpt_model) -> List[int]:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(gpt_model.config, vp_stage=gpt_model.vp_stage)
    return [offset + local for local in range(len(gpt_model.decoder.layers))]


def with_global_layer_numbers(gpt_model, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename ``decoder.layers.<local>.*`` of this chunk to global layer numbers."""
    renamed = {}
    numbers = _global_layer_numbers(gpt_model)
    local_prefix = "decoder.layers."
    for name, tensor in tensors.items():
        if name.startswith(local_prefix):
            local, rest = name[len(local_prefix):].split(".", 1)
            name = mcore_layer_prefix(numbers[int(local)]) + rest
        renamed[name] = tensor
    return renamed


def load_model_shards(gpt_model, root: Path) -> None:
    """Load this rank's weights from ``root`` into a ``GPTModel`` chunk, strictly."""
    from megatron.core import parallel_state

    info = read_manifest(root)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if info.tensor_parallel_size != tp:
        raise ConfigError(f"{root}: converted for tensor parallel size "
                          f"{info.tensor_parallel_size}, the model runs with {tp}; convert again "
                          f"with --tp {tp}")
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    state: Dict[str, torch.Tensor] = {}
    if gpt_model.pre_process:
        state.update(load_shard_file(embedding_file(root, tp_rank)))
    if gpt_model.post_process:
        state.update(load_shard_file(final_file(root, tp_rank, info)))
    expected = gpt_model.state_dict()
    if info.model.tie_word_embeddings and OUTPUT_LAYER in expected:
        # Tied at PP > 1: the last stage keeps its own copy of the embedding, which is
        # stored once, in the embedding file.
        state[OUTPUT_LAYER] = load_shard_file(embedding_file(root, tp_rank))[EMBEDDING]
    for local, layer in enumerate(_global_layer_numbers(gpt_model)):
        tensors = load_shard_file(layer_file(root, tp_rank, info.stage_of_layer(layer), layer))
        global_prefix, local_prefix = mcore_layer_prefix(layer), mcore_layer_prefix(local)
        for name, tensor in tensors.items():
            state[local_prefix + name[len(global_prefix):]] = tensor

    for local_name, te_name in TE_NAME_FOR_LOCAL.items():
        for name in [n for n in state if n.endswith(local_name)]:
            renamed = name[: -len(local_name)] + te_name
            if renamed in expected and name not in expected:
                state[renamed] = state.pop(name)
    # Transformer Engine keeps FP8 bookkeeping in `_extra_state`; it is not a weight.
    wanted = {name for name in expected if not name.endswith("_extra_state")}
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"{root}: shards do not match the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    for name in wanted:
        if expected[name].shape != state[name].shape:
            raise ConfigError(f"{root}: {name} has shape {tuple(state[name].shape)}, "
                              f"the model expects {tuple(expected[name].shape)}")
    gpt_model.load_state_dict(state, strict=False)
