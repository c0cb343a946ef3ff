"""Bad settings stop before any work, with a message that names the setting."""

import json

import pytest
import torch

from llama_fixtures import save_random_hf_llama, tiny_model_config
from megatron_tpo.cli.convert import main as convert_main
from megatron_tpo.config import ConfigError, ParallelConfig, load_model_config
from megatron_tpo.model.conversion import hf_to_mcore, mcore_to_hf
from megatron_tpo.model.llama import llama_transformer_config, transformer_engine_available
from megatron_tpo.parallel import init_megatron


def _parallel(tp=1, pp=1, vpp=None, cp=1):
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp)


@pytest.mark.parametrize("parallel,overrides,names", [
    (_parallel(tp=3), {"num_attention_heads": 6, "num_query_groups": 2, "hidden_size": 96},
     ["tensor_model_parallel_size=3", "num_query_groups=2"]),
    (_parallel(tp=8), {}, ["tensor_model_parallel_size=8", "num_attention_heads=4"]),
    (_parallel(tp=4), {}, ["tensor_model_parallel_size=4", "num_query_groups=2"]),
    (_parallel(pp=3), {}, ["num_layers=4", "pipeline_model_parallel_size=3"]),
    (_parallel(pp=2, vpp=4), {}, ["num_layers=4", "virtual_pipeline_model_parallel_size=4"]),
])
def test_layout_that_does_not_divide_the_model_is_refused(parallel, overrides, names):
    with pytest.raises(ConfigError) as error:
        parallel.validate(tiny_model_config(**overrides))
    for name in names:
        assert name in str(error.value)


def test_world_size_that_is_not_tp_pp_cp_dp_is_refused_before_any_process_group():
    environ = {"RANK": "0", "WORLD_SIZE": "6", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(ConfigError, match="world size 6.*tensor_model_parallel_size"):
        init_megatron(_parallel(tp=2, pp=2), tiny_model_config(), environ=environ)
    assert not torch.distributed.is_initialized()


def test_unknown_model_config_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown model config 'llama9'.*llama3_70b"):
        load_model_config("llama9")


def test_typo_in_model_yaml_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_layers: 2\nhiden_size: 64\n")
    with pytest.raises(ConfigError, match="hiden_size"):
        load_model_config(path)


def test_missing_hf_config_is_named(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        hf_to_mcore(tmp_path / "hf", tmp_path / "out", 1, 1, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"intermediate_size": 180}, "mlp.gate_proj.weight has shape"),
    ({"num_hidden_layers": 5}, "no tensor model.layers.4"),
])
def test_hf_config_that_does_not_match_is_refused(tmp_path, change, message):
    hf_dir = save_random_hf_llama(tiny_model_config(), tmp_path / "hf")
    raw = json.loads((hf_dir / "config.json").read_text())
    raw.update(change)
    (hf_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        hf_to_mcore(hf_dir, tmp_path / "out", 1, 1, progress=False)


def test_corrupt_or_incomplete_shards_are_named(tmp_path):
    hf_dir = save_random_hf_llama(tiny_model_config(), tmp_path / "hf")
    hf_to_mcore(hf_dir, tmp_path / "mcore", 2, 2, progress=False)
    victim = tmp_path / "mcore" / "tp01_pp001" / "layer_00003.safetensors"
    victim.write_bytes(b"\x00" * 32)
    with pytest.raises(ConfigError, match="layer_00003.safetensors"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "back", progress=False)
    victim.unlink()
    with pytest.raises(ConfigError, match="missing shard file"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "back2", progress=False)


def test_cli_reports_a_bad_tp_without_a_traceback(tmp_path, capsys):
    hf_dir = save_random_hf_llama(tiny_model_config(), tmp_path / "hf")
    code = convert_main(["hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "m"),
                         "--tp", "3", "--quiet"])
    assert code == 2
    assert "tensor_model_parallel_size=3" in capsys.readouterr().err


@pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine supports both")
@pytest.mark.parametrize("parallel,setting", [
    (ParallelConfig(context_parallel_size=2), "context_parallel_size=2"),
    (ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), "sequence_parallel"),
])
def test_what_the_local_layers_cannot_do_is_refused_without_transformer_engine(parallel, setting):
    with pytest.raises(ConfigError, match=setting):
        llama_transformer_config(tiny_model_config(), parallel)


def test_rope_scaling_without_a_smoothing_band_is_refused():
    # high_freq_factor == low_freq_factor would divide by zero in the llama3 smoothing.
    model = tiny_model_config(rope_scaling={"factor": 32.0, "high_freq_factor": 1.0})
    with pytest.raises(ConfigError, match="high_freq_factor=1.0"):
        llama_transformer_config(model, ParallelConfig())
