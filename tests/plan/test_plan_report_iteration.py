"""plan/report/iteration.py: the whole-iteration estimate of Llama 3 8B on 2 x 8 H100, as
data and as text, holds the stage seconds the cost model computes; no arrangement that
fits is said so."""

import pytest

from megatron_tpo.config import load_model_config
from megatron_tpo.plan.cost.iteration import IterationAssumptions, IterationRequest
from megatron_tpo.plan.cost.pools import PoolComparison, compare_pools
from megatron_tpo.plan.hardware import find_gpu
from megatron_tpo.plan.report.iteration import STAGE_ORDER, format_iteration, iteration_report_dict
from megatron_tpo.plan.search.training import search_training
from megatron_tpo.plan.workload import Assumptions, Cluster, Workload


@pytest.fixture(scope="module")
def estimated():
    model = load_model_config("llama3_8b")
    workload = Workload(model, Cluster("h100-80gb", find_gpu("h100-80gb"), 2, 8), 4096, 128,
                        Assumptions(allow_fp8=False))
    request = IterationRequest(prompts=1000, samples=8, prompt_tokens=200, thought_tokens=300,
                               response_tokens=200, judge_kind="reward_model", judge_model=model)
    assume = IterationAssumptions()
    comparison = compare_pools(workload, search_training(workload).plans, request, assume)
    return request, assume, comparison


def test_the_data_holds_each_options_stage_seconds(estimated):
    request, assume, comparison = estimated
    assert comparison.colocated is not None and comparison.separate
    data = iteration_report_dict(comparison, request, assume)
    assert data["request"]["prompts"] == 1000 and data["request"]["judge_model"] == "llama3_8b"
    colocated = data["colocated"]
    assert colocated["seconds"] == comparison.colocated.stages.as_dict()
    assert colocated["seconds"]["total"] == pytest.approx(
        sum(colocated["seconds"][stage] for stage in STAGE_ORDER))
    assert colocated["trainer_gpus"] == 16
    assert colocated["trainer_layout"] == comparison.colocated.trainer_plan.layout.label()
    first = data["separate"][0]
    assert first["trainer_gpus"] + first["engine_gpus"] == 16
    fastest = min([comparison.colocated, comparison.separate[0]], key=lambda e: e.stages.total)
    assert data["recommended"] == fastest.mode


def test_the_text_lists_stages_totals_and_the_recommendation(estimated):
    request, _, comparison = estimated
    lines = format_iteration(comparison, request).splitlines()
    assert lines[0] == ("One TPO iteration: 1000 prompts x 8 samples, means 200 prompt + 300 "
                        "thought + 200 response tokens, 1000 pairs, judge reward_model "
                        "(llama3_8b)")
    options = [comparison.colocated, comparison.separate[0]]
    assert lines[1].split() == ["stage", "(seconds)", *(o.mode for o in options)]
    for stage in (*STAGE_ORDER, "total"):
        cells = next(line for line in lines if line.split()[0] == stage).split()[1:]
        assert [float(c) for c in cells] == [round(getattr(o.stages, stage), 1)
                                             for o in options]
    best, other = sorted(options, key=lambda o: o.stages.total)
    assert lines[-1] == (f"Recommended: {best.mode}: {best.stages.total / 60:.1f} min per "
                         f"iteration; {other.mode} would take "
                         f"{other.stages.total / best.stages.total - 1:.0%} longer.")


def test_no_arrangement_that_fits_is_said_so(estimated):
    request, _, _ = estimated
    text = format_iteration(PoolComparison(None, []), request)
    assert text.splitlines()[1].startswith("  no arrangement fits: colocated, the engines")
