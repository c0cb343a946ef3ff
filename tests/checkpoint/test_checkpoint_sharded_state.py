"""checkpoint/sharded_state.py: what a checkpoint's layout metadata says, and which saved
shapes a model may load (only the vocab-padded tables may differ, in their first dim).
Building and loading real sharded state dicts is covered by
tests/checkpoint/test_checkpoint_training.py."""

from megatron_tpo.checkpoint.sharded_state import (_model_key, shape_problems, sharding_metadata,
                                                   uses_distributed_optimizer)


def test_metadata_without_a_distributed_optimizer_keeps_the_default_sharding():
    assert sharding_metadata(None) == {"singleton_local_shards": False,
                                       "chained_optim_avoid_prefix": True}
    plain = type("PlainOptimizer", (), {})()
    assert not uses_distributed_optimizer(plain)
    assert "distrib_optim_sharding_type" not in sharding_metadata(plain)


def test_a_distributed_optimizer_in_a_chain_asks_for_the_fully_reshardable_format():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    sharded = DistributedOptimizer.__new__(DistributedOptimizer)   # its type is what counts
    chained = type("Chained", (), {"chained_optimizers": [object(), sharded]})()
    assert uses_distributed_optimizer(chained)
    assert sharding_metadata(chained)["distrib_optim_sharding_type"] == "fully_reshardable"


def test_model_chunks_are_keyed_as_megatron_lm_keys_them():
    assert [_model_key(0, 1)] == ["model"]
    assert [_model_key(i, 3) for i in range(3)] == ["model0", "model1", "model2"]


def test_shape_problems_name_missing_and_misshapen_tensors_and_allow_vocab_padding():
    saved = {"embedding.word_embeddings.weight": ([128, 64], True),
             "output_layer.weight": ([128, 64], True),
             "decoder.layers.0.mlp.linear_fc1.weight": ([256, 64], False),
             "decoder.final_layernorm.weight": ([64], False)}
    wanted = {"embedding.word_embeddings.weight": ([136, 64], True),    # padded for TP: fine
              "output_layer.weight": ([128, 32], True),                 # hidden differs
              "decoder.layers.0.mlp.linear_fc1.weight": ([255, 64], False),
              "decoder.final_layernorm.weight": ([64], False),
              "decoder.layers.1.mlp.linear_fc1.weight": ([256, 64], False)}
    assert shape_problems(saved, wanted) == [
        "tensor 'decoder.layers.0.mlp.linear_fc1.weight' has shape [256, 64] in the "
        "checkpoint, the model has [255, 64]",
        "tensor 'decoder.layers.1.mlp.linear_fc1.weight' is not in the checkpoint",
        "tensor 'output_layer.weight' has shape [128, 64] in the checkpoint, the model "
        "has [128, 32]",
    ]
    assert shape_problems(saved, {"embedding.word_embeddings.weight": ([128, 64, 1], True)})
    assert shape_problems(saved, saved) == []
