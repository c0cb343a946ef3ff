"""FP8 training through Transformer Engine: the config as TransformerConfig fields.

megatron-core runs each transformer layer under TE's ``fp8_autocast`` with the recipe
these fields describe, when the layers come from TE's spec (``llama_layer_spec``
picks it whenever TE imports). Settings that cannot work are refused here, before any
weight is loaded, and the shape rules are checked even where TE is absent, so a
cluster job's config can be vetted on a laptop.
"""

from typing import Dict

import torch

from megatron_tpo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_tpo.train.config import DPOTrainingConfig, FP8Config
from megatron_tpo.model.llama import transformer_engine_available

# TE checks every FP8 GEMM operand: rows (tokens) a multiple of 8 and columns a multiple
# of 16 for the per-tensor recipes (TE 2.11 pytorch/utils.py assert_dim_for_fp8_exec);
# MXFP8 scales blocks of 32 along both (tensor/mxfp8_tensor.py is_quantizable).
_ROW_MULTIPLE = {"mxfp8": 32}
_COLUMN_MULTIPLE = {"mxfp8": 32}


def token_rows_multiple(recipe: str) -> int:
    """The multiple of token rows (tokens a TP rank's GEMM input holds: batch * sequence,
    divided by TP under sequence parallelism) that FP8 GEMMs with ``recipe`` need."""
    return _ROW_MULTIPLE.get(recipe, 8)
_FP8_COMPUTE_CAPABILITY = (8, 9)      # Ada and Hopper have FP8 tensor cores
_MXFP8_COMPUTE_CAPABILITY = (10, 0)   # MXFP8 block scaling is Blackwell's


def _check_gemm_widths(recipe: str, model: ModelConfig, parallel: ParallelConfig) -> None:
    multiple = _COLUMN_MULTIPLE.get(recipe, 16)
    tp = parallel.tensor_model_parallel_size
    heads, groups, head_dim = model.num_attention_heads, model.num_query_groups, model.head_dim
    widths = {
        "model.hidden_size": model.hidden_size,
        f"model.ffn_hidden_size / parallel.tensor_model_parallel_size={tp}":
            model.ffn_hidden_size // tp,
        f"the QKV projection per TP rank ((num_attention_heads + 2 * num_query_groups) * "
        f"head_dim / {tp})": (heads + 2 * groups) * head_dim // tp,
        f"the attention output projection per TP rank (num_attention_heads * head_dim / {tp})":
            heads * head_dim // tp,
    }
    for name, width in widths.items():
        if width % multiple:
            raise ConfigError(f"train.fp8.enabled=true: {name} = {width} is not a multiple of "
                              f"{multiple}, which Transformer Engine's FP8 GEMMs need "
                              f"(recipe {recipe!r})")


def _check_tokens_per_micro_batch(training: DPOTrainingConfig, parallel: ParallelConfig) -> None:
    """Every micro-batch is 2 * micro_batch_pairs sequences padded to a multiple of
    pad_to_multiple_of tokens; that product must keep the token rows aligned."""
    multiple = token_rows_multiple(training.fp8.recipe)
    tp = parallel.tensor_model_parallel_size
    pad = training.pad_to_multiple_of
    split = tp if parallel.sequence_parallel else 1
    if pad % split:
        raise ConfigError(f"train.pad_to_multiple_of={pad} is not a multiple of "
                          f"parallel.tensor_model_parallel_size={tp}: sequence parallelism "
                          "splits every sequence evenly over the TP ranks")
    guaranteed = 2 * training.micro_batch_pairs * pad // split
    if guaranteed % multiple:
        raise ConfigError(
            f"train.fp8.enabled=true with train.micro_batch_pairs="
            f"{training.micro_batch_pairs} and train.pad_to_multiple_of={pad}"
            + (f" (sequence parallel over {tp} ranks)" if split > 1 else "")
            + f": tokens per micro-batch are only guaranteed to be a multiple of {guaranteed}; "
            f"Transformer Engine's FP8 GEMMs need a multiple of {multiple} "
            f"(recipe {training.fp8.recipe!r}); raise train.pad_to_multiple_of")


def _check_environment(recipe: str) -> None:
    if not transformer_engine_available():
        raise ConfigError("train.fp8.enabled=true needs Transformer Engine "
                          "(pip install transformer-engine[pytorch]), which does not import here")
    if not torch.cuda.is_available():
        raise ConfigError("train.fp8.enabled=true needs a CUDA GPU: FP8 GEMMs have no CPU "
                          "implementation")
    capability = torch.cuda.get_device_capability()
    needed = _MXFP8_COMPUTE_CAPABILITY if recipe == "mxfp8" else _FP8_COMPUTE_CAPABILITY
    if capability < needed:
        raise ConfigError(f"train.fp8.recipe={recipe!r} needs compute capability "
                          f"{needed[0]}.{needed[1]} or newer; this GPU has "
                          f"{capability[0]}.{capability[1]}")


def check_fp8_settings(training: DPOTrainingConfig, model: ModelConfig,
                       parallel: ParallelConfig, check_environment: bool = True) -> None:
    """Raise ``ConfigError`` naming the setting when ``train.fp8`` cannot work."""
    if not training.fp8.enabled:
        return
    training.fp8.validate()
    _check_gemm_widths(training.fp8.recipe, model, parallel)
    _check_tokens_per_micro_batch(training, parallel)
    if check_environment:
        _check_environment(training.fp8.recipe)


def transformer_config_fields(fp8: FP8Config) -> Dict[str, object]:
    """``fp8`` in megatron-core 0.16 ``TransformerConfig`` field names (checks nothing)."""
    return dict(fp8=fp8.format, fp8_recipe=fp8.recipe, fp8_margin=fp8.margin,
                fp8_amax_history_len=fp8.amax_history_len,
                fp8_amax_compute_algo=fp8.amax_compute_algo, fp8_wgrad=fp8.wgrad)


def fp8_transformer_overrides(training: DPOTrainingConfig, model: ModelConfig,
                              parallel: ParallelConfig) -> Dict[str, object]:
    """Checked ``TransformerConfig`` fields for ``train.fp8``; {} when FP8 is off."""
    check_fp8_settings(training, model, parallel)
    return transformer_config_fields(training.fp8) if training.fp8.enabled else {}
