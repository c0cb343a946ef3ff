"""Activation recomputation settings as megatron-core ``TransformerConfig`` fields."""

from typing import Any, Dict

from megatron_tpo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_tpo.train.config import DPOTrainingConfig


def recompute_transformer_fields(training: DPOTrainingConfig, model: ModelConfig,
                                 parallel: ParallelConfig) -> Dict[str, Any]:
    """``recompute_granularity``, ``recompute_method`` and ``recompute_num_layers`` for
    ``llama_transformer_config``; ``full`` without a method means uniform units of one layer.

    Refuses more recomputed layers than one (virtual) pipeline stage holds: megatron
    counts them per stage, and would silently recompute the whole stage instead.
    """
    if training.recompute_granularity != "full":
        return {"recompute_granularity": training.recompute_granularity}
    num_layers = training.recompute_num_layers or 1
    stages = parallel.pipeline_model_parallel_size * (
        parallel.virtual_pipeline_model_parallel_size or 1)
    per_stage = model.num_layers // stages
    if num_layers > per_stage:
        raise ConfigError(
            f"train.recompute_num_layers={num_layers}: a pipeline stage holds only {per_stage} "
            f"layers (model.num_layers={model.num_layers} over {stages} (virtual) stages)")
    return {"recompute_granularity": "full",
            "recompute_method": training.recompute_method or "uniform",
            "recompute_num_layers": num_layers}
