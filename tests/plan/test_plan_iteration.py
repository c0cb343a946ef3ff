"""One whole TPO iteration: each stage against a hand calculation, colocated engines in
the memory the trainer leaves, separate pools, and the recommendation."""

import json
import math

import pytest

from megatron_tpo.cli.plan import main
from megatron_tpo.config import ConfigError, load_model_config
from megatron_tpo.plan.cost.engines import plan_engines
from megatron_tpo.plan.cost.iteration import (IterationAssumptions, IterationRequest,
                                              checkpoint_seconds, judge_seconds, rollout_seconds,
                                              trainer_seconds, weight_sync_seconds)
from megatron_tpo.plan.cost.pools import compare_pools, estimate_iteration, pool_splits
from megatron_tpo.plan.cost.timing import step_time
from megatron_tpo.plan.hardware import GIB, find_gpu
from megatron_tpo.plan.search.training import search_training
from megatron_tpo.plan.workload import Cluster, Workload

H100 = find_gpu("h100-80gb")
N_8B = 8_030_261_248  # Llama-3 8B parameters (tests/plan/test_plan.py counts them by hand)


def _request(prompts=5000, samples=8, judge_kind="reward_model", **overrides):
    values = dict(prompts=prompts, samples=samples, prompt_tokens=300.0, thought_tokens=400.0,
                  response_tokens=300.0, judge_kind=judge_kind,
                  judge_model=load_model_config("llama3_8b"))
    values.update(overrides)
    return IterationRequest(**values)


def _engine(tp, nodes=1):
    cluster = Cluster("h100-80gb", H100, nodes, 8)
    search = plan_engines("policy", load_model_config("llama3_8b"), cluster, 1000, 0.9)
    return cluster, next(plan for plan in search.plans if plan.tp == tp)


def test_rollout_of_few_prompts_is_weight_read_bound_by_hand():
    """4 prompts x 8 samples on 8 TP1 replicas: 4 sequences each. A decode step reads
    the 16.06 GB of bf16 weights and 4 half-full KV caches (1000-token sequences,
    128 KiB per token: 32 layers x 8 KV heads x 128 x 2 x 2 bytes) at 3.35 TB/s."""
    cluster, engine = _engine(tp=1)
    assume = IterationAssumptions()
    step = (N_8B * 2 + 4 * 500 * 131072) / 3.35e12
    rate = 8 * 4 / step * assume.decode_efficiency
    decode = 32 * 700 / rate
    prefill = 4 * 300 * 2 * N_8B / (8 * 989e12 * assume.forward_mfu)
    policy = load_model_config("llama3_8b")
    assert rollout_seconds(_request(prompts=4), policy, cluster, engine, assume) == pytest.approx(
        decode + prefill, rel=1e-9)


def test_reward_model_judge_is_one_forward_over_every_response():
    cluster, engine = _engine(tp=1)
    assume = IterationAssumptions()
    tokens = 5000 * 8 * (300 + 300)
    expected = tokens * 2 * N_8B / (8 * 989e12 * assume.forward_mfu)
    assert judge_seconds(_request(), cluster, engine, assume) == pytest.approx(expected)


def test_pairwise_judge_judges_every_pair_in_both_orders():
    assert _request(judge_kind="pairwise").comparisons == 5000 * 28 * 2
    assert _request(judge_kind="pairwise", comparisons_per_prompt=4).comparisons == 5000 * 8
    cluster, engine = _engine(tp=1)
    assume = IterationAssumptions()
    reward = judge_seconds(_request(), cluster, engine, assume)
    pairwise = judge_seconds(_request(judge_kind="pairwise"), cluster, engine, assume)
    assert pairwise > 10 * reward  # 280,000 generated verdicts against 40,000 forwards


def test_trainer_stages_follow_the_step_estimate_at_the_mean_length():
    cluster = Cluster("h100-80gb", H100, 1, 8)
    workload = Workload(load_model_config("llama3_8b"), cluster, 4096, 256)
    plan = search_training(workload).plans[0]
    reference, train = trainer_seconds(workload, plan, _request())
    step = step_time(Workload(workload.model, cluster, 1000, 256), plan.layout)
    steps = math.ceil(2 * 5000 / 256)
    assert train == pytest.approx(steps * step.total)
    assert reference == pytest.approx(steps * ((step.compute + step.bubble) / 3 + (
        step.tensor_parallel_comm + step.context_parallel_comm + step.pipeline_comm) / 2))
    assert reference < train / 2.5


def test_checkpoint_and_weight_sync_by_hand():
    cluster, engine = _engine(tp=1, nodes=2)
    workload = Workload(load_model_config("llama3_8b"), cluster, 4096, 256)
    plan = search_training(workload).plans[0]
    assume = IterationAssumptions()
    assert checkpoint_seconds(workload.model, cluster, assume) == pytest.approx(
        N_8B * 14 / (2 * 2e9))
    # Model-parallel group inside a node: only NVLink, 16 GB into each TP1 engine GPU.
    assert plan.layout.tp * plan.layout.pp <= 8
    buckets = N_8B * 2 / 1e9 * assume.weight_sync_seconds_per_gb
    assert weight_sync_seconds(workload.model, plan, cluster, engine, True, assume) == \
        pytest.approx(N_8B * 2 / 450e9 + buckets)
    separate = N_8B * 2 / (plan.layout.tp * plan.layout.pp) / 50e9 + N_8B * 2 / 450e9 + buckets
    assert weight_sync_seconds(workload.model, plan, cluster, engine, False, assume) == \
        pytest.approx(separate)


def test_pool_splits():
    cluster = Cluster("h100-80gb", H100, 4, 8)
    assert [(t.nodes, e.nodes) for t, e in pool_splits(cluster)] == [(3, 1), (2, 2), (1, 3)]
    one_node = Cluster("h100-80gb", H100, 1, 8)
    assert [e.gpus_per_node for _, e in pool_splits(one_node)] == [1, 2, 4, 6, 7]


def test_colocated_engines_get_what_the_trainer_leaves_and_the_faster_mode_is_recommended():
    cluster = Cluster("h100-80gb", H100, 2, 8)
    workload = Workload(load_model_config("llama3_8b"), cluster, 4096, 256)
    plans = search_training(workload).plans
    request, assume = _request(), IterationAssumptions()
    comparison = compare_pools(workload, plans, request, assume)
    colocated, separate = comparison.colocated, comparison.separate[0]
    memory = colocated.trainer_plan.memory
    resident = (memory.weights + memory.gradients + memory.optimizer) / GIB
    # The colocated engine's KV cache is what 0.9 x 79.6 GiB leaves after the trainer's
    # resident state, the engine's weights and its 2 GiB workspace.
    weights = N_8B * 2 / colocated.policy_engine.tp / GIB
    assert colocated.policy_engine.kv_cache_gib == pytest.approx(
        0.9 * 79.6 - resident - weights - 2.0)
    assert separate.policy_engine.kv_cache_gib > colocated.policy_engine.kv_cache_gib
    assert (separate.trainer_gpus, separate.engine_gpus) == (8, 8)
    assert colocated.stages.engine_switches == 2 * assume.engine_switch_seconds
    assert separate.stages.engine_switches == 0
    best = min((colocated, separate), key=lambda e: e.stages.total)
    assert comparison.recommended is best
    again = estimate_iteration("colocated", workload, colocated.trainer_plan, cluster,
                               0.9 - resident * GIB / cluster.gpu.memory_bytes, request, assume)
    assert again.stages == colocated.stages


def test_cli_iteration_text_and_json(capsys):
    argv = ["--model", "llama3_8b", "--nodes", "2", "--seq-len", "4096", "--global-batch", "256",
            "--prompts", "5000", "--samples", "8", "--prompt-tokens", "300", "--thought-tokens",
            "400", "--response-tokens", "300", "--judge", "llama3_8b"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in ("One TPO iteration: 5000 prompts x 8 samples", "rollout", "reference_logprobs",
                 "weight_sync", "checkpoint", "Recommended:"):
        assert text in out
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)["iteration"]
    assert report["recommended"] in ("colocated", "separate")
    chosen = report[report["recommended"]] if report["recommended"] == "colocated" else \
        report["separate"][0]
    assert chosen["seconds"]["total"] == pytest.approx(sum(
        value for key, value in chosen["seconds"].items() if key != "total"))


def test_cli_iteration_needs_the_lengths(capsys):
    code = main(["--model", "llama3_8b", "--nodes", "1", "--seq-len", "4096",
                 "--global-batch", "256", "--prompts", "100"])
    assert code == 2
    assert "the iteration estimate needs --prompt-tokens, --thought-tokens, --response-tokens" \
        in capsys.readouterr().err


def test_a_single_sample_cannot_make_a_pair():
    with pytest.raises(ConfigError, match="a preference pair needs K >= 2"):
        _request(samples=1).validate()
