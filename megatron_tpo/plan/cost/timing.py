"""Estimated optimizer-step time of the trainer for one layout.

compute  = FLOPs of the slowest pipeline stage at the assumed MFU, per micro-batch, times m
bubble   = (pp - 1) / vpp of those per-micro-batch times (Narayanan et al. 2021, the
           interleaved 1F1B bubble (pp - 1)/(vpp m) of the compute)
comm     = TP, CP, PP and DP traffic over NVLink or the network, minus what megatron
           overlaps with compute (CP ring steps with attention, DP reduce-scatter with the
           last backward, DP all-gather with the first forward); TP and PP are charged
           in full, which makes the estimate conservative for TP-heavy layouts
optimizer= Adam over this rank's shard at HBM bandwidth
"""

from dataclasses import asdict, dataclass
from typing import Dict

from megatron_tpo.config import ModelConfig
from megatron_tpo.plan.cost.parameters import cached_rank_parameters, layer_parameters
from megatron_tpo.plan.workload import TrainingLayout, Workload

# Start-up cost of one NCCL collective or p2p transfer (the alpha of the alpha-beta
# model): it dominates the many small TP and PP messages of small micro-batches.
COMMUNICATION_LATENCY_S = 20e-6
# Bytes Adam touches per element of the shard: read fp32 grad, master, m, v; write
# master, m, v; write the bf16 parameter.
ADAM_BYTES_PER_ELEMENT = 4 * 4 + 3 * 4 + 2


@dataclass(frozen=True)
class StepTime:
    compute: float
    bubble: float
    tensor_parallel_comm: float
    context_parallel_comm: float
    pipeline_comm: float
    data_parallel_comm: float
    optimizer: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def as_dict(self) -> Dict[str, float]:
        items = asdict(self)
        items["total"] = self.total
        return items


def layer_gemm_flops_per_token(model: ModelConfig) -> float:
    """Forward + backward GEMM FLOPs of one layer per token: 6 per weight (2 fwd, 4 bwd)."""
    return 6 * sum(p.numel for p in layer_parameters(model, 1, "layer"))


def attention_flops_per_token(model: ModelConfig, seq_len: int, attention: str) -> float:
    """QK^T and AV, forward + backward, per token per layer.

    Each is 2*s*h FLOPs forward per token over all keys; backward twice that. Causal
    flash attention skips the masked half (6sh); the unfused kernel computes it (12sh).
    """
    full = 3 * 2 * 2 * seq_len * model.hidden_size
    return full / 2 if attention == "flash" else full


def model_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Useful FLOPs per token (6N + causal attention), the numerator of MFU."""
    output_layer = 6 * model.hidden_size * model.vocab_size
    return model.num_layers * (layer_gemm_flops_per_token(model)
                               + attention_flops_per_token(model, seq_len, "flash")) + output_layer


def _ring_seconds(size_bytes: float, group: int, bandwidth: float) -> float:
    """One ring all-gather or reduce-scatter: each GPU sends (n-1)/n of the data."""
    if group == 1:
        return 0.0
    return COMMUNICATION_LATENCY_S + size_bytes * (group - 1) / group / bandwidth


def step_time(workload: Workload, layout: TrainingLayout) -> StepTime:
    model, cluster, assume = workload.model, workload.cluster, workload.assumptions
    gpu, seq, tp, cp = cluster.gpu, workload.seq_len, layout.tp, layout.cp
    tokens = layout.micro_batch * seq // cp  # per micro-batch on this rank
    microbatches = layout.num_microbatches(workload.global_batch)
    layers_per_stage = model.num_layers // layout.pp
    recompute_factor = 4 / 3 if layout.recompute == "full" else 1.0  # forward runs twice

    gemm_rate = gpu.peak_flops(layout.fp8) * (assume.mfu_fp8 if layout.fp8 else assume.mfu_bf16)
    bf16_rate = gpu.peak_flops(False) * assume.mfu_bf16  # attention stays in bf16 under FP8
    layer_gemm = tokens * layer_gemm_flops_per_token(model) / tp * recompute_factor
    layer_attention = tokens * attention_flops_per_token(model, seq, assume.attention) / tp
    layer_attention *= recompute_factor
    if layout.recompute == "selective":
        layer_attention *= 4 / 3  # the scores are recomputed in backward
    layer_seconds = layer_gemm / gemm_rate + layer_attention / bf16_rate
    output_seconds = tokens * 6 * model.hidden_size * model.padded_vocab_size(tp) / tp / gemm_rate
    # Stages hold equal numbers of layers; the last one also runs the output layer.
    microbatch_seconds = layers_per_stage * layer_seconds + output_seconds

    compute = microbatches * microbatch_seconds
    bubble = (layout.pp - 1) / layout.vpp * microbatch_seconds

    activation_bytes = tokens * model.hidden_size * 2
    tp_comm = 0.0
    if tp > 1:
        # Sequence parallelism: all-gather before and reduce-scatter after attention and
        # MLP, forward and backward (and forward again with full recomputation).
        collectives = 8 + (4 if layout.recompute == "full" else 0)
        per_layer = collectives * _ring_seconds(activation_bytes, tp, cluster.bandwidth(1, tp))
        tp_comm = microbatches * layers_per_stage * per_layer

    cp_comm = 0.0
    if cp > 1:
        # Ring attention passes each rank's K,V block around the ring (cp - 1 steps)
        # forward, and K,V plus their gradients backward; each step hides behind the
        # attention of the block already there.
        kv_bytes = 2 * tokens * model.num_query_groups * model.head_dim / tp * 2
        ring = 3 * (cp - 1) * kv_bytes / cluster.bandwidth(tp, cp)
        per_layer = max(0.0, ring - layer_attention / bf16_rate)
        cp_comm = microbatches * layers_per_stage * per_layer

    pipeline_comm = 0.0
    if layout.pp > 1:
        stride = tp * cp * layout.dp
        sends = 2 * microbatches * layout.vpp  # activation forward, its gradient backward
        pipeline_comm = sends * (COMMUNICATION_LATENCY_S + activation_bytes / tp
                                 / cluster.bandwidth(stride, layout.pp))

    params = cached_rank_parameters(model, tp, layout.pp, layout.vpp, 0, 0, layout.dp,
                                    layout.dp_cp)
    dp_bandwidth = cluster.bandwidth(tp, layout.dp_cp)
    reduce_scatter = _ring_seconds(params.gradient_bytes(assume.grad_bytes), layout.dp_cp,
                                   dp_bandwidth)
    all_gather = _ring_seconds(params.weight_bytes(assume.param_bytes), layout.dp_cp,
                               dp_bandwidth)
    backward_seconds = microbatch_seconds * 2 / 3
    forward_seconds = microbatch_seconds / 3
    data_parallel_comm = (max(0.0, reduce_scatter - backward_seconds)
                          + max(0.0, all_gather - forward_seconds))

    optimizer = params.optimizer_shard * ADAM_BYTES_PER_ELEMENT / gpu.hbm_bytes_per_s
    return StepTime(compute, bubble, tp_comm, cp_comm, pipeline_comm, data_parallel_comm,
                    optimizer)
