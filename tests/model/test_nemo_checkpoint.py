"""NeMo 2 and NeMo 1 checkpoints in and out: NeMo's own output read bit-exactly, round
trips bit-exact, corruption named before anything is written, configs checked first."""

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from file_damage import flip_byte, truncate
from llama_fixtures import save_random_hf_llama, tiny_model_config
from megatron_tpo.cli.convert import main as convert_main
from megatron_tpo.config import ConfigError
from megatron_tpo.model.conversion import hf_to_mcore
from megatron_tpo.model.dist_weights import CHECKSUMS, read_dcp_metadata
from megatron_tpo.model.hf_checkpoint import HFCheckpointReader
from megatron_tpo.model.hf_config import model_config_from_hf, read_hf_config_dict
from megatron_tpo.model.nemo import hf_to_nemo, mcore_to_nemo, nemo_to_hf, nemo_to_mcore, open_nemo2
from nemo_fixtures import nemo1_tarball

FIXTURE = Path("/work/shared/fixtures/nemo2_tiny_llama")
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason="NeMo-written fixture absent")
WIDE_GQA = dict(num_attention_heads=8, num_query_groups=4)


def _tensors(hf_dir):
    reader = HFCheckpointReader(hf_dir)
    return {name: reader.get(name) for name in reader.file_of}


def _assert_same_hf(left, right, skip=()):
    a, b = _tensors(left), _tensors(right)
    assert a.keys() == b.keys()
    for name in a:
        if name not in skip:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@needs_fixture
def test_checkpoint_written_by_nemo_reads_back_as_its_hf_source(tmp_path):
    nemo_to_hf(FIXTURE / "nemo", tmp_path / "hf", progress=False)
    source, converted = _tensors(FIXTURE / "hf"), _tensors(tmp_path / "hf")
    assert source.keys() == converted.keys()
    # NeMo 2.5's importer, run on CPU with the local layer spec, saved every per-layer
    # norm as ones instead of the HF values (the fixture's defect, not the reader's):
    # those four tensors must be exactly what the NeMo file holds; all others bit-exact.
    per_layer_norms = {n for n in source if n.endswith("layernorm.weight") and ".layers." in n}
    assert len(per_layer_norms) == 4
    for name in source:
        if name in per_layer_norms:
            assert torch.equal(converted[name], torch.ones_like(source[name])), name
        else:
            assert torch.equal(converted[name], source[name]), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf_config = read_hf_config_dict(FIXTURE / "hf")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps"):
        assert config[key] == hf_config[key], key
    # NeMo 2.5 (transformers 4.53) did not read the transformers-5 `rope_parameters`, so
    # its model.yaml records the default base 10000; the reader reports what NeMo wrote.
    assert model_config_from_hf(config).rope_theta == 10000.0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == \
        (FIXTURE / "nemo" / "context" / "nemo_tokenizer" / "tokenizer.json").read_bytes()


@needs_fixture
def test_model_yaml_and_io_json_of_the_fixture_give_the_same_config(tmp_path):
    from_yaml = open_nemo2(FIXTURE / "nemo").model
    copy = tmp_path / "nemo"
    shutil.copytree(FIXTURE / "nemo", copy)
    (copy / "context" / "model.yaml").chmod(0o644)
    (copy / "context" / "model.yaml").unlink()
    from_io_json = open_nemo2(copy).model
    assert from_yaml == from_io_json
    assert (from_yaml.num_layers, from_yaml.num_query_groups, from_yaml.vocab_size) == (2, 2, 320)


@pytest.mark.parametrize("overrides,dtype", [
    ({}, torch.float32), (WIDE_GQA, torch.float32), ({}, torch.bfloat16),
    ({"rope_scaling": {"factor": 8.0, "original_max_position_embeddings": 64}}, torch.float32),
])
def test_hf_to_nemo_to_hf_is_bit_exact(tmp_path, overrides, dtype):
    from transformers import LlamaForCausalLM

    model = tiny_model_config(**overrides)
    hf_dir = save_random_hf_llama(model, tmp_path / "hf32")
    if dtype != torch.float32:
        LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).save_pretrained(tmp_path / "hf")
        hf_dir = tmp_path / "hf"
    hf_to_nemo(hf_dir, tmp_path / "nemo", progress=False)
    nemo_to_hf(tmp_path / "nemo", tmp_path / "back", max_shard_bytes=60_000, progress=False)
    _assert_same_hf(hf_dir, tmp_path / "back")
    back = model_config_from_hf(read_hf_config_dict(tmp_path / "back"))
    assert back.rope_scaling == model_config_from_hf(read_hf_config_dict(hf_dir)).rope_scaling
    weights = sorted(p.name for p in (tmp_path / "nemo" / "weights").iterdir())
    assert {".metadata", "common.pt", "metadata.json"} <= set(weights)
    assert len([w for w in weights if w.endswith(".distcp")]) == model.num_layers + 2
    context = tmp_path / "nemo" / "context"
    assert yaml.safe_load((context / "model.yaml").read_text())["config"]["_target_"].endswith(
        "Llama31Config" if "rope_scaling" in overrides else "LlamaConfig")
    assert (context / "nemo_tokenizer").is_dir() or not (hf_dir / "tokenizer.json").exists()


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2), (1, 4)])
def test_mcore_to_nemo_to_mcore_is_bit_exact(tmp_path, tp, pp):
    from safetensors.torch import load_file

    model = tiny_model_config()
    hf_dir = save_random_hf_llama(model, tmp_path / "hf")
    hf_to_mcore(hf_dir, tmp_path / "mcore", tp, pp, make_vocab_size_divisible_by=8,
                progress=False)
    mcore_to_nemo(tmp_path / "mcore", tmp_path / "nemo", progress=False)
    nemo_to_mcore(tmp_path / "nemo", tmp_path / "back", tp, pp, progress=False)
    files = sorted(p.relative_to(tmp_path / "mcore") for p in (tmp_path / "mcore").rglob("*.safetensors"))
    assert files == sorted(p.relative_to(tmp_path / "back") for p in (tmp_path / "back").rglob("*.safetensors"))
    assert len(files) == tp * (model.num_layers + 2)
    for relative in files:
        original, back = load_file(tmp_path / "mcore" / relative), load_file(tmp_path / "back" / relative)
        assert original.keys() == back.keys()
        for name in original:
            assert torch.equal(original[name], back[name]), f"{relative}: {name}"


@pytest.mark.parametrize("rank_files", [False, True])
def test_nemo1_tarball_converts_to_its_hf_source(tmp_path, rank_files):
    model = tiny_model_config(**WIDE_GQA)
    hf_dir = save_random_hf_llama(model, tmp_path / "hf")
    tarball = nemo1_tarball(tmp_path, hf_dir, model, rank_files)
    nemo_to_hf(tarball, tmp_path / "back", progress=False)
    _assert_same_hf(hf_dir, tmp_path / "back")


def test_nemo1_tarball_with_a_link_out_of_the_archive_is_refused(tmp_path):
    tarball = tmp_path / "evil.nemo"
    with tarfile.open(tarball, "w:") as archive:
        member = tarfile.TarInfo("model_config.yaml")
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(member)
    with pytest.raises(ConfigError, match="evil.nemo"):
        nemo_to_hf(tarball, tmp_path / "out", progress=False)


@pytest.fixture(scope="module")
def written_nemo(tmp_path_factory):
    root = tmp_path_factory.mktemp("nemo")
    hf_dir = save_random_hf_llama(tiny_model_config(), root / "hf")
    hf_to_nemo(hf_dir, root / "nemo", progress=False)
    return root / "nemo"


def _damaged_copy(written_nemo, tmp_path, damage):
    copy = tmp_path / "damaged"
    shutil.copytree(written_nemo, copy)
    damage(copy)
    return copy


def _change_hidden_size(root: Path):
    path = root / "context" / "model.yaml"
    body = yaml.safe_load(path.read_text())
    body["config"]["ffn_hidden_size"] = 128
    path.write_text(yaml.safe_dump(body))


@pytest.mark.parametrize("damage,message", [
    (lambda root: truncate(root / "weights" / "__2_0.distcp"),
     r"__2_0.distcp: truncated .*decoder.layers"),
    (lambda root: flip_byte(root / "weights" / "__3_0.distcp"),
     r"__3_0.distcp: checksum differs .*decoder.layers"),
    (lambda root: (root / "weights" / "__1_0.distcp").unlink(),
     r"__1_0.distcp: missing; it holds .*decoder.layers"),
    (lambda root: flip_byte(root / "weights" / ".metadata"), r"\.metadata"),
    (_change_hidden_size, r"mlp.linear_fc1.weight has shape \(4, 352, 64\).*\(4, 256, 64\)"),
])
def test_damaged_nemo_checkpoint_is_named_before_anything_is_written(
        written_nemo, tmp_path, damage, message):
    damaged = _damaged_copy(written_nemo, tmp_path, damage)
    for convert in (lambda: nemo_to_hf(damaged, tmp_path / "hf", progress=False),
                    lambda: nemo_to_mcore(damaged, tmp_path / "mcore", 2, 1, progress=False)):
        with pytest.raises(ConfigError, match=message):
            convert()
    assert not (tmp_path / "hf").exists() and not (tmp_path / "mcore").exists()


def test_checksums_cover_every_file_nemo_loads(written_nemo):
    listed = set(json.loads((written_nemo / "weights" / CHECKSUMS).read_text()))
    files = {p.name for p in (written_nemo / "weights").iterdir()}
    assert listed == files - {CHECKSUMS, "metadata.json"}


def test_metadata_that_would_run_code_is_refused(written_nemo, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    damaged = _damaged_copy(written_nemo, tmp_path, lambda root: (root / "weights" / ".metadata")
                            .write_bytes(__import__("pickle").dumps(Payload())))
    with pytest.raises(ConfigError, match="builtins.print is not checkpoint metadata"):
        read_dcp_metadata(damaged / "weights")


def test_conversion_refuses_a_config_the_builder_would_refuse_before_writing(tmp_path):
    hf_dir = save_random_hf_llama(tiny_model_config(), tmp_path / "hf")
    raw = read_hf_config_dict(hf_dir)
    raw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                           "high_freq_factor": 2.0, "original_max_position_embeddings": 64}
    (hf_dir / "config.json").write_text(json.dumps(raw))
    for command in (["hf-to-nemo", "--hf", str(hf_dir), "--out", str(tmp_path / "out")],
                    ["hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "out")],
                    ["hf-to-dist", "--hf", str(hf_dir), "--out", str(tmp_path / "out")]):
        assert convert_main(command + ["--quiet"]) == 2
        assert not (tmp_path / "out").exists(), command[0]


def test_cli_converts_through_nemo_and_prints_summaries(tmp_path, capsys):
    hf_dir = save_random_hf_llama(tiny_model_config(), tmp_path / "hf")
    steps = [["hf-to-nemo", "--hf", str(hf_dir), "--out", str(tmp_path / "n")],
             ["nemo-to-mcore", "--nemo", str(tmp_path / "n"), "--out", str(tmp_path / "m"),
              "--tp", "2", "--pp", "2"],
             ["mcore-to-nemo", "--mcore", str(tmp_path / "m"), "--out", str(tmp_path / "n2")],
             ["nemo-to-hf", "--nemo", str(tmp_path / "n2"), "--out", str(tmp_path / "back")]]
    for step in steps:
        assert convert_main(step + ["--quiet"]) == 0, step
        direction = step[0].replace("-to-", " -> ")
        assert direction in capsys.readouterr().out
    _assert_same_hf(hf_dir, tmp_path / "back")
    assert convert_main(["nemo-to-hf", "--nemo", str(tmp_path / "missing"), "--out",
                         str(tmp_path / "x")]) == 2
    assert "tpo-convert: error:" in capsys.readouterr().err


def test_reading_nemo_holds_at_most_one_layer_of_source_tensors(tmp_path, monkeypatch):
    import weakref

    from megatron_tpo.model.dist_weights import LAYER_WEIGHTS, DistWeightsReader

    model = tiny_model_config(num_layers=8)
    hf_to_nemo(save_random_hf_llama(model, tmp_path / "hf"), tmp_path / "nemo", progress=False)
    alive, peak = set(), [0]
    original_load = DistWeightsReader._load

    def tracked_load(self, requests):
        loaded = original_load(self, requests)
        for key, tensor in loaded.items():
            token = (key, len(alive), id(tensor))
            alive.add(token)
            weakref.finalize(tensor, alive.discard, token)
        peak[0] = max(peak[0], len(alive))
        return loaded

    monkeypatch.setattr(DistWeightsReader, "_load", tracked_load)
    nemo_to_mcore(tmp_path / "nemo", tmp_path / "mcore", 2, 2, progress=False)
    assert 0 < peak[0] <= len(LAYER_WEIGHTS), f"{peak[0]} checkpoint tensors alive at once"
