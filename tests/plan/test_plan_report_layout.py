"""plan/report/layout.py: the report on one given layout of Llama 3 8B on 8 x H100 holds the
cost model's figures for it, its problems, and the fixes' figures."""

import pytest

from megatron_tpo.config import load_model_config
from megatron_tpo.plan.cost.memory import training_memory
from megatron_tpo.plan.hardware import GIB, find_gpu
from megatron_tpo.plan.report.layout import format_layout_report, layout_report_dict
from megatron_tpo.plan.search.given_layout import assess_layout, parse_layout
from megatron_tpo.plan.search.training import search_training
from megatron_tpo.plan.workload import Assumptions, Cluster, Workload


@pytest.fixture(scope="module")
def workload():
    return Workload(load_model_config("llama3_8b"),
                    Cluster("h100-80gb", find_gpu("h100-80gb"), 1, 8), 4096, 128,
                    Assumptions(allow_fp8=False))


def test_a_layout_out_of_memory_reports_its_shortfall_and_fixes(workload):
    layout = parse_layout("tp=1,pp=1,mbs=2", 8)
    assessment = assess_layout(workload, layout)
    needs = training_memory(workload, layout).total / GIB
    assert needs > 79.6
    data = layout_report_dict(workload, assessment)
    assert data["runs"] is False
    assert data["request"]["layout"] == "TP1 PP1 VPP- CP1 DP8 MBS2 rc=none bf16"
    assert data["problems"] == [{"category": "out of memory",
                                 "reason": f"out of memory by {needs - 79.6:.2f} GiB on PP "
                                           f"stage 0 (needs {needs:.1f} of 79.6 GiB)"}]
    assert data["estimate"]["memory_gib"]["total"] == pytest.approx(needs)
    assert data["fixes"] and all(f["memory_gib"]["total"] <= 79.6 for f in data["fixes"])
    text = format_layout_report(workload, assessment)
    assert "Verdict: cannot run (1 problem):" in text
    assert f"  - out of memory by {needs - 79.6:.2f} GiB" in text
    fix = assessment.fixes[0]
    assert (f"  {' + '.join(fix.changes)}: {fix.plan.memory.total / GIB:.1f} GiB/GPU, "
            f"{fix.plan.time.total:.2f} s/step") in text


def test_a_layout_that_runs_reports_its_estimate(workload):
    layout = search_training(workload).plans[0].layout
    assessment = assess_layout(workload, layout)
    assert assessment.runs
    data = layout_report_dict(workload, assessment)
    memory = training_memory(workload, layout).as_gib()
    assert data["estimate"]["memory_gib"] == memory
    assert data["problems"] == [] and data["fixes"] == []
    assert data["parameters"]["total"] == 8_030_261_248
    text = format_layout_report(workload, assessment)
    assert "Verdict: the trainer runs and fits" in text
    assert f"{memory['total']:>7.2f} GiB of 79.6" in text
    assert f"Step time {assessment.plan.time.total:.3f} s" in text
    micro_batches = 128 // (layout.dp * layout.micro_batch)
    assert f"({micro_batches} micro-batches per step)" in text
