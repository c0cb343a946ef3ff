"""The planner's parameter, weight, gradient and optimizer bytes per rank equal what
megatron-core allocates: real GPTModel chunks, real DDP buffers, real distributed-optimizer
shard ranges, in 4 gloo processes on CPU at several TP/PP/VPP/CP/DP layouts.

The distributed optimizer itself cannot be constructed on CPU (megatron-core 0.16 checks
for ``torch.cuda.*Tensor`` type strings, which the CPU adapter does not fake), so its
per-rank state is taken from the range map it is built from,
``DistributedOptimizer._build_gbuf_range_map``: one fp32 master copy plus Adam m and v
for exactly those elements.
"""

from dataclasses import replace

import pytest

from megatron_tpo.config import ModelConfig, ParallelConfig, load_model_config
from megatron_tpo.parallel.local_launch import spawn_local
from megatron_tpo.plan.cost.parameters import rank_parameters

pytestmark = pytest.mark.slow

WORLD_SIZE = 4
# Small enough to force several buckets in the medium model, as large models have.
SMALL_BUCKET = 50_000

MEDIUM = ModelConfig(name="medium", num_layers=8, hidden_size=256, ffn_hidden_size=704,
                     num_attention_heads=8, num_query_groups=2, vocab_size=1000,
                     max_position_embeddings=512, make_vocab_size_divisible_by=128)

# (model, tp, pp, vpp, cp, bucket size or None for megatron's default)
LAYOUTS = [
    ("tiny", 2, 1, 1, 1, None),     # TP2 x DP2
    ("tiny", 1, 2, 1, 1, None),     # PP2 x DP2
    ("tiny", 2, 2, 1, 1, None),     # TP2 x PP2
    ("tiny", 1, 1, 1, 1, None),     # DP4: shards and padding over 4 ranks
    ("medium", 2, 2, 1, 1, SMALL_BUCKET),
    ("medium", 1, 2, 2, 1, SMALL_BUCKET),   # interleaved: two chunks per rank
    ("medium", 2, 1, 1, 2, SMALL_BUCKET),   # CP2: optimizer sharded over DP x CP
    ("medium", 1, 1, 1, 1, SMALL_BUCKET),
]


def _model(name: str) -> ModelConfig:
    return MEDIUM if name == "medium" else load_model_config(name)


def _allocate_layouts(rank, world_size, layouts):
    """Worker: build each layout as megatron's training set-up does and measure it."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_tpo.model.llama import build_llama_chunks
    from megatron_tpo.parallel import init_megatron

    measured = []
    for name, tp, pp, vpp, cp, bucket in layouts:
        model = _model(name)
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                                  context_parallel_size=cp)
        parallel_state.destroy_model_parallel()
        init_megatron(parallel, model)
        # The local layer spec refuses CP (only TE's attention implements it). Parameters
        # do not depend on CP; DDP takes the DP x CP group it shards over from
        # parallel_state, which was initialised with CP.
        chunks = build_llama_chunks(model, replace(parallel, context_parallel_size=1),
                                    params_dtype=torch.bfloat16)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True,
            bucket_size=bucket)
        # As megatron's get_model: one DDP per chunk, buckets only in the first.
        wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk,
                                           disable_bucketing=index > 0)
                   for index, chunk in enumerate(chunks)]
        buffers = [buffer for ddp in wrapped for buffer in ddp.buffers]
        shards = {torch.bfloat16: 0, torch.float32: 0}
        for buffer in buffers:
            for bucket_maps in DistributedOptimizer._build_gbuf_range_map(buffer).values():
                for bucket_map in bucket_maps:
                    shards[buffer.param_dtype] += sum(
                        ranges["param"].size for ranges in bucket_map["param_map"].values())
        measured.append({
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": parallel_state.get_data_parallel_rank(with_context_parallel=True),
            "dp_size": parallel_state.get_data_parallel_world_size(),
            "dp_cp_size": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
            "parameters": sum(p.numel() for chunk in chunks for p in chunk.parameters()),
            "weight_bytes": sum(b.param_data.numel() * b.param_data.element_size() for b in buffers),
            "grad_bytes": sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers),
            "bf16_shard": shards[torch.bfloat16],
            "fp32_shard": shards[torch.float32],
            "buckets": sum(len(b.buckets) for b in buffers),
        })
    parallel_state.destroy_model_parallel()
    return measured


@pytest.fixture(scope="module")
def allocations():
    return spawn_local(_allocate_layouts, WORLD_SIZE, LAYOUTS)


@pytest.mark.parametrize("index", range(len(LAYOUTS)),
                         ids=[f"{m}-tp{t}-pp{p}-vpp{v}-cp{c}" for m, t, p, v, c, _ in LAYOUTS])
def test_bytes_per_rank_equal_megatron_allocation(allocations, index):
    name, tp, pp, vpp, cp, bucket = LAYOUTS[index]
    model = _model(name)
    for rank in range(WORLD_SIZE):
        actual = allocations[rank][index]
        predicted = rank_parameters(model, tp, pp, vpp, actual["pp_rank"], actual["dp_rank"],
                                    actual["dp_size"], actual["dp_cp_size"], bucket_numel=bucket,
                                    norms_in_fp32=True)
        assert predicted.parameters == actual["parameters"], f"rank {rank}"
        # Parameters live in the distributed optimizer's padded param buffers (bf16, and
        # fp32 for the local spec's norms), fp32 main gradients in grad buffers of that size.
        assert predicted.weight_bytes(param_bytes=2) == actual["weight_bytes"], f"rank {rank}"
        assert predicted.gradient_bytes(grad_bytes=4) == actual["grad_bytes"], f"rank {rank}"
        assert predicted.low_optimizer_shard == actual["bf16_shard"], f"rank {rank}"
        assert predicted.fp32_optimizer_shard == actual["fp32_shard"], f"rank {rank}"


def test_medium_model_exercises_several_buckets(allocations):
    medium_first_stage = [allocations[rank][4] for rank in range(WORLD_SIZE)
                          if allocations[rank][4]["pp_rank"] == 0]
    assert all(entry["buckets"] > 1 for entry in medium_first_stage)
