"""Only layouts the DPO trainer runs are ranked: the planner's refusals equal the
trainer's own check, and context-parallel layouts are shown apart with the reason."""

import json

import pytest

from megatron_tpo.cli.plan import main
from megatron_tpo.config import ConfigError, load_model_config
from megatron_tpo.plan.hardware import find_gpu
from megatron_tpo.plan.search.runnable import trainer_refusal
from megatron_tpo.plan.search.training import search_training
from megatron_tpo.plan.workload import Cluster, TrainingLayout, Workload
from megatron_tpo.train.dpo_batch import TokenizedPair, pair_micro_batches
from megatron_tpo.train.dpo_trainer import _check_layout


@pytest.mark.parametrize("tp, pp, vpp, cp", [(1, 1, 1, 1), (2, 2, 1, 1), (4, 4, 5, 1),
                                             (1, 1, 1, 2), (4, 4, 5, 2), (8, 1, 1, 4)])
def test_planner_refuses_exactly_what_the_dpo_trainer_refuses(tp, pp, vpp, cp):
    layout = TrainingLayout(tp, pp, vpp, cp, dp=1, micro_batch=2, recompute="none", fp8=False)
    try:
        _check_layout(layout.parallel_config())
        trainer_says = None
    except ConfigError as error:
        trainer_says = str(error)
    refusal = trainer_refusal(layout)
    assert (refusal is None) == (trainer_says is None)
    if refusal:
        assert f"parallel.context_parallel_size={cp}" in refusal
        assert f"parallel.context_parallel_size={cp}" in trainer_says


def test_odd_micro_batches_are_refused_because_a_micro_batch_holds_whole_pairs():
    pairs = [TokenizedPair(prompt=[1, 2], chosen=[3, 4, 5], rejected=[6]) for _ in range(3)]
    for pairs_per_micro_batch in (1, 3):
        batches = pair_micro_batches(pairs, pairs_per_micro_batch)
        assert {batch.input_ids.shape[0] for batch in batches} == {2 * pairs_per_micro_batch}
    odd = TrainingLayout(2, 1, 1, 1, dp=4, micro_batch=3, recompute="none", fp8=False)
    assert "MBS3" in trainer_refusal(odd) and "CP" not in trainer_refusal(odd)
    assert trainer_refusal(TrainingLayout(2, 1, 1, 1, 4, 2, "none", False)) is None


def runs(layout):
    return layout.cp == 1 and layout.micro_batch % 2 == 0


def _workload(model, nodes, seq_len=8192, global_batch=128):
    cluster = Cluster("h100-80gb", find_gpu("h100-80gb"), nodes, 8)
    return Workload(load_model_config(model), cluster, seq_len, global_batch)


def test_search_ranks_runnable_layouts_and_keeps_the_faster_cp_ones_apart():
    """Llama-3 8B on 8 GPUs at 8192 tokens: a context-parallel layout is fastest for megatron-core,
    but the trainer cannot run it; it is listed as not runnable, never ranked."""
    workload = _workload("llama3_8b", 1)
    everything = search_training(workload, runnable_only=False)
    runnable = search_training(workload)
    assert everything.plans[0].layout.cp > 1
    assert all(plan.layout.cp == 1 and plan.layout.micro_batch % 2 == 0
               for plan in runnable.plans)
    assert [plan for plan in everything.plans if runs(plan.layout)] == runnable.plans
    assert sorted(plan.layout.label() for plan, _ in runnable.not_runnable) == sorted(
        plan.layout.label() for plan in everything.plans if not runs(plan.layout))
    assert runnable.not_runnable[0][0] == everything.plans[0]
    assert all("not runnable by the DPO trainer" in reason for _, reason in runnable.not_runnable)


def test_report_shows_the_not_runnable_count_and_the_best_of_them(capsys):
    argv = ["--model", "llama3_8b", "--nodes", "1", "--seq-len", "8192", "--global-batch", "128"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "more layouts fit but are not runnable by the DPO trainer (e.g. TP1 PP1 VPP- CP4" in out
    assert main(argv + ["--json", "--top", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(plan["context_parallel_size"] == 1 for plan in report["training"]["plans"])
    best_refused = report["training"]["not_runnable"]["best"][0]
    assert best_refused["context_parallel_size"] == 4
    assert "context_parallel_size=4" in best_refused["reason"]
