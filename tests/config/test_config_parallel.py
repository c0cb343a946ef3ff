"""config/parallel.py: the trainer's layout, checked against the model and the world size
before any process group or weight exists; data parallel is what the world leaves."""

import pytest

from megatron_tpo.config import ConfigError
from megatron_tpo.config.model import ModelConfig
from megatron_tpo.config.parallel import ParallelConfig

# 4 heads, 2 query groups, 4 layers, an MLP 176 wide.
TINY = ModelConfig()


def test_model_parallel_is_tp_times_pp_times_cp_and_data_parallel_the_rest():
    layout = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=3,
                            context_parallel_size=2)
    assert layout.model_parallel_size == 12
    assert layout.data_parallel_size(12) == 1 and layout.data_parallel_size(48) == 4
    with pytest.raises(ConfigError) as refused:
        layout.data_parallel_size(18)
    assert str(refused.value) == (
        "world size 18 is not a multiple of parallel.tensor_model_parallel_size * "
        "pipeline_model_parallel_size * context_parallel_size = 2 * 3 * 2")


def test_layouts_that_split_the_model_evenly_are_accepted():
    ParallelConfig().validate(TINY, world_size=1)
    ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                   virtual_pipeline_model_parallel_size=2, sequence_parallel=True
                   ).validate(TINY, world_size=8)
    # No world size: only the model is checked (tpo-plan's layouts, a config file).
    ParallelConfig(tensor_model_parallel_size=2).validate(TINY)


@pytest.mark.parametrize("layout, message", [
    (dict(tensor_model_parallel_size=0), "parallel.tensor_model_parallel_size must be >= 1, got 0"),
    (dict(context_parallel_size=0), "parallel.context_parallel_size must be >= 1, got 0"),
    (dict(tensor_model_parallel_size=3),
     "parallel.tensor_model_parallel_size=3 does not divide model.num_attention_heads=4"),
    (dict(tensor_model_parallel_size=4),
     "parallel.tensor_model_parallel_size=4 does not divide model.num_query_groups=2"),
    (dict(pipeline_model_parallel_size=3),
     "model.num_layers=4 is not divisible by parallel.pipeline_model_parallel_size=3 * "
     "virtual_pipeline_model_parallel_size=1"),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4),
     "model.num_layers=4 is not divisible by parallel.pipeline_model_parallel_size=2 * "
     "virtual_pipeline_model_parallel_size=4"),
    (dict(virtual_pipeline_model_parallel_size=2),
     "parallel.virtual_pipeline_model_parallel_size needs "
     "parallel.pipeline_model_parallel_size >= 2"),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=-1),
     "parallel.virtual_pipeline_model_parallel_size must be >= 1, got -1"),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=0),
     "parallel.virtual_pipeline_model_parallel_size must be >= 1, got 0"),
    (dict(sequence_parallel=True),
     "parallel.sequence_parallel=true needs tensor_model_parallel_size > 1"),
])
def test_a_layout_that_cannot_split_the_model_is_refused_naming_the_setting(layout, message):
    with pytest.raises(ConfigError) as refused:
        ParallelConfig(**layout).validate(TINY)
    assert str(refused.value) == message


def test_tp_must_divide_the_mlp_width_too():
    model = ModelConfig(num_query_groups=4, ffn_hidden_size=90)
    with pytest.raises(ConfigError, match=r"^parallel.tensor_model_parallel_size=4 does not "
                                          r"divide model.ffn_hidden_size=90$"):
        ParallelConfig(tensor_model_parallel_size=4).validate(model)


def test_the_model_is_checked_first_and_the_world_size_last():
    bad_model = ModelConfig(num_query_groups=3)
    with pytest.raises(ConfigError, match="model.num_attention_heads=4 is not divisible by "
                                          "model.num_query_groups=3"):
        ParallelConfig(tensor_model_parallel_size=3).validate(bad_model, world_size=5)
    with pytest.raises(ConfigError, match="world size 6 is not a multiple of"):
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2
                       ).validate(TINY, world_size=6)
