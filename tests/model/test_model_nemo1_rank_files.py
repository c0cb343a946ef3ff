"""model/nemo1_rank_files.py on a tmp dir: the three NeMo 1 rank-folder layouts are found,
and per-rank weights written from known HF tensors (TP2/PP2, TE norm names, pipeline-local
layer numbers, padded vocab) read back as exactly those HF tensors."""

import pytest
import torch
import torch._dynamo  # noqa: F401  (the meta-device shape check imports it lazily: seconds)

from megatron_tpo.config import ConfigError, load_model_config
from megatron_tpo.model import llama_layout as layout
from megatron_tpo.model.dist_weights import checkpoint_name
from megatron_tpo.model.nemo1_rank_files import (FILE_NAME, RankFilesSource, checkpoint_name_full,
                                                 find_rank_files, padded_vocab_rows)

TINY = load_model_config("tiny")   # at collection: composing it imports hydra (seconds)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_rank_files_of_each_layout_are_found(tmp_path):
    assert find_rank_files(tmp_path) == {}
    single = _touch(tmp_path / "one" / FILE_NAME)
    assert find_rank_files(tmp_path / "one") == {(0, 0): single}
    mp = {(tp, 0): _touch(tmp_path / "mp" / f"mp_rank_{tp:02d}" / FILE_NAME) for tp in range(2)}
    _touch(tmp_path / "mp" / "other_dir" / FILE_NAME)   # not a rank folder: ignored
    assert find_rank_files(tmp_path / "mp") == mp
    both = {(tp, pp): _touch(tmp_path / "tp_pp" / f"tp_rank_{tp:02d}_pp_rank_{pp:03d}" / FILE_NAME)
            for tp in range(2) for pp in range(3)}
    assert find_rank_files(tmp_path / "tp_pp") == both


def test_checkpoint_name_full_gives_transformer_engine_norm_names():
    assert checkpoint_name_full("decoder.layers.3.input_layernorm.weight") == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert checkpoint_name_full("decoder.layers.0.mlp.linear_fc2.weight") == \
        "decoder.layers.0.mlp.linear_fc2.weight"
    assert checkpoint_name_full("embedding.word_embeddings.weight") == \
        "embedding.word_embeddings.weight"


def _write_tp2_pp2(root, model):
    """HF tensors of a random model, and its NeMo 1 rank files at TP2 PP2."""
    generator = torch.Generator().manual_seed(0)
    hf = {layout.HF_EMBEDDING: torch.randn(model.vocab_size, model.hidden_size,
                                           generator=generator),
          layout.HF_OUTPUT_LAYER: torch.randn(model.vocab_size, model.hidden_size,
                                              generator=generator),
          layout.HF_FINAL_NORM: torch.randn(model.hidden_size, generator=generator)}
    states = {(tp, pp): {} for tp in range(2) for pp in range(2)}
    per_stage = model.num_layers // 2
    for layer in range(model.num_layers):
        weights = {name: torch.randn(shape, generator=generator)
                   for name, shape in layout.hf_layer_shapes(model).items()}
        hf.update({layout.hf_layer_prefix(layer) + name: t for name, t in weights.items()})
        for tp, shard in enumerate(layout.shard_layer(weights, model, 2)):
            for name, tensor in shard.items():
                states[(tp, layer // per_stage)][
                    f"model.decoder.layers.{layer % per_stage}.{checkpoint_name(name)}"] = tensor
    padded = model.vocab_size + 1   # 1001 rows padded to 1002 for TP2
    for tp, shard in enumerate(layout.shard_vocab(hf[layout.HF_EMBEDDING], padded, 2)):
        states[(tp, 0)]["model." + layout.EMBEDDING] = shard
    for tp, shard in enumerate(layout.shard_vocab(hf[layout.HF_OUTPUT_LAYER], padded, 2)):
        states[(tp, 1)]["model." + layout.OUTPUT_LAYER] = shard
    for tp in range(2):
        states[(tp, 1)]["model." + layout.FINAL_NORM] = hf[layout.HF_FINAL_NORM]
    for (tp, pp), state in states.items():
        path = root / f"tp_rank_{tp:02d}_pp_rank_{pp:03d}" / FILE_NAME
        path.parent.mkdir(parents=True)
        torch.save({"state_dict": state}, path)
    return hf


def test_tp2_pp2_rank_files_read_back_as_the_hf_tensors(tmp_path):
    model = TINY
    hf = _write_tp2_pp2(tmp_path, model)
    files = find_rank_files(tmp_path)
    assert padded_vocab_rows(files) == 1002
    source = RankFilesSource(files, model)
    assert (source.tp, source.pp, source.prefix) == (2, 2, "model.")
    source.check_tensors(None)
    for name, tensor in hf.items():
        assert torch.equal(source.get(name), tensor), name


def test_missing_ranks_and_damaged_files_are_named(tmp_path):
    model = TINY
    _write_tp2_pp2(tmp_path, model)
    files = find_rank_files(tmp_path)
    with pytest.raises(ConfigError, match=r"no weights for tp_rank/pp_rank \(1, 1\) of TP=2"):
        RankFilesSource({k: v for k, v in files.items() if k != (1, 1)}, model)
    files[(0, 0)].write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"tp_rank_00_pp_rank_000/model_weights.ckpt: "
                                          r"unreadable weights file"):
        RankFilesSource(files, model)
