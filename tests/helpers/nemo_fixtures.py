"""NeMo 1 checkpoints as NeMo writes them (a ``.nemo`` tarball of a dist checkpoint, or of
older per-rank files), built from a tiny HF checkpoint."""

import tarfile
from pathlib import Path

import torch
import yaml

from megatron_tpo.model import llama_layout as layout
from megatron_tpo.model.hf_checkpoint import HFCheckpointReader
from megatron_tpo.model.nemo import write_dist_checkpoint


def write_rank_files(folder: Path, hf_dir, model, tp: int, pp: int) -> None:
    """NeMo 1's non-distributed layout, written independently of the reader: megatron's
    per-rank tensors, pipeline-local layer numbers, TE norm names, ``model.`` prefix."""
    reader = HFCheckpointReader(hf_dir)
    te_names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    states = {(t, p): {} for t in range(tp) for p in range(pp)}
    per_stage = model.num_layers // pp
    for layer in range(model.num_layers):
        hf = {name: reader.get(layout.hf_layer_prefix(layer) + name)
              for name in layout.hf_layer_shapes(model)}
        for t, shard in enumerate(layout.shard_layer(hf, model, tp)):
            for name, tensor in shard.items():
                key = f"model.decoder.layers.{layer % per_stage}.{te_names.get(name, name)}"
                states[(t, layer // per_stage)][key] = tensor
    padded = model.vocab_size + (-model.vocab_size) % tp
    for t, rows in enumerate(layout.shard_vocab(reader.get(layout.HF_EMBEDDING), padded, tp)):
        states[(t, 0)]["model.embedding.word_embeddings.weight"] = rows
    for t, rows in enumerate(layout.shard_vocab(reader.get(layout.HF_OUTPUT_LAYER), padded, tp)):
        states[(t, pp - 1)]["model.output_layer.weight"] = rows
        states[(t, pp - 1)]["model.decoder.final_layernorm.weight"] = reader.get(layout.HF_FINAL_NORM)
    for (t, p), state in states.items():
        (folder / f"tp_rank_{t:02d}_pp_rank_{p:03d}").mkdir(parents=True)
        torch.save(state, folder / f"tp_rank_{t:02d}_pp_rank_{p:03d}" / "model_weights.ckpt")


def nemo1_tarball(tmp_path, hf_dir, model, rank_files=False) -> Path:
    """A NeMo 1 ``.nemo`` as NeMo's save_to writes it: an uncompressed tar of ``./``
    with model_config.yaml and a ``model.``-prefixed dist checkpoint in model_weights/
    (or, older, per-rank ``model_weights.ckpt`` files)."""
    folder = tmp_path / "nemo1"
    if rank_files:
        write_rank_files(folder, hf_dir, model, tp=2, pp=2)
    else:
        write_dist_checkpoint(HFCheckpointReader(hf_dir), model, folder / "model_weights",
                              "model.", progress=False)
    (folder / "model_config.yaml").write_text(yaml.safe_dump({
        "mcore_gpt": True, "transformer_engine": True, "num_layers": model.num_layers,
        "hidden_size": model.hidden_size, "ffn_hidden_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.num_query_groups, "kv_channels": None,
        "encoder_seq_length": model.max_position_embeddings,
        "max_position_embeddings": model.max_position_embeddings,
        "normalization": "rmsnorm", "layernorm_epsilon": model.norm_epsilon,
        "activation": "fast-swiglu", "bias": False, "position_embedding_type": "rope",
        "rotary_percentage": 1.0, "rotary_base": model.rope_theta,
        "share_embeddings_and_output_weights": False, "make_vocab_size_divisible_by": 1,
        "vocab_size": model.vocab_size, "precision": 32,
        "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
        "tokenizer": {"library": "huggingface", "type": "meta-llama/Meta-Llama-3-8B"},
    }))
    tarball = tmp_path / "model.nemo"
    with tarfile.open(tarball, "w:") as archive:
        archive.add(folder, arcname=".")
    return tarball
