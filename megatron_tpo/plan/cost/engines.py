"""Layouts of the generation engines (the vLLM policy and the LLM judge) on one node.

An engine replica is one vLLM instance with tensor parallelism TP; a node runs
gpus_per_node / TP replicas. vLLM gives each GPU ``gpu_memory_utilization`` of its memory:
the TP-sharded weights, a working reserve, and the rest becomes KV cache.
"""

from dataclasses import dataclass
from typing import List

from megatron_tpo.config import ModelConfig
from megatron_tpo.plan.cost.parameters import total_parameters
from megatron_tpo.plan.hardware import GIB
from megatron_tpo.plan.workload import Cluster

ENGINE_TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)
# vLLM's activation peak during its profiling run, CUDA graphs and NCCL, per GPU.
ENGINE_WORKSPACE_GIB = 2.0
# vLLM's default cap on sequences decoded together (max_num_seqs).
MAX_NUM_SEQS = 256
# A tensor-parallel all-reduce of a decode step's small activations is latency-bound.
ALL_REDUCE_LATENCY_S = 10e-6


@dataclass(frozen=True)
class EnginePlan:
    role: str  # "policy" or "judge"
    tp: int
    replicas_per_node: int
    weights_gib: float         # per GPU
    kv_cache_gib: float        # per GPU
    kv_cache_tokens: int       # per replica
    concurrent_sequences: int  # per replica, at seq_len tokens each
    decode_tokens_per_second_per_node: float


@dataclass(frozen=True)
class EngineRejection:
    role: str
    tp: int
    reason: str


@dataclass(frozen=True)
class EngineSearch:
    role: str
    model_name: str
    plans: List[EnginePlan]  # highest decode throughput per node first
    rejections: List[EngineRejection]


def kv_bytes_per_token_per_gpu(model: ModelConfig, tp: int, dtype_bytes: int = 2) -> int:
    """2 (K and V) x layers x KV heads on this GPU x head_dim x ``dtype_bytes`` (bf16: 2).

    With TP larger than the number of KV heads, vLLM replicates each KV head.
    """
    kv_heads_per_gpu = max(1, model.num_query_groups // tp)
    return 2 * model.num_layers * kv_heads_per_gpu * model.head_dim * dtype_bytes


def decode_tokens_per_second(model: ModelConfig, cluster: Cluster, tp: int, sequences: int,
                             seq_len: int) -> float:
    """Tokens/s one replica decodes with ``sequences`` in flight, each up to ``seq_len``.

    Decode is bound by HBM: every step reads the TP-sharded bf16 weights and each
    sequence's KV cache (on average half a sequence long), then pays two all-reduce
    latencies per layer with TP > 1.
    """
    weights = total_parameters(model) * 2 / tp
    step_bytes = weights + sequences * seq_len / 2 * kv_bytes_per_token_per_gpu(model, tp)
    step_seconds = step_bytes / cluster.gpu.hbm_bytes_per_s
    if tp > 1:
        step_seconds += 2 * model.num_layers * ALL_REDUCE_LATENCY_S
    return sequences / step_seconds


def engine_rejection(model: ModelConfig, tp: int, cluster: Cluster) -> str:
    if tp > cluster.gpus_per_node:
        return f"TP{tp} would span nodes of {cluster.gpus_per_node} GPUs"
    if model.num_attention_heads % tp:
        return f"TP{tp} does not divide num_attention_heads={model.num_attention_heads}"
    groups = model.num_query_groups
    if groups % tp and tp % groups:
        return f"TP{tp} neither divides nor is a multiple of num_query_groups={groups}"
    return ""


def plan_engines(role: str, model: ModelConfig, cluster: Cluster, seq_len: int,
                 gpu_memory_utilization: float) -> EngineSearch:
    """Every engine TP on this node type, feasible ones ranked by decode throughput."""
    gpu = cluster.gpu
    plans: List[EnginePlan] = []
    rejections: List[EngineRejection] = []
    weight_bytes = total_parameters(model) * 2  # bf16
    for tp in ENGINE_TENSOR_PARALLEL_SIZES:
        reason = engine_rejection(model, tp, cluster)
        if reason:
            rejections.append(EngineRejection(role, tp, reason))
            continue
        budget = gpu.memory_bytes * gpu_memory_utilization
        weights = weight_bytes / tp
        kv_cache = budget - weights - ENGINE_WORKSPACE_GIB * GIB
        kv_tokens = int(kv_cache / kv_bytes_per_token_per_gpu(model, tp)) if kv_cache > 0 else 0
        if kv_tokens < seq_len:
            needed = weights + ENGINE_WORKSPACE_GIB * GIB + seq_len * kv_bytes_per_token_per_gpu(
                model, tp)
            rejections.append(EngineRejection(
                role, tp, f"out of memory by {(needed - budget) / GIB:.1f} GiB: weights "
                f"{weights / GIB:.1f} GiB/GPU leave no KV cache for one {seq_len}-token "
                f"sequence at gpu_memory_utilization={gpu_memory_utilization}"))
            continue
        sequences = min(MAX_NUM_SEQS, kv_tokens // seq_len)
        replicas = cluster.gpus_per_node // tp
        per_replica = decode_tokens_per_second(model, cluster, tp, sequences, seq_len)
        plans.append(EnginePlan(role, tp, replicas, weights / GIB, kv_cache / GIB, kv_tokens,
                                sequences, replicas * per_replica))
    plans.sort(key=lambda plan: -plan.decode_tokens_per_second_per_node)
    return EngineSearch(role, model.name, plans, rejections)
