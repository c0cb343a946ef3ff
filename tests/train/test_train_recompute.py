"""Recomputation settings reach megatron and change what runs, not what is computed.

The settings become ``TransformerConfig`` fields (checked on the config the trainer's
model was built with); in one DPO step, forward hooks count how often each decoder layer
and its core attention run (a recomputed one runs again in backward); and every setting
gives the gradients of no recomputation.
"""

import pytest
import torch

from llama_fixtures import megatron_shards, save_random_hf_llama, tiny_model_config
from megatron_tpo.config import ConfigError, ParallelConfig
from megatron_tpo.parallel.local_launch import spawn_local
from megatron_tpo.train.config import DPOTrainingConfig
from megatron_tpo.train.dpo_batch import TokenizedPair
from megatron_tpo.train.recompute import recompute_transformer_fields

LAYERS = tiny_model_config().num_layers  # 4, one pipeline stage
PAIRS = [TokenizedPair(prompt=[3, 4, 5], chosen=[6, 7, 8, 9], rejected=[10, 11],
                       reference_chosen=-28.0, reference_rejected=-14.5),
         TokenizedPair(prompt=[12, 13], chosen=[14, 15], rejected=[16, 17, 18, 19, 20],
                       reference_chosen=-13.0, reference_rejected=-35.5)]
MICRO_BATCHES = len(PAIRS)  # one pair each

# name: (training settings, TransformerConfig fields, runs per micro-batch of each layer,
# runs per micro-batch of each layer's core attention)
SETTINGS = {
    "none": ({}, (None, None, None), [1, 1, 1, 1], [1, 1, 1, 1]),
    "selective": ({"recompute_granularity": "selective"}, ("selective", None, None),
                  [1, 1, 1, 1], [2, 2, 2, 2]),
    "full": ({"recompute_granularity": "full"}, ("full", "uniform", 1),
             [2, 2, 2, 2], [2, 2, 2, 2]),
    "full_uniform_2": ({"recompute_granularity": "full", "recompute_method": "uniform",
                        "recompute_num_layers": 2}, ("full", "uniform", 2),
                       [2, 2, 2, 2], [2, 2, 2, 2]),
    "full_block_3": ({"recompute_granularity": "full", "recompute_method": "block",
                      "recompute_num_layers": 3}, ("full", "block", 3),
                     [2, 2, 2, 1], [2, 2, 2, 1]),
}


def _training(**recompute) -> DPOTrainingConfig:
    return DPOTrainingConfig(beta=0.5, lr=1e-3, warmup_steps=0, train_steps=2,
                             micro_batch_pairs=1, pad_to_multiple_of=8, clip_grad=0.0,
                             **recompute)


def _count_runs(modules):
    counts = [0] * len(modules)

    def counter(index):
        def hook(module, args):
            counts[index] += 1
        return hook

    handles = [m.register_forward_pre_hook(counter(i)) for i, m in enumerate(modules)]
    return counts, handles


def _recompute_worker(rank, world_size, model, shard_root):
    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.train.dpo_trainer import DPOTrainer

    parallel = ParallelConfig()
    init_megatron(parallel, model)
    reports = {}
    for name, (settings, _, _, _) in SETTINGS.items():
        trainer = DPOTrainer(model, parallel, _training(**settings), shard_root)
        chunk = trainer.chunks[0]
        config = chunk.config
        layers = list(chunk.decoder.layers)
        layer_runs, layer_hooks = _count_runs(layers)
        attention_runs, attention_hooks = _count_runs(
            [layer.self_attention.core_attention for layer in layers])
        metrics = trainer.step(PAIRS)
        for handle in layer_hooks + attention_hooks:
            handle.remove()
        reports[name] = {
            "fields": (config.recompute_granularity, config.recompute_method,
                       config.recompute_num_layers),
            "layer_runs": layer_runs, "attention_runs": attention_runs, "loss": metrics["loss"],
            "grads": {n: p.main_grad.detach().clone() for n, p in chunk.named_parameters()},
        }
    shutdown_megatron()
    return reports


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    model = tiny_model_config()
    hf_dir = save_random_hf_llama(model, tmp_path_factory.mktemp("recompute") / "hf", seed=6)
    shard_root = megatron_shards(model, hf_dir, tmp_path_factory.mktemp("recompute_tp1"), 1, 1)
    [reports] = spawn_local(_recompute_worker, 1, model, shard_root)
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_recompute_settings_are_the_fields_of_the_trainers_transformer_config(steps, name):
    assert steps[name]["fields"] == SETTINGS[name][1]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_recomputed_layers_and_attention_run_again_in_backward(steps, name):
    _, _, layer_runs, attention_runs = SETTINGS[name]
    assert steps[name]["layer_runs"] == [MICRO_BATCHES * n for n in layer_runs]
    assert steps[name]["attention_runs"] == [MICRO_BATCHES * n for n in attention_runs]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(SETTINGS) - {"none"}))
def test_recomputation_gives_the_gradients_of_none(steps, name):
    expected, got = steps["none"], steps[name]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert got["grads"].keys() == expected["grads"].keys()
    for parameter, grad in expected["grads"].items():
        assert grad.abs().max() > 0, f"{parameter}: zero gradient, the test would prove nothing"
        torch.testing.assert_close(got["grads"][parameter], grad, rtol=1e-5, atol=1e-8,
                                   msg=parameter)


def test_full_recompute_defaults_to_uniform_units_of_one_layer():
    from megatron_tpo.model.llama import llama_transformer_config

    model, parallel = tiny_model_config(), ParallelConfig()
    fields = recompute_transformer_fields(_training(recompute_granularity="full"), model,
                                          parallel)
    config = llama_transformer_config(model, parallel, **fields)
    assert (config.recompute_granularity, config.recompute_method,
            config.recompute_num_layers) == ("full", "uniform", 1)
    block = recompute_transformer_fields(
        _training(recompute_granularity="full", recompute_method="block",
                  recompute_num_layers=2), model, ParallelConfig(pipeline_model_parallel_size=2))
    assert block == {"recompute_granularity": "full", "recompute_method": "block",
                     "recompute_num_layers": 2}


@pytest.mark.parametrize("settings, parallel, named", [
    ({"recompute_method": "block"}, ParallelConfig(),
     "train.recompute_method='block': apply to recompute_granularity='full' only, not None"),
    ({"recompute_granularity": "selective", "recompute_num_layers": 2}, ParallelConfig(),
     "train.recompute_num_layers=2: apply to recompute_granularity='full' only, not "
     "'selective'"),
    ({"recompute_granularity": "full", "recompute_method": "every"}, ParallelConfig(),
     "train.recompute_method='every': must be one of"),
    ({"recompute_granularity": "full", "recompute_num_layers": 0}, ParallelConfig(),
     "train.recompute_num_layers=0: must be >= 1"),
    ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
     ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
     "train.recompute_num_layers=2: a pipeline stage holds only 1 layers"),
])
def test_recompute_settings_that_cannot_work_are_refused(settings, parallel, named):
    with pytest.raises(ConfigError) as refused:
        training = _training(**settings)
        training.validate()
        recompute_transformer_fields(training, tiny_model_config(), parallel)
    assert named in str(refused.value)
