"""The Llama-3 family as a megatron-core ``GPTModel``.

Llama-3 in megatron terms: RMSNorm, SwiGLU (gated linear unit with SiLU), RoPE without
interleaving (HF's rotate-half convention, so converted weights need no permutation),
grouped-query attention, no biases. Input and output embeddings are untied (Llama 3,
3.1) or tied (Llama 3.2 1B/3B, SmolLM2): tied uses megatron's
``share_embeddings_and_output_weights``, under which at PP > 1 the last stage holds a
copy that megatron keeps equal to the first stage's through its embedding group (one
all-reduce at build time, the gradients summed in ``finalize_model_grads``).
"""

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_tpo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_tpo.model.config_names import write_fields
from megatron_tpo.parallel.te_probe import transformer_engine_status

# The CUDA extensions behind megatron-core's FusedScaleMaskSoftmax (fusions/fused_softmax.py):
# apex or Megatron-LM's legacy build provide them; the megatron-core wheel does not.
FUSED_SOFTMAX_KERNELS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                         "scaled_softmax_cuda")


def transformer_engine_available() -> bool:
    """Whether TE's layers can be used; a broken TE install is not (see te_probe)."""
    return transformer_engine_status()[0]


def layer_spec_choice() -> Tuple[str, str]:
    """``(name, why)`` of the layer spec models are built from: ``"transformer_engine"``
    or ``"local"`` (megatron-core's own layers), for tpo-doctor and the logs."""
    usable, reason = transformer_engine_status()
    if usable:
        return "transformer_engine", reason
    return "local", f"{reason}; megatron-core's local layers (no FP8, context or sequence " \
                    "parallelism)"


# Both answer from one cached probe; clearing either re-probes (tests, tpo-doctor).
transformer_engine_available.cache_clear = transformer_engine_status.cache_clear
layer_spec_choice.cache_clear = transformer_engine_status.cache_clear


@functools.lru_cache(maxsize=1)
def fused_softmax_kernels_available() -> bool:
    """Whether megatron-core's fused masked softmax has its kernels: with
    ``masked_softmax_fusion`` on and none of them, the first bf16 attention forward of the
    local spec fails importing ``scaled_masked_softmax_cuda``."""
    import importlib

    try:
        for name in FUSED_SOFTMAX_KERNELS:
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 - missing, or built for another torch
        return False
    return True


def llama_layer_spec(use_transformer_engine: Optional[bool] = None):
    """The one place that chooses Transformer Engine layers or megatron's local ones."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()   # before megatron-core
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec,
    )

    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def _check_rope_scaling(model: ModelConfig) -> None:
    """Refuse llama3 RoPE scaling values whose inverse frequencies would be inf or NaN."""
    scaling = model.rope_scaling
    if scaling is None:
        return
    if not scaling.factor >= 1.0:
        raise ConfigError(f"model.rope_scaling.factor={scaling.factor}: must be at least 1")
    if not 0 < scaling.low_freq_factor < scaling.high_freq_factor:
        # The smoothing between the two wavelengths divides by their difference.
        raise ConfigError(
            f"model.rope_scaling.low_freq_factor={scaling.low_freq_factor}, "
            f"high_freq_factor={scaling.high_freq_factor}: need 0 < low_freq_factor < high_freq_factor")
    if scaling.original_max_position_embeddings <= 0:
        raise ConfigError("model.rope_scaling.original_max_position_embeddings="
                          f"{scaling.original_max_position_embeddings}: must be positive")


def check_buildable(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Run every check ``build_llama`` runs, without building: conversions call this
    before writing anything, so a checkpoint they write is one the builder accepts."""
    model.validate()
    parallel.validate(model)
    _check_rope_scaling(model)
    _check_local_spec_support(parallel)


def _apply_llama3_rope_scaling(gpt, model: ModelConfig) -> None:
    """Scale the rotary inverse frequencies with all four llama3 parameters.

    megatron-core 0.16's ``GPTModel`` passes only ``factor`` to ``RotaryEmbedding``,
    which fixes the other three at Llama 3.1's values; its own ``_apply_scaling`` takes
    all four, so the model is built unscaled and the frequencies are rescaled here.
    """
    rotary = getattr(gpt, "rotary_pos_emb", None)
    if model.rope_scaling is None or rotary is None:
        return
    scaling = model.rope_scaling
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings)


def _check_local_spec_support(parallel: ParallelConfig) -> None:
    """Refuse what megatron's local layers cannot do; Transformer Engine's can."""
    if transformer_engine_available():
        return
    if parallel.context_parallel_size > 1:
        raise ConfigError(
            f"parallel.context_parallel_size={parallel.context_parallel_size} needs Transformer "
            "Engine's attention; megatron's local attention has no context parallelism")
    if parallel.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel=true needs Transformer Engine (or apex): "
                          "megatron's local RMSNorm cannot run sequence-parallel")


def llama_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    params_dtype: torch.dtype = torch.float32,
    recompute_granularity: Optional[str] = None,
    **overrides,
):
    """A megatron ``TransformerConfig`` for ``model`` laid out as ``parallel`` says.

    ``overrides`` go straight to ``TransformerConfig`` (FP8 recipes, recompute methods).
    """
    check_buildable(model, parallel)   # probes Transformer Engine before megatron-core
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    settings = dict(
        write_fields(model, "megatron"),
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        recompute_granularity=recompute_granularity,
        # The fused paths below need apex or CUDA kernels; the torch ones are exact.
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=on_gpu and fused_softmax_kernels_available(),
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # Batched p2p posts send-to-prev before recv-from-prev; gloo matches messages per
        # peer in order, so at PP=2 (prev == next) a gradient would arrive where an
        # activation is expected. Unbatched p2p orders them by rank parity instead.
        batch_p2p_comm=on_gpu,
    )
    if recompute_granularity == "full":
        settings.update(recompute_method="uniform", recompute_num_layers=1)
    settings.update(overrides)
    return TransformerConfig(**settings)


def build_llama(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    params_dtype: torch.dtype = torch.float32,
    config=None,
):
    """Build this rank's ``GPTModel`` chunk; megatron's parallel state must be initialised.

    ``pre_process``/``post_process`` default to whether this rank holds the first/last
    pipeline stage (of virtual stage ``vp_stage``).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = config or llama_transformer_config(model, parallel, params_dtype)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=llama_layer_spec(),
        vocab_size=model.padded_vocab_size(parallel.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta),
        rope_scaling=False,  # applied below with all four llama3 parameters
        vp_stage=vp_stage,
    )
    _apply_llama3_rope_scaling(gpt, model)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt


def build_llama_chunks(model: ModelConfig, parallel: ParallelConfig, **kwargs) -> List:
    """One ``GPTModel`` per virtual pipeline stage held by this rank (one without VPP)."""
    virtual_stages = parallel.virtual_pipeline_model_parallel_size or 1
    if virtual_stages == 1:
        return [build_llama(model, parallel, **kwargs)]
    return [build_llama(model, parallel, vp_stage=stage, **kwargs)
            for stage in range(virtual_stages)]
