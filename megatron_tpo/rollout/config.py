"""Rollout settings (``configs/rollout/<name>.yaml``): the engine, where it runs, and
sampling (the thought prompt is tpo-run's ``thought`` group)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.loading import load_group_config
from megatron_tpo.rollout.engine import SamplingParams

ENGINES = ("hf", "vllm")
VLLM_SLEEP_LEVELS = (0, 1, 2)
PLACEMENTS = ("colocated", "separate")
BRIDGE_BACKENDS = ("auto", "gloo", "nccl")


@dataclass(kw_only=True)
class VLLMConfig:
    """The vLLM engine (GPU only), colocated with the trainer in one torch.distributed world."""

    tensor_parallel_size: int = 1
    """Every block of this many consecutive ranks is one engine (external_launcher)."""
    gpu_memory_utilization: float = 0.5
    """A fraction of the device's *total* memory that vLLM may take; colocated with
    megatron, it must fit in what the trainer leaves free, or vLLM refuses to start."""
    sleep_level: int = 1
    """1: weights to host memory, KV cache dropped; 2: both dropped (a sync rewrites the
    weights anyway); 0: pause scheduling only."""
    sleep_mode: bool = True
    """vLLM's sleep mode (its CuMem allocator: CUDA, ROCm and XPU only). The CPU build
    refuses it at start-up ("Sleep mode is not supported on current platform."); off,
    the engine keeps its memory while the trainer runs and sleep()/wake() call nothing
    in vLLM (sleep_level is then unused)."""
    kv_cache_memory_bytes: Optional[int] = None
    """The KV cache in bytes, instead of what gpu_memory_utilization leaves after the
    weights. On the CPU build gpu_memory_utilization is a fraction of the host's memory
    that must be free at start-up; an explicit size skips that claim (tests use a few MiB)."""
    dtype: str = "bfloat16"
    """The weights' and KV cache's dtype in vLLM (``auto``, ``bfloat16``, ``float16``, ``float32``)."""
    max_model_len: Optional[int] = None
    """The longest sequence vLLM serves; null: the checkpoint's max_position_embeddings."""
    enforce_eager: bool = False
    """No CUDA graphs: slower, but nothing captured to go stale."""
    enable_prefix_caching: bool = True
    """vLLM reuses the KV cache of a shared prompt prefix (the K samples of one prompt)."""
    disable_custom_all_reduce: bool = True
    """vLLM's custom all-reduce (TP > 1) shares its buffers between the TP ranks through
    CUDA IPC, allocated outside the sleep-mode pool: they stay resident while the engine
    sleeps and the trainer needs the memory, and the peer addresses are captured in CUDA
    graphs. Colocated with a trainer, NCCL's all-reduce is the safe one (verl passes True
    to its colocated engines too); an engine pool on GPUs of its own may set false."""

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one weight or KV cache element as vLLM runs them: ``auto`` is a 16-bit
        type (vLLM downcasts float32 checkpoints, ``_resolve_auto_dtype`` in its
        ``config/model.py``), as are ``bfloat16``, ``float16`` and ``half``."""
        return 4 if self.dtype in ("float32", "float") else 2

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"rollout.vllm.tensor_parallel_size={self.tensor_parallel_size}: "
                              "must be >= 1")
        if not 0 < self.gpu_memory_utilization < 1:
            raise ConfigError(f"rollout.vllm.gpu_memory_utilization={self.gpu_memory_utilization}:"
                              " must be in (0, 1), a fraction of the device's total memory")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ConfigError(f"rollout.vllm.kv_cache_memory_bytes={self.kv_cache_memory_bytes}:"
                              " must be positive (or null: sized by gpu_memory_utilization)")
        if self.sleep_level not in VLLM_SLEEP_LEVELS:
            raise ConfigError(f"rollout.vllm.sleep_level={self.sleep_level}: must be one of "
                              f"{VLLM_SLEEP_LEVELS}")


@dataclass(kw_only=True)
class BridgeConfig:
    """``placement=separate``: how trainer rank 0 and the ``tpo-engine`` pool meet
    (``rollout/pool/bridge.py``). Both sides must be given the same values."""

    address: str = "127.0.0.1"
    """Trainer rank 0 serves the rendezvous store here (its host, as the engines reach it)."""
    port: int = 29700
    """The rendezvous store's port on that host."""
    engine_ranks: int = 1
    """Processes of the tpo-engine world: replicas of vllm.tensor_parallel_size ranks (hf: 1)."""
    backend: str = "auto"
    """How weight buckets travel: nccl (GPUs on both sides) or gloo; auto picks nccl where
    the trainer has CUDA. Requests and replies always go over gloo."""
    timeout_seconds: float = 600.0
    """How long either side waits for the other to join, and any one collective."""
    request_timeout_seconds: float = 4 * 3600.0
    """How long trainer rank 0 waits for the pool to finish one request (the other trainer
    ranks wait as long, plus timeout_seconds, on the store: not in a collective)."""
    request_chunk_samples: int = 4096
    """Most samples (prompts x sampling.n) in one generate request: a rollout or a judging
    stage goes to the pool in requests of this size, each done well within
    request_timeout_seconds, with progress between them. Every sample keeps the seed the
    whole call would give it, so vLLM engines, which seed each sample alone, draw what
    one request would have drawn; an HF engine's batches share one random stream per
    request, so there a call longer than one request draws other (still seeded) samples.
    Large enough that the engines' batches stay full: several times vLLM's max_num_seqs
    per replica."""

    def validate(self, ranks_per_engine: int) -> None:
        if not self.address:
            raise ConfigError("rollout.bridge.address='': must name trainer rank 0's host")
        if not 0 < self.port < 65536:
            raise ConfigError(f"rollout.bridge.port={self.port}: must be in 1..65535")
        if self.engine_ranks < 1 or self.engine_ranks % ranks_per_engine:
            raise ConfigError(f"rollout.bridge.engine_ranks={self.engine_ranks}: must be a "
                              f"positive multiple of the ranks per engine ({ranks_per_engine}, "
                              "rollout.vllm.tensor_parallel_size for vllm)")
        if self.backend not in BRIDGE_BACKENDS:
            raise ConfigError(f"rollout.bridge.backend={self.backend!r}: must be one of "
                              f"{BRIDGE_BACKENDS}")
        for key in ("timeout_seconds", "request_timeout_seconds", "request_chunk_samples"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"rollout.bridge.{key}={getattr(self, key)}: must be positive")


@dataclass(kw_only=True)
class RolloutConfig:
    """The policy's sampling engines: which, where, and how they sample."""

    engine: str = "hf"
    """hf (torch/transformers, runs anywhere) or vllm (GPU)."""
    placement: str = "colocated"
    """colocated: every trainer rank holds an engine replica in its own process;
    separate: the engines are a tpo-engine pool on their own devices (rollout.bridge)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """How the K samples of each prompt are drawn."""
    batch_size: int = 8
    """Prompts per generate call (the HF engine)."""
    device: str = "cpu"
    """The HF engine's torch device."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine's settings (engine=vllm)."""
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    """How trainer rank 0 reaches the engine pool (placement=separate)."""

    @property
    def ranks_per_engine(self) -> int:
        return self.vllm.tensor_parallel_size if self.engine == "vllm" else 1

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"rollout.engine={self.engine!r}: must be one of {ENGINES}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"rollout.placement={self.placement!r}: must be one of "
                              f"{PLACEMENTS}")
        if self.batch_size < 1:
            raise ConfigError(f"rollout.batch_size={self.batch_size}: must be >= 1")
        self.sampling.validate()
        self.vllm.validate()
        if self.placement == "separate":
            self.bridge.validate(self.ranks_per_engine)


def load_rollout_config(name_or_path: Union[str, Path] = "paper", **overrides) -> RolloutConfig:
    return load_group_config(RolloutConfig, "rollout", name_or_path, **overrides)
