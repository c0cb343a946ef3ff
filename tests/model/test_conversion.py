"""HF -> megatron shards -> HF is bit-exact, streams layer by layer, and reads both HF layouts."""

import json
import weakref

import pytest
import torch

from llama_fixtures import save_random_hf_llama, tiny_model_config
from megatron_tpo.cli.convert import main as convert_main
from megatron_tpo.model import mcore_shards
from megatron_tpo.model.conversion import hf_to_mcore, mcore_to_hf
from megatron_tpo.model.hf_checkpoint import INDEX_NAME, HFCheckpointReader
from megatron_tpo.model.hf_config import model_config_from_hf, read_hf_config_dict

WIDE_GQA = dict(num_attention_heads=8, num_query_groups=4)  # allows TP=4


def _assert_same_tensors(left_dir, right_dir):
    left, right = HFCheckpointReader(left_dir), HFCheckpointReader(right_dir)
    assert set(left.file_of) == set(right.file_of)
    for name in left.file_of:
        a, b = left.get(name), right.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("overrides,tp,pp", [
    ({}, 1, 1), ({}, 2, 1), ({}, 1, 4), ({}, 2, 2), (WIDE_GQA, 4, 2),
])
def test_round_trip_is_bit_exact(tmp_path, overrides, tp, pp):
    model = tiny_model_config(**overrides)
    hf_dir = save_random_hf_llama(model, tmp_path / "hf")
    hf_to_mcore(hf_dir, tmp_path / "mcore", tp, pp, make_vocab_size_divisible_by=128,
                progress=False)
    info = mcore_shards.read_manifest(tmp_path / "mcore")
    assert info.padded_vocab_size % (128 * tp) == 0 and info.padded_vocab_size > model.vocab_size
    layer_files = sorted(p.name for p in (tmp_path / "mcore").glob(f"tp{tp - 1:02d}_pp*/layer_*"))
    assert len(layer_files) == model.num_layers
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", max_shard_bytes=40_000, progress=False)
    assert (tmp_path / "back" / INDEX_NAME).is_file()
    _assert_same_tensors(hf_dir, tmp_path / "back")


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_model_config()
    hf_dir = save_random_hf_llama(model, tmp_path / "hf32")
    LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", 2, 2, progress=False)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", progress=False)
    _assert_same_tensors(tmp_path / "hf", tmp_path / "back")
    assert HFCheckpointReader(tmp_path / "back").get("lm_head.weight").dtype == torch.bfloat16


def test_conversion_holds_at_most_one_layer_of_source_tensors(tmp_path, monkeypatch):
    model = tiny_model_config(num_layers=8)
    hf_dir = save_random_hf_llama(model, tmp_path / "hf")
    alive, peak = set(), [0]
    original_get = HFCheckpointReader.get

    def tracked_get(self, name, expected_shape=None):
        tensor = original_get(self, name, expected_shape)
        alive.add(name)
        weakref.finalize(tensor, alive.discard, name)
        peak[0] = max(peak[0], len(alive))
        return tensor

    monkeypatch.setattr(HFCheckpointReader, "get", tracked_get)
    hf_to_mcore(hf_dir, tmp_path / "mcore", 2, 2, progress=False)
    tensors_per_layer = 9
    assert 0 < peak[0] <= tensors_per_layer, f"{peak[0]} source tensors alive at once"


def test_reads_transformers4_rope_layout_and_writes_the_installed_one(tmp_path):
    model = tiny_model_config(max_position_embeddings=16384)
    hf_dir = save_random_hf_llama(model, tmp_path / "hf")
    raw = read_hf_config_dict(hf_dir)
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    (hf_dir / "config.json").write_text(json.dumps(raw))

    parsed = model_config_from_hf(raw)
    assert parsed.rope_theta == 500000.0 and parsed.rope_scaling.factor == 8.0

    hf_to_mcore(hf_dir, tmp_path / "mcore", 1, 1, progress=False)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", progress=False)
    from transformers import AutoConfig

    reread = AutoConfig.from_pretrained(tmp_path / "back")
    back = model_config_from_hf(reread.to_dict())
    assert back.rope_scaling == parsed.rope_scaling and back.rope_theta == parsed.rope_theta
    assert reread.bos_token_id == raw["bos_token_id"]  # kept from the source config


def test_cli_converts_and_prints_a_summary(tmp_path, capsys):
    hf_dir = save_random_hf_llama(tiny_model_config(), tmp_path / "hf")
    assert convert_main(["hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "m"),
                         "--tp", "2", "--pp", "2", "--quiet"]) == 0
    assert "hf -> mcore" in capsys.readouterr().out
    assert convert_main(["mcore-to-hf", "--mcore", str(tmp_path / "m"), "--out",
                         str(tmp_path / "back"), "--max-shard-size", "100KB", "--quiet"]) == 0
    assert "mcore -> hf" in capsys.readouterr().out
    _assert_same_tensors(hf_dir, tmp_path / "back")
