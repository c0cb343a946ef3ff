"""What the planner is asked about: the cluster, the job, the layout of one candidate."""

from dataclasses import dataclass
from typing import Optional

from megatron_tpo.config import ModelConfig, ParallelConfig
from megatron_tpo.plan.hardware import GpuSpec

RECOMPUTE_CHOICES = ("none", "selective", "full")


@dataclass(frozen=True)
class Cluster:
    gpu_name: str
    gpu: GpuSpec
    nodes: int
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def group_within_node(self, stride: int, size: int) -> bool:
        """Whether a process group of ``size`` ranks ``stride`` apart fits in one node.

        megatron orders ranks tp, cp, dp, pp (fastest first), so TP groups have stride 1,
        CP groups stride tp, DP groups stride tp*cp and PP groups stride tp*cp*dp.
        """
        return stride * size <= self.gpus_per_node

    def bandwidth(self, stride: int, size: int) -> float:
        """Bytes/s each GPU can push into a collective over that group."""
        if self.group_within_node(stride, size):
            return self.gpu.nvlink_bytes_per_s
        return self.gpu.internode_bytes_per_s


@dataclass(frozen=True)
class Assumptions:
    """Knobs of the estimate; every default is stated in docs/planner.md."""

    # Fraction of peak tensor-core FLOP/s the compute kernels reach; communication and
    # the pipeline bubble are modelled on top. NVIDIA's Llama-3 H100 runs reach 54-62%
    # MFU in BF16 and ~40% of the FP8 peak (NVIDIA/dgxc-benchmarking llama3.1/README.md)
    # including all overheads, so these are a little higher.
    mfu_bf16: float = 0.60
    mfu_fp8: float = 0.40
    # "flash": TE/cuDNN fused attention, never stores the s x s scores (the default on
    # GPUs with Transformer Engine). "unfused": megatron's local DotProductAttention.
    attention: str = "flash"
    # "fused": the tiled DPO log-prob kernel (kernels/); "naive": full fp32 logits.
    logprobs: str = "fused"
    # The fused kernel's deterministic backward (train.logprob_kernel_deterministic, the
    # default) sums split partial gradients from a workspace of at most this much, one
    # gradient at a time (DETERMINISTIC_WORKSPACE_BYTES in kernels/dpo_logprob).
    logprob_workspace_gib: float = 0.5
    # megatron DDP keeps main gradients in fp32 (grad_reduce_in_fp32) for bf16 training.
    grad_bytes: int = 4
    param_bytes: int = 2
    # CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation, per GPU.
    runtime_reserve_gib: float = 3.0
    # Each NCCL communicator a rank uses (one per process group, and one per pipeline
    # neighbour) keeps its channels' buffers on the GPU: NCCL_BUFFSIZE (4 MiB) per
    # protocol, channel and peer, more with NVLink SHARP. Not yet measured here; the first
    # GPU run's memory records (metrics.jsonl) calibrate it.
    nccl_communicator_gib: float = 0.25
    allow_fp8: bool = True


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    cluster: Cluster
    seq_len: int
    global_batch: int  # sequences per optimizer step (a DPO pair is two sequences)
    assumptions: Assumptions = Assumptions()


@dataclass(frozen=True)
class TrainingLayout:
    tp: int
    pp: int
    vpp: int  # 1: no interleaving
    cp: int
    dp: int
    micro_batch: int
    recompute: str
    fp8: bool

    @property
    def sequence_parallel(self) -> bool:
        # Always with TP > 1: it divides norm/residual activations by TP for free.
        return self.tp > 1

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    def num_microbatches(self, global_batch: int) -> int:
        return global_batch // (self.micro_batch * self.dp)

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp if self.vpp > 1 else None,
            context_parallel_size=self.cp,
            sequence_parallel=self.sequence_parallel,
        )

    def label(self) -> str:
        vpp: Optional[int] = self.vpp if self.vpp > 1 else None
        return (f"TP{self.tp} PP{self.pp} VPP{vpp or '-'} CP{self.cp} DP{self.dp} "
                f"MBS{self.micro_batch} rc={self.recompute} {'fp8' if self.fp8 else 'bf16'}")
