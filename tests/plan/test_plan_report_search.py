"""plan/report/search.py: the ranked report of Llama 3 8B on one 8 x H100 node holds the
figures the cost model computes for its plans, in the JSON and in the text."""

import pytest

from megatron_tpo.config import load_model_config
from megatron_tpo.plan.cost.memory import training_memory
from megatron_tpo.plan.cost.timing import step_time
from megatron_tpo.plan.hardware import GIB, find_gpu
from megatron_tpo.plan.report.search import (MEMORY_LABELS, format_report, plan_report_dict,
                                             training_plan_dict)
from megatron_tpo.plan.search.training import search_training
from megatron_tpo.plan.workload import Assumptions, Cluster, Workload

LLAMA3_8B_PARAMETERS = 8_030_261_248   # Meta's model card: 8.03 B


@pytest.fixture(scope="module")
def searched():
    workload = Workload(load_model_config("llama3_8b"),
                        Cluster("h100-80gb", find_gpu("h100-80gb"), 1, 8), 4096, 128,
                        Assumptions(allow_fp8=False))
    return workload, search_training(workload)


def test_a_plan_as_data_holds_the_cost_models_figures(searched):
    workload, search = searched
    plan = search.plans[0]
    layout = plan.layout
    data = training_plan_dict(workload, plan)
    assert data["memory_gib"] == training_memory(workload, layout).as_gib()
    assert data["step_time_s"] == step_time(workload, layout).as_dict()
    assert data["num_microbatches"] == 128 // (layout.dp * layout.micro_batch)
    assert data["tokens_per_second"] == pytest.approx(128 * 4096 / plan.time.total)
    assert (data["tensor_model_parallel_size"], data["pipeline_model_parallel_size"],
            data["data_parallel_size"]) == (layout.tp, layout.pp, layout.dp)
    assert layout.tp * layout.pp * layout.cp * layout.dp == 8
    assert data["parameters"]["total"] == LLAMA3_8B_PARAMETERS
    assert data["fp8"] is False


def test_the_report_dict_counts_and_ranks_the_search(searched):
    workload, search = searched
    report = plan_report_dict(workload, search, top=3, show_rejected=True, engines=[])
    assert report["request"] == {"model": "llama3_8b", "gpu": "h100-80gb", "nodes": 1,
                                 "gpus_per_node": 8, "world_size": 8, "seq_len": 4096,
                                 "global_batch": 128}
    assert report["training"]["feasible"] == len(search.plans) > 3
    assert report["training"]["rejected"] == len(search.rejections)
    assert [p["step_time_s"]["total"] for p in report["training"]["plans"]] == \
        [p.time.total for p in search.plans[:3]]
    assert len(report["training"]["rejected_layouts"]) == len(search.rejections)
    assert sum(r["count"] for r in report["training"]["rejected_summary"]) == \
        len(search.rejections)


def test_the_text_shows_plan_ones_memory_time_and_parameters(searched):
    workload, search = searched
    best = search.plans[0]
    text = format_report(workload, search, top=2, show_rejected=False, engines=[],
                         gpu_memory_utilization=0.9)
    lines = text.splitlines()
    assert lines[0] == ("tpo-plan: llama3_8b on 1 x 8 h100-80gb (8 GPUs), seq-len 4096, "
                        "global batch 128")
    assert "top 2 by estimated step time:" in lines[2]
    row = lines[4].split()
    assert row[0] == "1" and float(row[10]) == round(best.memory.total / GIB, 1)
    assert float(row[11]) == round(best.time.total, 2)
    assert "Parameters: 8.03 B in the model" in text
    memory = training_memory(workload, best.layout).as_gib()
    for key, label in MEMORY_LABELS.items():
        assert f"  {label:<58} {memory[key]:>7.2f} GiB" in lines
    assert f"{memory['total']:>7.2f} GiB of 79.6" in text
    assert "All rejected layouts:" not in text
