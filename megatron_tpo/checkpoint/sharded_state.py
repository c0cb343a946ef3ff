"""megatron-core sharded state dicts of this rank's model chunks and optimizer.

Every tensor is described by its *global* shape and this rank's offsets in it, so
megatron's ``dist_checkpointing`` writes each element once and any other TP/PP/VPP/DP
layout reads back its own slices. The nesting (``model`` or ``model0``, ``model1``... per
virtual stage, then ``optimizer``) is Megatron-LM's, so its tools can read the files.
"""

from typing import Any, Dict, List, Tuple

TensorShapes = Dict[str, Tuple[List[int], bool]]  # key -> (global shape, vocab-padded)


def unwrapped_chunks(chunks: List) -> List:
    """The ``GPTModel`` inside each DDP wrapper (chunks not wrapped pass through)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(chunks))


def uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(part, DistributedOptimizer) for part in parts)


def sharding_metadata(optimizer) -> Dict[str, Any]:
    """What the checkpoint's layout depends on; stored with it, reused to load it.

    The distributed optimizer's ``fully_reshardable`` format gathers each DP group's
    shards into the canonical per-parameter state, so a run may change TP, PP and DP
    when it resumes; megatron's faster ``dp_reshardable`` would pin TP and PP.
    """
    metadata: Dict[str, Any] = {"singleton_local_shards": False,
                                "chained_optim_avoid_prefix": True}
    if optimizer is not None and uses_distributed_optimizer(optimizer):
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
    return metadata


def _with_process_groups(metadata: Dict[str, Any]) -> Dict[str, Any]:
    from megatron.core import parallel_state

    # Transformer Engine layers shard their extra state over the DP x CP group.
    return {**metadata, "dp_cp_group": parallel_state.get_data_parallel_group(
        with_context_parallel=True)}


def _model_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def model_sharded_state_dict(chunks: List, metadata: Dict[str, Any]) -> Dict[str, Any]:
    models = unwrapped_chunks(chunks)
    full_metadata = _with_process_groups(metadata)
    return {_model_key(index, len(models)): model.sharded_state_dict(metadata=full_metadata)
            for index, model in enumerate(models)}


def with_optimizer(model_state: Dict[str, Any], optimizer, metadata: Dict[str, Any],
                   is_loading: bool) -> Dict[str, Any]:
    """``model_state`` plus the optimizer's moments and step, sharded like the weights.

    With ``is_loading`` megatron first allocates empty optimizer state to load into.
    Before the first step torch's Adam has no state at all; then only the model is
    saved, since megatron would save moments without the step count Adam needs.
    """
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    optimizer_state = optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=_with_process_groups(metadata))
    if not any(isinstance(value, ShardedTensor) for value in nested_values(optimizer_state)):
        return model_state
    return {**model_state, "optimizer": optimizer_state}


def model_tensor_shapes(chunks: List, metadata: Dict[str, Any]) -> TensorShapes:
    """Global shape of every model tensor this rank holds (factories built out)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    state = model_sharded_state_dict(chunks, metadata)
    apply_factories(state)
    return {value.key: (list(value.global_shape), value.allow_shape_mismatch)
            for value in nested_values(state) if isinstance(value, ShardedTensor)}


def shape_problems(saved: TensorShapes, wanted: TensorShapes) -> List[str]:
    """Tensors the model wants that the checkpoint lacks or holds in another shape.

    Tensors megatron marks ``allow_shape_mismatch`` (embedding and output layer) may
    differ in their first dimension only: the vocab is padded to a multiple of TP.
    """
    problems = []
    for key, (shape, vocab_padded) in sorted(wanted.items()):
        if key not in saved:
            problems.append(f"tensor {key!r} is not in the checkpoint")
            continue
        saved_shape = saved[key][0]
        same = (saved_shape[1:] == shape[1:] and len(saved_shape) == len(shape)
                if vocab_padded else saved_shape == shape)
        if not same:
            problems.append(f"tensor {key!r} has shape {saved_shape} in the checkpoint, "
                            f"the model has {shape}")
    return problems


def apply_loaded_state(chunks: List, optimizer, loaded: Dict[str, Any]) -> None:
    """Copy what ``dist_checkpointing.load`` returned into the chunks (and optimizer)."""
    models = unwrapped_chunks(chunks)
    for index, model in enumerate(models):
        model.load_state_dict(loaded[_model_key(index, len(models))], strict=True)
    if optimizer is not None and "optimizer" in loaded:
        optimizer.load_state_dict(loaded["optimizer"])
