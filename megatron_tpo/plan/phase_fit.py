"""Every phase of one TPO iteration, sized per GPU before a run starts.

    peaks = phase_peaks(config, world_size)     # one PhasePeak per phase and kind of GPU
    check_fit(config, world_size)               # ConfigError naming the first misfit

A colocated run holds on each trainer GPU, phase by phase (build.py, loop.py):

    engine start-up   vLLM claims gpu_memory_utilization x total, refusing if not free
    construction      the engine asleep; the trainer's weights, gradients, optimizer shard
    rollout           the engine awake (its whole claim: weights + KV cache) + trainer state
    judging           a reward model moved onto the GPU, or the engine awake to judge
    reference and DPO the trainer's training peak (activations, logits) + the engine asleep
    weight sync       the engine's weights woken (no KV cache yet) + trainer state + buckets

Engines on pools of their own (``placement=separate``) are sized on their own GPUs. The
trainer's figures are the planner's (``plan.memory``); the engine's follow vLLM's
accounting (``plan.rollout``). Every constant is an assumption stated in docs/planner.md.
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Tuple

from megatron_tpo.config import ConfigError, ModelConfig
from megatron_tpo.plan.given_layout import layout_from_parallel
from megatron_tpo.plan.hardware import GIB, find_gpu
from megatron_tpo.plan.memory import TrainingMemory, training_memory
from megatron_tpo.plan.parameters import total_parameters
from megatron_tpo.plan.rollout import (ENGINE_TENSOR_PARALLEL_SIZES, ENGINE_WORKSPACE_GIB,
                                       engine_rejection, kv_bytes_per_token_per_gpu)
from megatron_tpo.plan.workload import Assumptions, Cluster, Workload

# What a sleeping vLLM engine keeps on its GPU at either sleep level: the CUDA context,
# the CUDA-graph pool and NCCL's buffers (weights go to host or are dropped, KV is freed).
ENGINE_ASLEEP_GIB = 1.5
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Nodes of the clusters the recipes target; an engine's TP stays within one.
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class PhasePeak:
    phase: str
    gpu: str                            # which GPU of the job
    items: Tuple[Tuple[str, float], ...]  # (what, bytes), all resident at the peak
    capacity: float
    fix: str = ""                       # the smallest change that makes it fit
    refusal: str = ""                   # a reason beyond the total (an engine with no KV)

    @property
    def total(self) -> float:
        return sum(size for _, size in self.items)

    @property
    def fits(self) -> bool:
        return not self.refusal and self.total <= self.capacity

    def line(self) -> str:
        parts = " + ".join(f"{what} {size / GIB:.1f}" for what, size in self.items)
        return (f"{self.phase} on {self.gpu}: {self.total / GIB:.1f} of "
                f"{self.capacity / GIB:.1f} GiB ({parts})")


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def judge_model_config(path: Optional[str]) -> Optional[ModelConfig]:
    """The judge's architecture from its checkpoint's config.json; None where it is not a
    local directory (a hub id is resolved at run time, and then not sized here)."""
    from megatron_tpo.model.hf_config import model_config_from_hf, read_hf_config_dict

    if not path or not (Path(path) / "config.json").is_file():
        return None
    return model_config_from_hf(read_hf_config_dict(Path(path)), f"{path}/config.json")


def engine_claim(model: ModelConfig, tp: int, utilization: float, seq_len: int, capacity: float,
                 setting: str) -> Tuple[float, float, str, str]:
    """(bytes vLLM claims, its weights per GPU, refusal, fix) for one engine at ``tp``.

    vLLM takes ``utilization`` of the GPU's total and needs the TP-shard of the bf16
    weights, its workspace and the KV cache of at least one whole sequence inside it.
    """
    weights = total_parameters(model) * 2 / tp
    claim = utilization * capacity
    needed = weights + ENGINE_WORKSPACE_GIB * GIB + seq_len * kv_bytes_per_token_per_gpu(model, tp)
    if needed <= claim:
        return claim, weights, "", ""
    refusal = (f"{model.name} weights {gib(weights)} per GPU at {setting}.tensor_parallel_size="
               f"{tp}, its workspace and one {seq_len}-token sequence of KV cache need "
               f"{gib(needed)}, more than {setting}.gpu_memory_utilization={utilization} x "
               f"{gib(capacity)} = {gib(claim)}")
    cluster = Cluster("", find_gpu("h100-80gb"), 1, GPUS_PER_NODE)
    for larger in ENGINE_TENSOR_PARALLEL_SIZES:
        if larger > tp and not engine_rejection(model, larger, cluster):
            shard = total_parameters(model) * 2 / larger
            if shard + ENGINE_WORKSPACE_GIB * GIB + seq_len * kv_bytes_per_token_per_gpu(
                    model, larger) <= claim:
                return claim, weights, refusal, f"{setting}.tensor_parallel_size={larger}"
    return claim, weights, refusal, (f"{setting}.gpu_memory_utilization="
                                     f"{math.ceil(needed / capacity * 100) / 100}")


def trainer_memory(config, world_size: int, capacity_gpu) -> TrainingMemory:
    layout = layout_from_parallel(config.parallel, world_size, 2 * config.train.micro_batch_pairs,
                                  config.train.recompute_granularity or "none",
                                  config.train.fp8.enabled)
    cluster = Cluster(config.run.hardware, capacity_gpu, max(1, world_size // GPUS_PER_NODE),
                      min(world_size, GPUS_PER_NODE))
    longest = config.prompts.max_tokens + config.rollout.sampling.max_new_tokens
    return training_memory(Workload(config.model, cluster, longest, 2 * config.run.pairs_per_step,
                                    Assumptions()), layout)


def _trainer_fix(config, memory: TrainingMemory) -> str:
    if (config.train.recompute_granularity or "none") != "full" and memory.activations > GIB:
        return "train.recompute_granularity=full, or tpo-plan --layout for a larger PP or DP"
    return ("a larger allocation (more DP shards the optimizer), or tpo-plan --layout "
            "for a larger PP")


def phase_peaks(config, world_size: int) -> List[PhasePeak]:
    """Each phase's peak on the most loaded trainer GPU, and on each pool's GPUs."""
    gpu = find_gpu(config.run.hardware)
    capacity = gpu.memory_bytes
    memory = trainer_memory(config, world_size, gpu)
    where = f"{config.run.hardware} GPU of pipeline stage {memory.pipeline_stage}"
    reserve = ("CUDA context and workspaces", memory.runtime_reserve)
    state = (("trainer weights", memory.weights), ("gradients", memory.gradients),
             ("optimizer shard", memory.optimizer), reserve)
    rollout, judge = config.rollout, config.judge
    longest = config.prompts.max_tokens + rollout.sampling.max_new_tokens
    peaks: List[PhasePeak] = []

    def lower_utilization(others: float) -> str:
        room = math.floor((capacity - others) / capacity * 100) / 100
        return f"rollout.vllm.gpu_memory_utilization={room}" if room > 0 else ""

    colocated_vllm = rollout.engine == "vllm" and rollout.placement == "colocated"
    asleep: Tuple[Tuple[str, float], ...] = ()
    awake: Tuple[Tuple[str, float], ...] = ()
    engine_weights = ()
    if rollout.engine == "vllm":
        vllm = rollout.vllm
        claim, weights, refusal, fix = engine_claim(config.model, vllm.tensor_parallel_size,
                                                    vllm.gpu_memory_utilization, longest,
                                                    capacity, "rollout.vllm")
        awake = (("policy engine (weights + KV cache)", claim),)
        engine_weights = (("policy engine weights", weights + ENGINE_WORKSPACE_GIB * GIB),)
        if colocated_vllm:
            # Without sleep mode (rollout.vllm.sleep_mode=false) nothing is released: the
            # trainer runs beside the engine's whole claim.
            asleep = ((("policy engine asleep", ENGINE_ASLEEP_GIB * GIB),) if vllm.sleep_mode
                      else (("policy engine without sleep mode (its whole claim)", claim),))
            peaks.append(PhasePeak("engine start-up", where, awake + (reserve,), capacity,
                                   fix or lower_utilization(memory.runtime_reserve), refusal))
        else:
            pool = f"{config.run.hardware} GPU of the policy's engine pool"
            peaks.append(PhasePeak("rollout", pool, awake + (reserve,), capacity, fix, refusal))
            bucket = ("two weight buckets", 2 * config.weight_sync.bucket_bytes)
            peaks.append(PhasePeak("weight sync", pool, engine_weights + (bucket, reserve),
                                   capacity, "weight_sync.bucket_bytes smaller"))

    judge_resident: Tuple[Tuple[str, float], ...] = ()
    judging = None
    if judge.kind == "reward_model" and judge.reward_model.device.startswith("cuda"):
        reward = judge_model_config(judge.reward_model.path)
        if reward is not None:
            model_bytes = ("reward model", total_parameters(reward)
                           * DTYPE_BYTES.get(judge.reward_model.dtype, 4))
            # The largest transient of one forward: a batch's gate and up projections.
            activations = ("its forward", judge.reward_model.batch_size
                           * judge.reward_model.max_length * reward.ffn_hidden_size * 2 * 2)
            if not judge.reward_model.offloads():
                judge_resident = (model_bytes,)
            judging = PhasePeak("judging", where, state + asleep + (model_bytes, activations),
                                capacity, "judge.reward_model.batch_size smaller")
    elif judge.kind == "pairwise" and judge.pairwise.model is None and colocated_vllm:
        judging = PhasePeak("judging", where, state + awake, capacity,
                            "rollout.vllm.gpu_memory_utilization lower")
    elif judge.kind == "pairwise" and judge.pairwise.placement == "separate":
        judge_config = judge_model_config(judge.pairwise.model)
        if judge_config is not None:
            vllm = judge.pairwise.vllm
            context = (config.prompts.max_tokens + 2 * rollout.sampling.max_new_tokens
                       + judge.pairwise.sampling.max_new_tokens)
            claim, _, refusal, fix = engine_claim(judge_config, vllm.tensor_parallel_size,
                                                  vllm.gpu_memory_utilization, context,
                                                  capacity, "judge.pairwise.vllm")
            peaks.append(PhasePeak("judging", f"{config.run.hardware} GPU of the judge pool",
                                   (("judge engine (weights + KV cache)", claim), reserve),
                                   capacity, fix, refusal))

    resident = state + judge_resident
    peaks.append(PhasePeak("construction", where, resident + asleep, capacity,
                           _trainer_fix(config, memory)))
    if colocated_vllm:
        others = sum(size for _, size in resident)
        peaks.append(PhasePeak("rollout", where, resident + awake, capacity,
                               lower_utilization(others) + " (if the KV cache still holds a "
                               "sequence), else a larger allocation (more DP shards the "
                               "optimizer) or rollout.placement=separate"))
    if judging is not None:
        peaks.append(replace(judging, items=judging.items + tuple(
            item for item in judge_resident if item not in judging.items)))
    training = (("trainer activations", memory.activations), ("logits", memory.logits),
                ("communication buffers", memory.communication))
    peaks.append(PhasePeak("reference and DPO", where, resident + training + asleep, capacity,
                           _trainer_fix(config, memory)))
    if colocated_vllm:
        bucket = ("two weight buckets", 2 * config.weight_sync.bucket_bytes)
        peaks.append(PhasePeak("weight sync", where, resident + engine_weights + (bucket,),
                               capacity, "weight_sync.bucket_bytes smaller"))
    return peaks


def check_fit(config, world_size: int) -> List[PhasePeak]:
    """The phase peaks, or a ConfigError for the first that does not fit on
    ``run.hardware``; nothing is checked for ``run.hardware=cpu``."""
    if config.run.hardware == "cpu":
        return []
    peaks = phase_peaks(config, world_size)
    for peak in peaks:
        if not peak.fits:
            reason = peak.refusal or (f"needs {gib(peak.total)}, more than the "
                                      f"{gib(peak.capacity)} it has")
            raise ConfigError(f"does not fit: {peak.line()}; {reason}"
                              + (f"; smallest fix: {peak.fix}" if peak.fix else ""))
    return peaks
