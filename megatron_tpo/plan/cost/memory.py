"""Per-GPU memory of the megatron-core trainer for one layout, item by item.

Activations follow Korthikanti et al., "Reducing Activation Recomputation in Large
Transformer Models" (2022), adapted to Llama (see ``activation_bytes_per_token``).
Weights, gradients and optimizer state come from the exact buffer layout in
``parameters``; what the pipeline keeps in flight from megatron's 1F1B schedules.
"""

from dataclasses import asdict, dataclass
from typing import Dict

from megatron_tpo.config import ModelConfig
from megatron_tpo.plan.cost.parameters import RankParameters, cached_rank_parameters
from megatron_tpo.plan.hardware import GIB
from megatron_tpo.plan.workload import TrainingLayout, Workload


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes on the most loaded GPU of one pipeline stage."""

    pipeline_stage: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    communication: float
    runtime_reserve: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.logits + self.communication + self.runtime_reserve)

    def as_gib(self) -> Dict[str, float]:
        items = {k: v / GIB for k, v in asdict(self).items() if k != "pipeline_stage"}
        items["total"] = self.total / GIB
        return items


def activation_bytes_per_token(model: ModelConfig, seq_len: int, layout: TrainingLayout,
                               attention: str) -> float:
    """Bytes one decoder layer keeps for backward, per token of a micro-batch, no recompute.

    Korthikanti et al. count sbh(34 + 5as/h) for GPT (4h GELU MLP, dropout, MHA). For
    Llama, in units of bytes per token per hidden unit (bf16 = 2 bytes):
      attention: norm input 2 + norm output 2 + Q 2 + K,V 2*2*g/a (GQA: g query groups)
                 + core-attention output 2                         = 8 + 4g/a
      MLP:       norm input 2 + norm output 2 + fc1 output 2*2f/h (gate and up)
                 + SwiGLU output 2f/h                              = 4 + 6f/h
    Llama has no dropout, so the masks (sbh + as^2b) and the dropout outputs vanish.
    Scores: unfused attention keeps the softmax output, 2as/h per token; flash attention
    keeps only an fp32 log-sum-exp per head (4a/h). FP8 (Transformer Engine) keeps the
    inputs of the four linear layers in one byte instead of two: saves 3 + f/h.
    With TP and sequence parallelism everything is split over TP; with CP the sequence.
    """
    h, a, g, f = (model.hidden_size, model.num_attention_heads, model.num_query_groups,
                  model.ffn_hidden_size)
    units = (8 + 4 * g / a) + (4 + 6 * f / h)
    if layout.fp8:
        units -= 3 + f / h
    if attention == "flash":
        units += 4 * a / h
    elif layout.recompute != "selective":  # selective recomputes the scores instead
        units += 2 * a * seq_len / h
    return units * h / layout.tp


def chunk_microbatches_in_flight(layout: TrainingLayout, pp_rank: int, microbatches: int) -> int:
    """Model-chunk activations (chunks x micro-batches) stage ``pp_rank`` holds at its peak.

    megatron's 1F1B schedules run ``warmup`` forward passes before the first backward and
    then keep one more in flight: warmup = pp - rank - 1 without interleaving, and
    2(pp - rank - 1) + (vpp - 1) pp model chunks with it (schedules.py,
    ``get_pp_rank_microbatches``). For the first stage this is Korthikanti's
    pp * (1 + (pp - 1)/(pp vpp)) micro-batches of L/pp layers.
    """
    total_chunk_microbatches = microbatches * layout.vpp
    if layout.vpp == 1:
        warmup = layout.pp - pp_rank - 1
    else:
        warmup = 2 * (layout.pp - pp_rank - 1) + (layout.vpp - 1) * layout.pp
    return min(warmup + 1, total_chunk_microbatches)


def stage_memory(workload: Workload, layout: TrainingLayout, pp_rank: int,
                 params: RankParameters) -> TrainingMemory:
    model, assume = workload.model, workload.assumptions
    h, tp = model.hidden_size, layout.tp
    tokens = layout.micro_batch * workload.seq_len // layout.cp  # per micro-batch, this rank
    microbatches = layout.num_microbatches(workload.global_batch)
    layers_per_chunk = model.num_layers // (layout.pp * layout.vpp)
    stored_layers = chunk_microbatches_in_flight(layout, pp_rank, microbatches) * layers_per_chunk

    per_layer = tokens * activation_bytes_per_token(model, workload.seq_len, layout,
                                                    assume.attention)
    if layout.recompute == "full":
        # Only each layer's input survives the forward pass (sharded by SP); backward
        # recomputes one layer at a time, whose full activations exist meanwhile.
        activations = stored_layers * tokens * 2 * h / tp + per_layer
    else:
        activations = stored_layers * per_layer

    logits = 0.0
    last_stage = pp_rank == layout.pp - 1
    vocab_shard = model.padded_vocab_size(tp) // tp
    if last_stage:
        activations += tokens * 4 * h / tp  # final norm input and output
        if assume.logprobs == "naive":
            # bf16 logits from the output layer plus their fp32 copy for log-softmax.
            logits = tokens * vocab_shard * (2 + 4)
        else:
            # The fused kernel (kernels/dpo_logprob/logprob_triton.py) keeps logit tiles on chip; in
            # memory it has 4 fp32 statistics per token and, in backward, fp32 gradients
            # of the hidden states and of the whole output-layer shard, and the
            # deterministic backward's split workspace.
            logits = (tokens * 4 * 4 + tokens * h * 4 + vocab_shard * h * 4
                      + assume.logprob_workspace_gib * GIB)

    communication = 0.0
    if tp > 1:  # sequence-parallel all-gather workspace (megatron's global memory buffer)
        communication += tokens * h * 2
    if layout.pp > 1:  # p2p receive buffers for activations and their gradients
        communication += 2 * tokens * h / tp * 2
    if layout.cp > 1:  # K,V ring send/receive buffers, forward and backward
        kv_width = 2 * model.num_query_groups * model.head_dim / tp
        communication += 2 * 2 * tokens * kv_width * 2

    weights = params.weight_bytes(assume.param_bytes)
    if layout.fp8:
        # Transformer Engine caches an FP8 copy of each weight for the micro-batches of a
        # step (its Hopper transpose is made per GEMM and counted in the reserve).
        weights += params.parameters * 1
    return TrainingMemory(
        pipeline_stage=pp_rank,
        weights=weights,
        gradients=params.gradient_bytes(assume.grad_bytes),
        optimizer=params.optimizer_bytes(assume.param_bytes),
        activations=activations,
        logits=logits,
        communication=communication,
        runtime_reserve=assume.runtime_reserve_gib * GIB,
    )


def training_memory(workload: Workload, layout: TrainingLayout) -> TrainingMemory:
    """The worst pipeline stage: the first holds the most micro-batches, the last the logits.

    Middle stages hold fewer micro-batches than the first and no logits, so they never peak.
    """
    worst = None
    for pp_rank in sorted({0, layout.pp - 1}):
        params = cached_rank_parameters(workload.model, layout.tp, layout.pp, layout.vpp,
                                        pp_rank, dp_rank=0, dp_size=layout.dp,
                                        dp_cp_size=layout.dp_cp)
        memory = stage_memory(workload, layout, pp_rank, params)
        if worst is None or memory.total > worst.total:
            worst = memory
    return worst
