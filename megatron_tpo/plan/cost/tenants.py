"""Every GPU tenant of a TPO run, on every kind of GPU of the job, with its predicted
bytes in each state: what the memory ledger (``placement.MemoryLedger``) holds for the
run, for ``tpo-run --dry-run`` and for ``tpo-plan`` alike.

    specs = run_tenants(config, world_size)      # List[TenantSpec]
    capacity = gpu_capacity(config)             # bytes per GPU, None on CPU

The trainer's figures are the planner's (``plan.memory``, per pipeline stage: the first
holds the most micro-batches in flight, the last the logits); the engines' follow vLLM's
accounting (``plan.rollout``); a judge's model is sized from its checkpoint's config.json.
Every constant is an assumption stated in docs/planner.md.
"""

from pathlib import Path
from typing import List, Optional, Tuple

from megatron_tpo.config import ConfigError, ModelConfig
from megatron_tpo.placement.ledger import (ASLEEP, AWAKE, GIB, IN_USE, RELEASED, RESIDENT,
                                           WEIGHTS_ONLY, TenantSpec)
from megatron_tpo.plan.cost.engines import ENGINE_WORKSPACE_GIB, kv_bytes_per_token_per_gpu
from megatron_tpo.plan.cost.memory import TrainingMemory, stage_memory
from megatron_tpo.plan.cost.parameters import cached_rank_parameters, total_parameters
from megatron_tpo.plan.hardware import GpuSpec, find_gpu
from megatron_tpo.plan.search.given_layout import layout_from_parallel
from megatron_tpo.plan.workload import Assumptions, Cluster, Workload

# Tenant names: build.py registers the real holders under them, the dry run its stand-ins.
RESERVE = "CUDA context and workspaces"
NCCL = "NCCL communicators"
POLICY_ENGINE = "policy engine"
POLICY_POOL = "policy engine pool"
REWARD_MODEL = "reward model"
JUDGE_ENGINE = "judge engine"
JUDGE_POOL = "judge engine pool"
TRAINER_STATE = ("trainer weights", "gradients", "optimizer state")
TRAINING_TRANSIENTS = ("trainer activations", "logits", "communication buffers")
SENT_BUCKETS = "weight buckets"
RECEIVED_BUCKETS = "weight buckets received"

# What a sleeping vLLM engine keeps on its GPU at sleep level 1 or 2: the CUDA context,
# the CUDA-graph pool and NCCL's buffers (weights go to host or are dropped, KV is freed).
ENGINE_ASLEEP_GIB = 1.5
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Nodes of the clusters the recipes target; an engine's TP stays within one.
GPUS_PER_NODE = 8


def gpu_capacity(config) -> Optional[float]:
    return None if config.run.hardware == "cpu" else find_gpu(config.run.hardware).memory_bytes


def _gpu_spec(config) -> GpuSpec:
    # A CPU run is sized as if on the default GPU spec; its capacity is never checked.
    return GpuSpec() if config.run.hardware == "cpu" else find_gpu(config.run.hardware)


def gpu_name(config) -> str:
    """How the ledger names the run's accelerator; a CPU run's host stands in for it."""
    return "cpu" if config.run.hardware == "cpu" else f"{config.run.hardware} GPU"


def trainer_gpu(config, stage: int) -> str:
    return f"{gpu_name(config)} of pipeline stage {stage}"


def trainer_stages(config) -> List[int]:
    """The pipeline stages whose GPUs differ: the first (embedding, most micro-batches in
    flight) and the last (output layer, logits); middle stages hold less than the first."""
    return sorted({0, config.parallel.pipeline_model_parallel_size - 1})


def stage_memories(config, world_size: int) -> List[TrainingMemory]:
    """The trainer's bytes on each of ``trainer_stages``."""
    layout = layout_from_parallel(config.parallel, world_size, 2 * config.train.micro_batch_pairs,
                                  config.train.recompute_granularity or "none",
                                  config.train.fp8.enabled)
    cluster = Cluster(config.run.hardware, _gpu_spec(config), max(1, world_size // GPUS_PER_NODE),
                      min(world_size, GPUS_PER_NODE))
    longest = config.prompts.max_tokens + config.rollout.sampling.max_new_tokens
    workload = Workload(config.model, cluster, longest, 2 * config.run.pairs_per_step,
                        Assumptions())
    return [stage_memory(workload, layout, stage, cached_rank_parameters(
        config.model, layout.tp, layout.pp, layout.vpp, stage, dp_rank=0, dp_size=layout.dp,
        dp_cp_size=layout.dp_cp)) for stage in trainer_stages(config)]


def checkpoint_model_config(path: str, setting: str) -> ModelConfig:
    """The architecture of the HF checkpoint a judge loads, from its config.json: a local
    directory, or a hub id already in the local Hugging Face cache. Anything else cannot
    be sized, and would be downloaded by every rank at start-up: refused, naming why."""
    from megatron_tpo.model.hf_config import model_config_from_hf, read_hf_config_dict

    directory = Path(path)
    if not (directory / "config.json").is_file():
        if directory.is_absolute() or path.startswith("."):   # a path, not a hub id
            raise ConfigError(f"{setting}={path}: no config.json there (not a Hugging Face "
                              "checkpoint directory)")
        directory = _cached_hub_checkpoint(path)
    if directory is None:
        raise ConfigError(
            f"{setting}={path}: no config.json there, and not a hub id in the local Hugging "
            "Face cache; its size cannot be known before the run, and every rank would "
            f"download it at start-up. Download it once (hf download {path} "
            f"--local-dir DIR) and set {setting}=DIR")
    return model_config_from_hf(read_hf_config_dict(directory), f"{directory}/config.json")


def _cached_hub_checkpoint(path: str) -> Optional[Path]:
    from transformers.utils import cached_file

    try:
        found = cached_file(path, "config.json", local_files_only=True,
                            _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):   # not a valid repo id, or nothing cached
        return None
    return None if found is None else Path(found).parent


def engine_claim(model: ModelConfig, vllm, seq_len: int, capacity: float,
                 setting: str) -> Tuple[float, float, str]:
    """(bytes vLLM claims per GPU, its weights per GPU, why it cannot start) for one engine.

    vLLM takes ``gpu_memory_utilization`` of the GPU's total (or its weights, workspace
    and ``kv_cache_memory_bytes`` when that is given: ``TPOConfig.validate`` checks that
    it holds a sequence) and needs the TP-shard of the bf16 weights, its workspace and
    the KV cache of at least one whole sequence inside it.
    """
    tp = vllm.tensor_parallel_size
    weights = total_parameters(model) * 2 / tp
    workspace = ENGINE_WORKSPACE_GIB * GIB
    if vllm.kv_cache_memory_bytes is not None:
        return weights + workspace + vllm.kv_cache_memory_bytes, weights, ""
    claim = vllm.gpu_memory_utilization * capacity
    needed = weights + workspace + seq_len * kv_bytes_per_token_per_gpu(model, tp)
    if needed <= claim:
        return claim, weights, ""
    return claim, weights, (
        f"{model.name} weights {weights / GIB:.1f} GiB per GPU at {setting}.tensor_parallel_size="
        f"{tp}, its workspace and one {seq_len}-token sequence of KV cache need "
        f"{needed / GIB:.1f} GiB, more than {setting}.gpu_memory_utilization="
        f"{vllm.gpu_memory_utilization} x {capacity / GIB:.1f} GiB = {claim / GIB:.1f} GiB")


def policy_engine_spec(config, gpu: str, capacity: float) -> TenantSpec:
    """The policy's colocated engine on a trainer GPU: its whole claim awake, its weights
    (and workspace) for a sync, what sleep leaves (everything without sleep mode or at
    level 0, which only pauses scheduling)."""
    rollout = config.rollout
    longest = config.prompts.max_tokens + rollout.sampling.max_new_tokens
    if rollout.engine == "hf":   # transformers in float32; asleep, its weights are on the host
        weights = total_parameters(config.model) * 4.0
        return TenantSpec(POLICY_ENGINE, gpu, ((AWAKE, weights), (WEIGHTS_ONLY, weights),
                                               (ASLEEP, 0.0)), "on the host")
    vllm = rollout.vllm
    claim, weights, refusal = engine_claim(config.model, vllm, longest, capacity, "rollout.vllm")
    releases = vllm.sleep_mode and vllm.sleep_level > 0
    asleep = ENGINE_ASLEEP_GIB * GIB if releases else claim
    detail = (f"level {vllm.sleep_level}" if releases else
              "level 0: pauses scheduling, frees nothing" if vllm.sleep_mode else
              "no sleep mode: frees nothing")
    return TenantSpec(POLICY_ENGINE, gpu, (
        (AWAKE, claim), (WEIGHTS_ONLY, weights + ENGINE_WORKSPACE_GIB * GIB if releases else claim),
        (ASLEEP, asleep)), detail, refusal)


def judges_through_policy_engine(config) -> bool:
    """A policy judging itself: a pairwise judge without a model of its own generates
    through the policy's engine, which its judging phases then need awake."""
    return config.judge.kind == "pairwise" and config.judge.pairwise.model is None


def judge_specs(config, gpus: List[str], capacity: float) -> List[TenantSpec]:
    """The judge's own holders: a reward model or a colocated judge engine on every trainer
    GPU, or a judge pool on GPUs of its own; none for a rule judge or a policy judging
    itself (which generates through the policy engine)."""
    judge = config.judge
    if judge.kind == "reward_model" and _on_accelerator(config, judge.reward_model.device):
        settings = judge.reward_model
        model = checkpoint_model_config(settings.path, "judge.reward_model.path")
        weights = total_parameters(model) * DTYPE_BYTES.get(settings.dtype, 4)
        # The largest transient of one forward: a batch's gate and up projections.
        forward = settings.batch_size * settings.max_length * model.ffn_hidden_size * 2 * 2
        asleep = 0.0 if settings.offloads() else weights
        return [TenantSpec(REWARD_MODEL, gpu, ((AWAKE, weights + forward), (ASLEEP, asleep)),
                           "offloaded to the host" if settings.offloads() else "kept on the GPU")
                for gpu in gpus]
    if judge.kind != "pairwise" or judges_through_policy_engine(config):
        return []
    model = checkpoint_model_config(judge.pairwise.model, "judge.pairwise.model")
    if judge.pairwise.placement == "colocated":
        if not _on_accelerator(config, config.rollout.device):
            return []
        weights = total_parameters(model) * 4.0   # the HF engine, float32
        return [TenantSpec(JUDGE_ENGINE, gpu, ((AWAKE, weights), (ASLEEP, 0.0)), "on the host")
                for gpu in gpus]
    vllm = judge.pairwise.vllm
    context = (config.prompts.max_tokens + 2 * config.rollout.sampling.max_new_tokens
               + judge.pairwise.sampling.max_new_tokens)
    claim, _, refusal = engine_claim(model, vllm, context, capacity, "judge.pairwise.vllm")
    pool = f"{gpu_name(config)} of the judge pool"
    return [TenantSpec(RESERVE, pool, ((RESIDENT, Assumptions().runtime_reserve_gib * GIB),)),
            TenantSpec(JUDGE_POOL, pool, ((RESIDENT, claim),), refusal=refusal)]


def _on_accelerator(config, device: str) -> bool:
    # On a CPU run the host plays the accelerator, so the tiny run has a ledger too.
    return config.run.hardware == "cpu" or device.startswith("cuda")


def nccl_communicators(config, world_size: int) -> int:
    """The NCCL communicators a trainer rank holds: the world's (the loop's own collectives),
    its tensor-, data- and pipeline-parallel groups' (a pipeline rank talks to the stage
    before and after it), and a colocated vLLM engine's tensor-parallel group."""
    parallel = config.parallel
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    count = (world_size > 1) + (tp > 1) + (parallel.data_parallel_size(world_size) > 1)
    count += 2 * (pp > 1)
    engine = config.rollout
    count += engine.placement == "colocated" and engine.ranks_per_engine > 1
    return count


def run_tenants(config, world_size: int) -> List[TenantSpec]:
    """Every tenant of the run on every kind of GPU: each distinct trainer pipeline stage,
    and the GPUs of the engine pools."""
    capacity = gpu_capacity(config) or _gpu_spec(config).memory_bytes
    rollout = config.rollout
    specs: List[TenantSpec] = []
    gpus = [trainer_gpu(config, stage) for stage in trainer_stages(config)]
    buckets = 2.0 * config.weight_sync.bucket_bytes
    communicators = nccl_communicators(config, world_size) * Assumptions().nccl_communicator_gib
    for gpu, memory in zip(gpus, stage_memories(config, world_size)):
        specs.append(TenantSpec(RESERVE, gpu, ((RESIDENT, memory.runtime_reserve),)))
        specs.append(TenantSpec(NCCL, gpu, ((RESIDENT, communicators * GIB),)))
        if rollout.placement == "colocated" and (rollout.engine == "vllm"
                                                 or _on_accelerator(config, rollout.device)):
            specs.append(policy_engine_spec(config, gpu, capacity))
        for name, size in zip(TRAINER_STATE, (memory.weights, memory.gradients, memory.optimizer)):
            specs.append(TenantSpec(name, gpu, ((RESIDENT, size),)))
        for name, size in zip(TRAINING_TRANSIENTS,
                              (memory.activations, memory.logits, memory.communication)):
            specs.append(TenantSpec(name, gpu, ((IN_USE, size), (RELEASED, 0.0))))
        specs.append(TenantSpec(SENT_BUCKETS, gpu, ((IN_USE, buckets), (RELEASED, 0.0))))
    specs += judge_specs(config, gpus, capacity)
    if rollout.placement == "separate":
        pool = f"{gpu_name(config)} of the policy's engine pool"
        longest = config.prompts.max_tokens + rollout.sampling.max_new_tokens
        claim, _, refusal = engine_claim(config.model, rollout.vllm, longest, capacity,
                                         "rollout.vllm") if rollout.engine == "vllm" else (
            total_parameters(config.model) * 4.0, 0.0, "")
        specs += [TenantSpec(RESERVE, pool, ((RESIDENT, Assumptions().runtime_reserve_gib * GIB),)),
                  TenantSpec(POLICY_POOL, pool, ((RESIDENT, claim),), refusal=refusal),
                  TenantSpec(RECEIVED_BUCKETS, pool, ((IN_USE, buckets), (RELEASED, 0.0)))]
    return specs
