"""Where each Llama weight lives in HF and in megatron, and how TP splits it.

A layer moves between the two layouts as a dict of tensors: ``shard_layer`` turns HF
tensors into one dict per TP rank (megatron names), ``merge_layer`` the reverse. Both
only slice and concatenate, so a round trip is bit-exact.

Megatron fuses attention into one ``linear_qkv`` whose rows go group by group: for
each query group, its query heads, then its key head, then its value head. TP gives
each rank whole groups, so a rank's rows are a contiguous block. The SwiGLU input
projection ``linear_fc1`` is ``[gate; up]`` *per rank*: rank r holds its slice of
gate followed by its slice of up, not a slice of the TP=1 tensor.
"""

from typing import Dict, List, Optional, Tuple

import torch

from megatron_tpo.config import ModelConfig

Tensor = torch.Tensor

# Names inside one layer: megatron (local spec) -> HF (after "model.layers.{i}.").
REPLICATED_LAYER_WEIGHTS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
}
# Transformer Engine's spec fuses each norm into the linear layer that follows it.
TE_NAME_FOR_LOCAL = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_OUTPUT_LAYER = "lm_head.weight"


def hf_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def mcore_layer_prefix(layer: int) -> str:
    return f"decoder.layers.{layer}."


def hf_layer_shapes(model: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Shape of each HF tensor of one layer (names without the layer prefix), in HF order."""
    hidden, ffn = model.hidden_size, model.ffn_hidden_size
    query_width = model.num_attention_heads * model.head_dim
    key_value_width = model.num_query_groups * model.head_dim
    return {
        "self_attn.q_proj.weight": (query_width, hidden),
        "self_attn.k_proj.weight": (key_value_width, hidden),
        "self_attn.v_proj.weight": (key_value_width, hidden),
        "self_attn.o_proj.weight": (hidden, query_width),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }


def hf_model_shapes(model: ModelConfig) -> List[Tuple[str, Tuple[int, ...]]]:
    """``(hf_name, shape)`` of every tensor of the HF checkpoint, in HF order."""
    vocab = (model.vocab_size, model.hidden_size)
    shapes = [(HF_EMBEDDING, vocab)]
    for layer in range(model.num_layers):
        shapes += [(hf_layer_prefix(layer) + name, shape)
                   for name, shape in hf_layer_shapes(model).items()]
    shapes.append((HF_FINAL_NORM, (model.hidden_size,)))
    # Tied: the embedding is the output layer, and HF stores it once.
    return shapes if model.tie_word_embeddings else shapes + [(HF_OUTPUT_LAYER, vocab)]


def _chunks(tensor: Tensor, parts: int, dim: int) -> List[Tensor]:
    return [chunk.contiguous() for chunk in torch.chunk(tensor, parts, dim=dim)]


QKV_NAMES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def _by_query_group(rows: Tensor, model: ModelConfig) -> Tensor:
    """A view of HF ``q_proj``/``k_proj``/``v_proj`` rows as ``[groups, heads, head_dim,
    hidden]`` (the query heads of group g are heads g*n .. g*n+n-1, as in GQA)."""
    return rows.view(model.num_query_groups, -1, model.head_dim, model.hidden_size)


def _qkv_parts(fused: Tensor, model: ModelConfig) -> Tuple[Tensor, ...]:
    """Fused ``linear_qkv`` rows (some whole query groups) as their query, key and value
    parts, each ``[groups, heads, head_dim, hidden]`` (views where ``fused`` is
    contiguous). Sharding writes through them and merging reads them, so megatron's
    order within a group is stated only here."""
    queries_per_group = model.num_attention_heads // model.num_query_groups
    grouped = fused.reshape(-1, queries_per_group + 2, model.head_dim, model.hidden_size)
    return torch.split(grouped, [queries_per_group, 1, 1], dim=1)


def shard_layer(hf: Dict[str, Tensor], model: ModelConfig, tp: int) -> List[Dict[str, Tensor]]:
    """HF tensors of one layer (names without the layer prefix) -> one dict per TP rank."""
    query = hf[QKV_NAMES[0]]
    qkv = query.new_empty(
        ((model.num_attention_heads + 2 * model.num_query_groups) * model.head_dim,
         model.hidden_size))
    for part, name in zip(_qkv_parts(qkv, model), QKV_NAMES):
        part.copy_(_by_query_group(hf[name].contiguous(), model))

    gates = _chunks(hf["mlp.gate_proj.weight"], tp, 0)
    ups = _chunks(hf["mlp.up_proj.weight"], tp, 0)
    qkv_shards = _chunks(qkv, tp, 0)
    proj_shards = _chunks(hf["self_attn.o_proj.weight"], tp, 1)
    fc2_shards = _chunks(hf["mlp.down_proj.weight"], tp, 1)
    shards = []
    for rank in range(tp):
        shard = {
            "self_attention.linear_qkv.weight": qkv_shards[rank],
            "self_attention.linear_proj.weight": proj_shards[rank],
            "mlp.linear_fc1.weight": torch.cat([gates[rank], ups[rank]], dim=0),
            "mlp.linear_fc2.weight": fc2_shards[rank],
        }
        for mcore_name, hf_name in REPLICATED_LAYER_WEIGHTS.items():
            shard[mcore_name] = hf[hf_name]
        shards.append(shard)
    return shards


def _present(shards: List[Optional[Tensor]]) -> List[Tuple[int, Tensor]]:
    """``(TP rank, shard)`` of the shards given: a ``*_into`` merge may be handed only some
    of them (``None`` for the others), when each rank writes its own part of the output."""
    return [(rank, shard) for rank, shard in enumerate(shards) if shard is not None]


def _merge_qkv_into(shards: List[Tensor], model: ModelConfig, out: Dict[str, Tensor]) -> None:
    hf_parts = [_by_query_group(out[name], model) for name in QKV_NAMES]
    groups_per_shard = model.num_query_groups // len(shards)
    for rank, shard in _present(shards):
        groups = slice(rank * groups_per_shard, (rank + 1) * groups_per_shard)
        for hf_part, shard_part in zip(hf_parts, _qkv_parts(shard, model)):
            hf_part[groups].copy_(shard_part)


def _merge_fc1_into(shards: List[Tensor], model: ModelConfig, out: Dict[str, Tensor]) -> None:
    gate, up = out["mlp.gate_proj.weight"], out["mlp.up_proj.weight"]
    rows = gate.shape[0] // len(shards)
    for rank, shard in _present(shards):
        shard_gate, shard_up = torch.chunk(shard, 2, dim=0)
        gate[rank * rows:(rank + 1) * rows].copy_(shard_gate)
        up[rank * rows:(rank + 1) * rows].copy_(shard_up)


def _merge_columns_into(shards: List[Tensor], out: Tensor) -> None:
    columns = out.shape[1] // len(shards)
    for rank, shard in _present(shards):
        out[:, rank * columns:(rank + 1) * columns].copy_(shard)


# Megatron name of a layer tensor -> the HF tensors its TP shards make, and how they are
# written into them (each shard's rows or columns straight into place, no concatenation).
_LAYER_MERGES = {
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        _merge_qkv_into),
    "self_attention.linear_proj.weight": (
        ("self_attn.o_proj.weight",),
        lambda shards, model, out: _merge_columns_into(shards, out["self_attn.o_proj.weight"])),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), _merge_fc1_into),
    "mlp.linear_fc2.weight": (
        ("mlp.down_proj.weight",),
        lambda shards, model, out: _merge_columns_into(shards, out["mlp.down_proj.weight"])),
}


def is_tensor_parallel(mcore_name: str) -> bool:
    """Whether TP ranks hold different slices of this tensor (layer names without the
    layer prefix, or the embedding, final norm and output layer)."""
    return mcore_name in _LAYER_MERGES or mcore_name in (EMBEDDING, OUTPUT_LAYER)


def merge_layer_tensor_into(mcore_name: str, shards: List[Tensor], model: ModelConfig,
                            out: Dict[str, Tensor]) -> None:
    """``merge_layer_tensor``, written into ``out`` (HF names without the layer prefix ->
    tensors of ``hf_layer_shapes``, e.g. views of a transfer buffer); ``None`` shards are
    left for their own ranks to write."""
    if mcore_name in REPLICATED_LAYER_WEIGHTS:
        out[REPLICATED_LAYER_WEIGHTS[mcore_name]].copy_(shards[0])
    else:
        _LAYER_MERGES[mcore_name][1](shards, model, out)


def merge_layer_tensor(mcore_name: str, shards: List[Tensor], model: ModelConfig
                       ) -> Dict[str, Tensor]:
    """One megatron tensor of a layer, one shard per TP rank (a single copy for the
    replicated norms) -> the HF tensors it holds (names without the layer prefix)."""
    if mcore_name in REPLICATED_LAYER_WEIGHTS:
        return {REPLICATED_LAYER_WEIGHTS[mcore_name]: shards[0]}
    shapes = hf_layer_shapes(model)
    out = {name: shards[0].new_empty(shapes[name]) for name in _LAYER_MERGES[mcore_name][0]}
    merge_layer_tensor_into(mcore_name, shards, model, out)
    return out


def merge_layer(shards: List[Dict[str, Tensor]], model: ModelConfig) -> Dict[str, Tensor]:
    """One dict per TP rank (megatron names of one layer) -> HF tensors of that layer."""
    hf: Dict[str, Tensor] = {}
    for mcore_name in list(_LAYER_MERGES) + list(REPLICATED_LAYER_WEIGHTS):
        hf.update(merge_layer_tensor(mcore_name, [s[mcore_name] for s in shards], model))
    return hf


def shard_vocab(weight: Tensor, padded_vocab_size: int, tp: int) -> List[Tensor]:
    """Pad the vocab rows with zeros to ``padded_vocab_size`` and split them over TP."""
    padding = padded_vocab_size - weight.shape[0]
    if padding:
        weight = torch.cat([weight, weight.new_zeros(padding, weight.shape[1])], dim=0)
    return _chunks(weight, tp, 0)


def merge_vocab_into(shards: List[Tensor], out: Tensor) -> None:
    """Write the TP vocab shards into ``out`` (``vocab_size`` rows), dropping megatron's
    padding rows (the last shards' tail); ``None`` shards are left for their own ranks."""
    for rank, shard in _present(shards):
        rows = shard.shape[0]
        start = rank * rows
        stop = min(start + rows, out.shape[0])
        if stop > start:
            out[start:stop].copy_(shard[:stop - start])


def merge_vocab(shards: List[Tensor], vocab_size: int) -> Tensor:
    """Join the TP vocab shards and drop megatron's padding rows."""
    out = shards[0].new_empty((vocab_size,) + tuple(shards[0].shape[1:]))
    merge_vocab_into(shards, out)
    return out


def merge_model(by_tp_rank: List[Dict[str, Tensor]], model: ModelConfig) -> Dict[str, Tensor]:
    """A whole model's megatron tensors, one dict per TP rank (global layer numbers), ->
    HF-named tensors: weights, or gradients gathered from every rank of a run."""
    merged = {
        HF_EMBEDDING: merge_vocab([r[EMBEDDING] for r in by_tp_rank], model.vocab_size),
        HF_FINAL_NORM: by_tp_rank[0][FINAL_NORM],
    }
    if not model.tie_word_embeddings:
        merged[HF_OUTPUT_LAYER] = merge_vocab([r[OUTPUT_LAYER] for r in by_tp_rank],
                                              model.vocab_size)
    for layer in range(model.num_layers):
        prefix = mcore_layer_prefix(layer)
        per_rank = [{n[len(prefix):]: t for n, t in r.items() if n.startswith(prefix)}
                    for r in by_tp_rank]
        for name, tensor in merge_layer(per_rank, model).items():
            merged[hf_layer_prefix(layer) + name] = tensor
    return merged
