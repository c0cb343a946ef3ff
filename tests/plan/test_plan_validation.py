"""The step-time estimate of NVIDIA's own Llama-3.1 layouts against NVIDIA's measured
step times on H100.

Source: NVIDIA/dgxc-benchmarking, llama3.1/README_8b.md and llama3.1/README_70b.md
(commit 143b90dd91f9be958fed4773ae95d941a3356a82), the "Expected Performance" tables
of the NeMo 24.09 container: "Training step time (seconds per step)" at sequence
length 8192, micro-batch 1, global batch 16 x GPUs (8B) or 2 x GPUs (70B).
8B: TP1 PP1 CP2; 70B: TP4 PP4 CP2 VP5; BF16 and FP8 each.

All these layouts use CP2, which megatron-core runs and the DPO trainer does not yet,
so the estimate is taken with ``assess_layout`` (it estimates any layout and lists the
refusal among its problems).
"""

import pytest

from megatron_tpo.config import load_model_config
from megatron_tpo.plan.hardware import find_gpu
from megatron_tpo.plan.search.given_layout import assess_layout, parse_layout
from megatron_tpo.plan.workload import Cluster, Workload

EIGHT_B = "tp=1,pp=1,cp=2,mbs=1"
SEVENTY_B = "tp=4,pp=4,vpp=5,cp=2,mbs=1"
# (model, layout, precision, GPUs, global batch, measured seconds per step)
PUBLISHED = [
    ("llama3_8b", EIGHT_B, "bf16", 8, 128, 12.91), ("llama3_8b", EIGHT_B, "bf16", 16, 256, 13.00),
    ("llama3_8b", EIGHT_B, "bf16", 32, 512, 13.05), ("llama3_8b", EIGHT_B, "bf16", 64, 1024, 13.08),
    ("llama3_8b", EIGHT_B, "bf16", 128, 2048, 13.10),
    ("llama3_8b", EIGHT_B, "fp8", 8, 128, 9.67), ("llama3_8b", EIGHT_B, "fp8", 16, 256, 9.73),
    ("llama3_8b", EIGHT_B, "fp8", 32, 512, 9.75), ("llama3_8b", EIGHT_B, "fp8", 64, 1024, 9.80),
    ("llama3_8b", EIGHT_B, "fp8", 128, 2048, 9.82),
    ("llama3_70b", SEVENTY_B, "bf16", 64, 128, 14.72),
    ("llama3_70b", SEVENTY_B, "bf16", 128, 256, 14.73),
    ("llama3_70b", SEVENTY_B, "bf16", 256, 512, 14.80),
    ("llama3_70b", SEVENTY_B, "bf16", 512, 1024, 14.89),
    ("llama3_70b", SEVENTY_B, "bf16", 1024, 2048, 14.92),
    ("llama3_70b", SEVENTY_B, "bf16", 2048, 4096, 14.98),
    ("llama3_70b", SEVENTY_B, "fp8", 64, 128, 11.01),
    ("llama3_70b", SEVENTY_B, "fp8", 128, 256, 10.93),
    ("llama3_70b", SEVENTY_B, "fp8", 256, 512, 11.16),
    ("llama3_70b", SEVENTY_B, "fp8", 512, 1024, 11.18),
    ("llama3_70b", SEVENTY_B, "fp8", 1024, 2048, 11.28),
    ("llama3_70b", SEVENTY_B, "fp8", 2048, 4096, 11.39),
]
# Largest error over the table with the default assumptions: 11.9% (8B BF16, 8 GPUs).
TOLERANCE = 0.13


def _estimate(model, layout, precision, gpus, global_batch):
    cluster = Cluster("h100-80gb", find_gpu("h100-80gb"), gpus // 8, 8)
    workload = Workload(load_model_config(model), cluster, 8192, global_batch)
    return assess_layout(workload, parse_layout(layout, gpus, fp8=precision == "fp8"))


@pytest.mark.parametrize("model, layout, precision, gpus, global_batch, measured", PUBLISHED)
def test_step_time_estimate_is_near_nvidias_measurement(model, layout, precision, gpus,
                                                        global_batch, measured):
    assessment = _estimate(model, layout, precision, gpus, global_batch)
    estimate = assessment.plan.time.total
    assert abs(estimate - measured) / measured < TOLERANCE, (estimate, measured)
    assert ("not runnable by the DPO trainer",) == tuple(
        category for category, _ in assessment.problems if category != "out of memory")


def test_published_layouts_fit_except_where_the_estimate_is_conservative():
    """NVIDIA ran all of them on 80 GB; the estimate fits all but one: 8B FP8 on 8 GPUs,
    where it counts ~2.9 GiB too much (its FP8 weight copies and the DP4-sharded
    optimizer state). Recorded here so a change to the memory model shows up."""
    oversized = []
    for model, layout, precision, gpus, global_batch, _ in PUBLISHED:
        plan = _estimate(model, layout, precision, gpus, global_batch).plan
        if plan.memory.total > find_gpu("h100-80gb").memory_bytes:
            oversized.append((model, precision, gpus))
    assert oversized == [("llama3_8b", "fp8", 8)]
