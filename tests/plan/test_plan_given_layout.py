"""tpo-plan --layout / --from: one layout judged with every problem, its estimate, its
parameter counts (checked by hand), and the smallest change after which it runs."""

import json

import pytest

from megatron_tpo.cli.plan import main
from megatron_tpo.config import ConfigError, load_model_config
from megatron_tpo.plan.cost.memory import training_memory
from megatron_tpo.plan.cost.parameters import most_loaded_rank_parameters
from megatron_tpo.plan.cost.timing import step_time
from megatron_tpo.plan.hardware import GIB, find_gpu
from megatron_tpo.plan.search.given_layout import (assess_layout, describe_change, parse_layout,
                                                   smallest_fixes)
from megatron_tpo.plan.search.training import evaluate
from megatron_tpo.plan.workload import Cluster, TrainingLayout, Workload


def _workload(model: str, nodes: int, seq_len: int = 4096, global_batch: int = 256):
    cluster = Cluster("h100-80gb", find_gpu("h100-80gb"), nodes, 8)
    return Workload(load_model_config(model), cluster, seq_len, global_batch)


def test_parse_layout_derives_data_parallel_from_the_world_size():
    layout = parse_layout("tp=4,pp=4,vpp=5,cp=2,mbs=1", world_size=64, recompute="full", fp8=True)
    assert layout == TrainingLayout(tp=4, pp=4, vpp=5, cp=2, dp=2, micro_batch=1,
                                    recompute="full", fp8=True)
    assert parse_layout("tp=8", world_size=16).dp == 2


@pytest.mark.parametrize("text, message", [
    ("tp=4,pp=3", "world size 64 is not a multiple of TP x PP x CP = 4 x 3 x 1"),
    ("tp=4,dp=3", "dp=3 but 64 GPUs / (TP x PP x CP) give DP=16"),
    ("tp=four", "'tp=four' is not one of tp=N, pp=N"),
    ("ep=2", "'ep=2' is not one of"),
    ("tp=0", "layout tp=0: must be >= 1"),
])
def test_bad_layout_strings_are_named(text, message):
    with pytest.raises(ConfigError) as error:
        parse_layout(text, world_size=64)
    assert message in str(error.value)


def test_parameter_counts_of_70b_at_tp4_pp4_vpp5_by_hand():
    model = load_model_config("llama3_70b")
    # Per layer on one TP rank: two norms (replicated), then proj, QKV (64 heads + 2 x 8
    # KV groups of 128), gate+up and down, each split over TP4.
    layer = 2 * 8192 + (8192 * 8192 + (64 + 2 * 8) * 128 * 8192 + 3 * 8192 * 28672) // 4
    padded_vocab = 128512  # 128256 rounded up to a multiple of 128 x TP4
    last_stage = 20 * layer + 8192 + padded_vocab // 4 * 8192
    first_stage = 20 * layer + padded_vocab // 4 * 8192
    assert most_loaded_rank_parameters(model, 4, 4, 5) == (3, last_stage)
    assert last_stage > first_stage


def test_nvidias_70b_layout_is_not_runnable_and_three_moves_fix_it():
    """TP4 PP4 VPP5 CP2 MBS1 fits megatron-core, but the DPO trainer refuses CP2 and an
    odd micro-batch (a micro-batch holds whole pairs). CP1 with MBS2 alone does not fit;
    one more PP stage makes it."""
    workload = _workload("llama3_70b", nodes=8)
    assessment = assess_layout(workload, parse_layout("tp=4,pp=4,vpp=5,cp=2,mbs=1", 64))
    (category, reason), = assessment.problems
    assert category == "not runnable by the DPO trainer"
    assert "context_parallel_size=2" in reason and "MBS1" in reason
    # The estimate is still made for exactly this layout.
    assert assessment.plan.memory == training_memory(workload, assessment.layout)
    assert assessment.plan.time == step_time(workload, assessment.layout)
    assert assessment.total_parameters == 70_553_706_496
    assert evaluate(workload, TrainingLayout(4, 4, 5, 1, 4, 2, "none", False)).category == \
        "out of memory"
    best = assessment.fixes[0]
    assert best.changes == ("PP 4 -> 8", "CP 2 -> 1", "MBS 1 -> 2")
    assert best.plan.layout == TrainingLayout(4, 8, 5, 1, 2, 2, "none", False)
    assert best.plan.memory.total <= workload.cluster.gpu.memory_bytes


def test_out_of_memory_layout_gets_the_one_change_that_fits():
    """70B on two nodes at TP8 PP2, one pair per micro-batch: 18.46 GiB short; full
    recomputation is the one-knob fix (more PP would need 16 stages x TP8 = 128 GPUs)."""
    workload = _workload("llama3_70b", nodes=2)
    layout = parse_layout("tp=8,pp=2,mbs=2", world_size=16)
    assessment = assess_layout(workload, layout)
    (category, reason), = assessment.problems
    assert category == "out of memory"
    shortfall = (assessment.plan.memory.total - 79.6 * GIB) / GIB
    assert f"out of memory by {shortfall:.2f} GiB" in reason
    assert shortfall == pytest.approx(18.46, abs=0.01)
    for fix in assessment.fixes:
        assert len(fix.changes) == 1
        assert evaluate(workload, fix.plan.layout) == fix.plan  # it does fit
    assert assessment.fixes[0].changes == ("recompute none -> full",)


def test_every_problem_is_listed_not_only_the_first():
    workload = _workload("llama3_8b", nodes=1, global_batch=256)
    layout = parse_layout("tp=1,cp=2,mbs=3", world_size=8, recompute="selective")
    categories = [category for category, _ in assess_layout(workload, layout).problems]
    assert categories == ["selective = none under flash attention", "global batch not divisible",
                          "out of memory", "not runnable by the DPO trainer"]
    reason = assess_layout(workload, layout).problems[-1][1]
    assert "CP2" in reason and "MBS3" in reason


def test_layout_that_does_not_split_the_model_has_no_estimate():
    three = TrainingLayout(tp=1, pp=3, vpp=1, cp=1, dp=1, micro_batch=1, recompute="none",
                           fp8=False)  # 32 layers do not split into 3 stages
    cluster = Cluster("h100-80gb", find_gpu("h100-80gb"), 1, 3)
    small = Workload(load_model_config("llama3_8b"), cluster, 4096, 12)
    assessment = assess_layout(small, three)
    assert assessment.plan is None and assessment.most_loaded_rank_parameters is None
    assert assessment.problems[0][0] == "too few layers per stage"


def test_describe_change_names_each_knob():
    old = TrainingLayout(4, 4, 5, 2, 2, 1, "none", False)
    new = TrainingLayout(4, 8, 5, 1, 2, 1, "full", True)
    assert describe_change(old, new) == ("PP 4 -> 8", "CP 2 -> 1", "recompute none -> full",
                                         "FP8 False -> True")
    assert smallest_fixes(_workload("llama3_8b", 1), TrainingLayout(1, 1, 1, 1, 8, 1, "none",
                                                                    False)) != []


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_layout_text_and_json(capsys):
    base = ["--model", "llama3_70b", "--nodes", "8", "--seq-len", "4096", "--global-batch", "256",
            "--layout", "tp=4,pp=4,vpp=5,cp=2,mbs=1"]
    code, out, _ = _run(capsys, *base)
    assert code == 0
    for text in ("Parameters: 70.55 B in the model, 4.542 B on each rank of PP stage 3",
                 "Verdict: cannot run (1 problem)", "not runnable by the DPO trainer: CP2",
                 "Memory per GPU (PP stage 0", "Step time", "PP 4 -> 8 + CP 2 -> 1 + MBS 1 -> 2"):
        assert text in out
    code, out, _ = _run(capsys, *base, "--json")
    report = json.loads(out)
    assert report["runs"] is False
    assert report["parameters"]["total"] == 70_553_706_496
    assert report["estimate"]["parameters"]["most_loaded_rank"] == 4_541_718_528
    assert report["fixes"][0]["changes"] == ["PP 4 -> 8", "CP 2 -> 1", "MBS 1 -> 2"]
    assert report["fixes"][0]["context_parallel_size"] == 1


def test_cli_from_a_parallel_yaml(capsys, tmp_path):
    path = tmp_path / "parallel.yaml"
    path.write_text("tensor_model_parallel_size: 2\npipeline_model_parallel_size: 1\n"
                    "context_parallel_size: 1\nsequence_parallel: true\n")
    code, out, _ = _run(capsys, "--model", "llama3_8b", "--nodes", "1", "--seq-len", "4096",
                        "--global-batch", "256", "--from", str(path), "--micro-batch", "4",
                        "--json")
    assert code == 0
    report = json.loads(out)
    assert report["runs"] is True
    assert report["estimate"]["micro_batch_size"] == 4
    assert report["estimate"]["data_parallel_size"] == 4


def test_cli_layout_errors(capsys):
    base = ["--model", "llama3_8b", "--nodes", "1", "--seq-len", "4096", "--global-batch", "256"]
    code, _, err = _run(capsys, *base, "--layout", "tp=3")
    assert code == 2 and "world size 8 is not a multiple of TP x PP x CP = 3 x 1 x 1" in err
    code, _, err = _run(capsys, *base, "--recompute", "full")
    assert code == 2 and "use them with --layout or --from" in err
    code, _, err = _run(capsys, "--model", "llama3_8b", "--nodes", "1", "--seq-len", "4096",
                        "--layout", "tp=1")
    assert code == 2 and "--global-batch is required" in err
