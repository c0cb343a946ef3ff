"""Which parameters each rank holds, and the buffers megatron-core allocates for them.

The layout mirrors megatron-core 0.16's ``GPTModel`` with the local layer spec, as
``megatron_tpo.model.llama`` builds it: names and order are ``named_parameters()``'s,
because the gradient buffer's padding depends on the order. Counts are the same with
the Transformer Engine spec (it fuses the two norms into the following linear layers).
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from megatron_tpo.config import ModelConfig

# megatron-core's DDP default when overlap_grad_reduce is on (distributed_data_parallel.py):
# max(40M, 1M * data-parallel size) elements per bucket.
MIN_BUCKET_NUMEL = 40_000_000
BUCKET_NUMEL_PER_DP_RANK = 1_000_000


@dataclass(frozen=True)
class ParamTensor:
    name: str
    numel: int
    # megatron's local-spec RMSNorm (torch's, without apex) ignores params_dtype and keeps
    # its weight in fp32; DDP then gives fp32 parameters a buffer of their own.
    fp32: bool = False


def layer_parameters(model: ModelConfig, tp: int, prefix: str,
                     norms_in_fp32: bool = False) -> List[ParamTensor]:
    """One Llama decoder layer's shards on a TP rank (registration order of the local spec)."""
    h, head_dim = model.hidden_size, model.head_dim
    qkv_rows = (model.num_attention_heads + 2 * model.num_query_groups) * head_dim
    return [
        # Norms are replicated over TP.
        ParamTensor(f"{prefix}.input_layernorm.weight", h, norms_in_fp32),
        ParamTensor(f"{prefix}.self_attention.linear_proj.weight",
                    h * model.num_attention_heads * head_dim // tp),
        ParamTensor(f"{prefix}.self_attention.linear_qkv.weight", qkv_rows // tp * h),
        ParamTensor(f"{prefix}.pre_mlp_layernorm.weight", h, norms_in_fp32),
        # SwiGLU: gate and up projections fused into one column-parallel weight.
        ParamTensor(f"{prefix}.mlp.linear_fc1.weight", 2 * model.ffn_hidden_size // tp * h),
        ParamTensor(f"{prefix}.mlp.linear_fc2.weight", h * model.ffn_hidden_size // tp),
    ]


def chunk_parameters(model: ModelConfig, tp: int, pp: int, vpp: int, pp_rank: int,
                     vp_stage: int = 0, norms_in_fp32: bool = False) -> List[ParamTensor]:
    """The parameters of one model chunk (virtual stage ``vp_stage`` of ``pp_rank``)."""
    layers_per_chunk = model.num_layers // (pp * vpp)
    vocab_shard = model.padded_vocab_size(tp) // tp
    params: List[ParamTensor] = []
    if pp_rank == 0 and vp_stage == 0:
        params.append(ParamTensor("embedding.word_embeddings.weight", vocab_shard * model.hidden_size))
    for index in range(layers_per_chunk):
        params += layer_parameters(model, tp, f"decoder.layers.{index}", norms_in_fp32)
    if pp_rank == pp - 1 and vp_stage == vpp - 1:
        params.append(ParamTensor("decoder.final_layernorm.weight", model.hidden_size,
                                  norms_in_fp32))
        if not (model.tie_word_embeddings and pp == 1):
            # Tied at PP > 1, the last stage still holds a copy of the embedding.
            params.append(ParamTensor("output_layer.weight", vocab_shard * model.hidden_size))
    return params


def total_parameters(model: ModelConfig) -> int:
    """Unsharded parameter count (unpadded vocabulary), e.g. 8.03e9 for Llama-3 8B."""
    per_layer = sum(p.numel for p in layer_parameters(model, 1, "layer"))
    embeddings = (1 if model.tie_word_embeddings else 2) * model.vocab_size * model.hidden_size
    return model.num_layers * per_layer + embeddings + model.hidden_size


def most_loaded_rank_parameters(model: ModelConfig, tp: int, pp: int, vpp: int) -> Tuple[int, int]:
    """(pipeline stage, parameters on each of its ranks) of the stage holding the most.

    Middle stages hold only layers; the first adds the embedding, the last the output
    layer (and final norm), so one of those two is the answer. DP and CP replicate.
    """
    def stage_total(pp_rank: int) -> int:
        return sum(p.numel for vp_stage in range(vpp)
                   for p in chunk_parameters(model, tp, pp, vpp, pp_rank, vp_stage))
    return max(((rank, stage_total(rank)) for rank in sorted({0, pp - 1})),
               key=lambda item: (item[1], -item[0]))


@dataclass(frozen=True)
class GradBufferLayout:
    """megatron-core's ``_ParamAndGradBuffer`` for one model chunk: padded size and buckets."""

    numel: int
    numel_unpadded: int
    buckets: Tuple[Tuple[int, int], ...]
    param_ranges: Tuple[Tuple[int, int], ...]  # (start, end) of each parameter, any order

    def optimizer_shard_numel(self, dp_rank: int, dp_size: int) -> int:
        """Real (non-padding) elements in ``dp_rank``'s shard of every bucket.

        The distributed optimizer gives each DP rank a contiguous 1/dp of each bucket and
        keeps state only for the parameter elements inside it (distrib_optimizer.py,
        ``_build_model_gbuf_param_range_map``), so ranks can differ by the padding.
        """
        total = 0
        for bucket_start, bucket_end in self.buckets:
            shard = (bucket_end - bucket_start) // dp_size
            lo = bucket_start + dp_rank * shard
            hi = lo + shard
            for start, end in self.param_ranges:
                total += max(0, min(end, hi) - max(start, lo))
        return total


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def grad_buffer_layout(params: List[ParamTensor], dp_size: int, bucket_numel: Optional[int],
                       distributed_optimizer: bool) -> GradBufferLayout:
    """Replay megatron-core 0.16's buffer packing (param_and_grad_buffer.py).

    Parameters are packed in reverse registration order (roughly backprop order). With
    the distributed optimizer every parameter starts on a 64-element boundary and every
    bucket is padded to a multiple of lcm(dp, 128) so it splits evenly across DP ranks.
    A bucket closes once it holds ``bucket_numel`` elements (None: one bucket).
    """
    bucket_multiple = math.lcm(dp_size, 128) if distributed_optimizer else 1
    param_start_multiple = 64 if distributed_optimizer else 1
    buckets: List[Tuple[int, int]] = []
    ranges: List[Tuple[int, int]] = []
    bucket_start = param_start = param_end = 0
    unpadded = 0
    open_bucket = False
    for param in reversed(params):
        param_start = _round_up(param_start, param_start_multiple)
        param_end = param_start + param.numel
        ranges.append((param_start, param_end))
        open_bucket = True
        if bucket_numel is not None and param_end - bucket_start >= bucket_numel:
            unpadded += param_end - bucket_start
            bucket_end = _round_up(param_end, bucket_multiple)
            buckets.append((bucket_start, bucket_end))
            bucket_start = param_start = bucket_end
            open_bucket = False
        else:
            param_start = param_end
    if open_bucket:
        unpadded += param_end - bucket_start
        buckets.append((bucket_start, _round_up(param_end, bucket_multiple)))
    numel = buckets[-1][1] if buckets else 0
    return GradBufferLayout(numel, unpadded, tuple(buckets), tuple(ranges))


@dataclass(frozen=True)
class RankParameters:
    """What one rank allocates for parameters, gradients and optimizer state (elements).

    "low" is the training dtype (bf16) buffer, "fp32" the buffer of parameters kept in
    fp32 (the local spec's norms); each is padded on its own.
    """

    parameters: int            # real parameter elements (sum over this rank's chunks)
    low_buffer_numel: int      # padded param and grad buffer of bf16 parameters
    fp32_buffer_numel: int
    low_optimizer_shard: int   # elements whose optimizer state this rank keeps
    fp32_optimizer_shard: int

    @property
    def buffer_numel(self) -> int:
        return self.low_buffer_numel + self.fp32_buffer_numel

    @property
    def optimizer_shard(self) -> int:
        return self.low_optimizer_shard + self.fp32_optimizer_shard

    def weight_bytes(self, param_bytes: int) -> int:
        return self.low_buffer_numel * param_bytes + self.fp32_buffer_numel * 4

    def gradient_bytes(self, grad_bytes: int) -> int:
        return self.low_buffer_numel * grad_bytes + self.fp32_buffer_numel * 4

    def optimizer_bytes(self, param_bytes: int) -> int:
        """Adam m and v in fp32 for every owned element, plus an fp32 master copy of the
        low-precision ones (fp32 parameters are updated in place)."""
        master = 4 if param_bytes < 4 else 0
        return self.low_optimizer_shard * (master + 8) + self.fp32_optimizer_shard * 8


def default_bucket_numel(dp_size: int) -> int:
    return max(MIN_BUCKET_NUMEL, BUCKET_NUMEL_PER_DP_RANK * dp_size)


def rank_parameters(model: ModelConfig, tp: int, pp: int, vpp: int, pp_rank: int,
                    dp_rank: int, dp_size: int, dp_cp_size: int, distributed_optimizer: bool = True,
                    overlap_grad_reduce: bool = True, bucket_numel: Optional[int] = None,
                    norms_in_fp32: bool = False) -> RankParameters:
    """Parameters and buffers of the rank at (``pp_rank``, ``dp_rank``) in the DP x CP group.

    megatron wraps each virtual-stage chunk in its own DDP; only the first chunk of the
    first pipeline stage uses buckets (the others' reduction is off the critical path),
    and buckets exist only with ``overlap_grad_reduce``. The bucket size follows the DP
    group without CP, the padding the DP x CP group the buffer is sharded over.
    ``bucket_numel`` overrides megatron's default bucket size (DDP's ``bucket_size``).
    ``norms_in_fp32``: the local spec's torch norms (the Transformer Engine spec, used on
    GPUs, keeps them in bf16, fused into the following linear layer).
    """
    bucket_numel = bucket_numel or default_bucket_numel(dp_size)
    parameters = 0
    buffers = {False: 0, True: 0}  # keyed by "is fp32"
    shards = {False: 0, True: 0}
    for vp_stage in range(vpp):
        params = chunk_parameters(model, tp, pp, vpp, pp_rank, vp_stage, norms_in_fp32)
        parameters += sum(p.numel for p in params)
        bucketed = overlap_grad_reduce and pp_rank == 0 and vp_stage == 0
        for fp32 in (False, True):  # DDP builds one buffer per (param, grad) dtype
            group = [p for p in params if p.fp32 == fp32]
            layout = grad_buffer_layout(group, dp_cp_size, bucket_numel if bucketed else None,
                                        distributed_optimizer)
            buffers[fp32] += layout.numel
            shards[fp32] += (layout.optimizer_shard_numel(dp_rank, dp_cp_size)
                             if distributed_optimizer else layout.numel_unpadded)
    return RankParameters(parameters, buffers[False], buffers[True], shards[False], shards[True])



_RANK_PARAMETERS_CACHE: Dict[tuple, RankParameters] = {}


def cached_rank_parameters(model: ModelConfig, tp: int, pp: int, vpp: int, pp_rank: int,
                           dp_rank: int, dp_size: int, dp_cp_size: int) -> RankParameters:
    """``rank_parameters`` remembered across the thousands of layouts a search tries."""
    key = (model.num_layers, model.hidden_size, model.ffn_hidden_size, model.num_attention_heads,
           model.num_query_groups, model.padded_vocab_size(tp), tp, pp, vpp, pp_rank, dp_rank,
           dp_size, dp_cp_size)
    if key not in _RANK_PARAMETERS_CACHE:
        _RANK_PARAMETERS_CACHE[key] = rank_parameters(model, tp, pp, vpp, pp_rank, dp_rank,
                                                      dp_size, dp_cp_size)
    return _RANK_PARAMETERS_CACHE[key]
