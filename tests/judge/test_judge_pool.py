"""A pairwise judge with a model of its own: where it runs (judge.pairwise.placement).

vLLM's sleep-mode allocator is one per process and a second engine's start-up checks free
memory against the first's, so with rollout.engine=vllm the judge model is refused
beside the policy's engine and must be a tpo-engine pool of its own (``--serve judge``).
On CPU, with HF engines and gloo: a two-rank trainer world in front of a judge pool of
two ``tpo-engine --serve judge`` processes judges exactly as the colocated judge does.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tpo.config import ConfigError
from megatron_tpo.judge.config import JudgeConfig, PairwiseJudgeConfig, check_judge_placement
from megatron_tpo.rollout.config import BridgeConfig, RolloutConfig, VLLMConfig

from local_slurm import slurm_installed
from tpo_fixtures import tiny_run_overrides
from engine_processes import start_engine_world, stop_engine_world
from judge_fixtures import PROMPTS, RESPONSES, write_verdict_judge


def _pairwise(**settings) -> JudgeConfig:
    return JudgeConfig(kind="pairwise", pairwise=PairwiseJudgeConfig(**settings))


def test_a_judge_model_beside_a_vllm_policy_engine_is_refused_naming_the_fix():
    judge = _pairwise(model="/models/judge-70b")
    judge.validate()   # the judge group alone cannot know where the policy's engine is
    with pytest.raises(ConfigError) as refused:
        check_judge_placement(judge, RolloutConfig(engine="vllm"))
    message = str(refused.value)
    assert "judge.pairwise.placement='colocated'" in message
    assert "two sleep-mode vLLM engines in one process" in message
    assert "judge.pairwise.placement=separate" in message
    # A policy pool leaves the trainer's processes without an engine, still no judge's.
    with pytest.raises(ConfigError, match=r"a vLLM judge engine in every trainer rank's "
                                          r"process.*judge.pairwise.placement=separate"):
        check_judge_placement(judge, RolloutConfig(engine="vllm", placement="separate"))


def test_the_policy_judging_itself_and_hf_engines_may_stay_colocated():
    check_judge_placement(_pairwise(), RolloutConfig(engine="vllm"))   # no second engine
    check_judge_placement(_pairwise(model="/m/judge"), RolloutConfig(engine="hf"))
    check_judge_placement(_pairwise(model="/m/judge", placement="separate"),
                          RolloutConfig(engine="vllm"))
    check_judge_placement(JudgeConfig(kind="format"), RolloutConfig(engine="vllm"))


def test_tpo_run_refuses_a_judge_model_colocated_with_a_vllm_policy(tmp_path):
    from megatron_tpo.cli.run import compose_config

    config = compose_config(tiny_run_overrides(tmp_path, 1) + [
        "rollout.engine=vllm", "judge=pairwise", f"judge.pairwise.model={tmp_path / 'policy'}"])
    with pytest.raises(ConfigError, match=r"judge.pairwise.placement=separate"):
        config.validate(1)
    # Where the judge pool runs is no stage output: a requeued job on other nodes resumes.
    before = config.digest_fields()
    config.judge.pairwise.placement = "separate"
    config.judge.pairwise.bridge.address = "node-17"
    config.validate(1)
    assert config.digest_fields() == before


def test_the_judge_pool_settings_are_checked_under_their_own_names():
    with pytest.raises(ConfigError, match="judge.pairwise.placement='apart'"):
        _pairwise(model="/m/j", placement="apart").validate()
    with pytest.raises(ConfigError, match="placement=separate needs judge.pairwise.model"):
        _pairwise(placement="separate").validate()
    vllm = RolloutConfig(engine="vllm")
    with pytest.raises(ConfigError, match=r"judge.pairwise.bridge.engine_ranks=4: must be a "
                                          r"positive multiple .*judge.pairwise.vllm.tensor_"):
        check_judge_placement(_pairwise(model="/m/j", placement="separate",
                                        vllm=VLLMConfig(tensor_parallel_size=8),
                                        bridge=BridgeConfig(engine_ranks=4)), vllm)
    with pytest.raises(ConfigError, match=r"judge.pairwise.vllm.gpu_memory_utilization=1.5"):
        check_judge_placement(_pairwise(model="/m/j", placement="separate",
                                        vllm=VLLMConfig(gpu_memory_utilization=1.5)), vllm)
    both = RolloutConfig(engine="vllm", placement="separate", bridge=BridgeConfig(port=29800))
    with pytest.raises(ConfigError, match="judge.pairwise.bridge.port=29800 is rollout.bridge"):
        check_judge_placement(_pairwise(model="/m/j", placement="separate",
                                        bridge=BridgeConfig(port=29800)), both)
    check_judge_placement(_pairwise(model="/m/j", placement="separate"), both)


# -- the judge pool on CPU ------------------------------------------------------------

def _judge_worker(rank, world_size, overrides):
    """Every trainer rank builds the pairwise judge as build_tpo does, and judges."""
    from megatron_tpo.build import build_judge_for_rank
    from megatron_tpo.cli.run import compose_config

    torch.distributed.init_process_group("gloo")
    config = compose_config(overrides)
    config.validate(world_size)
    judge = build_judge_for_rank(config, None, None, 1)
    own = judge.own_engine
    judgment = judge.judge(PROMPTS, RESPONSES)
    report = {"scores": judgment.scores, "counts": dict(judgment.counts),
              "extras": judgment.extras, "engine": type(own).__name__}
    if hasattr(own, "shutdown"):
        own.shutdown()   # trainer rank 0 stops the pool (tpo-run leaves it to atexit)
    return report


@pytest.mark.slow
def test_a_judge_pool_judges_exactly_as_the_colocated_judge(tmp_path, monkeypatch):
    from megatron_tpo.parallel.launch import free_local_port
    from megatron_tpo.parallel.local_launch import spawn_local

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    judge_dir = write_verdict_judge(tmp_path / "judge")
    overrides = tiny_run_overrides(tmp_path, 1) + [
        "judge=pairwise", f"judge.pairwise.model={judge_dir}",
        "judge.pairwise.sampling.max_new_tokens=1"]
    colocated = spawn_local(_judge_worker, 2, overrides)

    pool_settings = overrides + [
        "judge.pairwise.placement=separate", f"judge.pairwise.bridge.port={free_local_port()}",
        "judge.pairwise.bridge.engine_ranks=2", "judge.pairwise.bridge.timeout_seconds=60"]
    pool = start_engine_world(["--serve", "judge", *pool_settings], 2, tmp_path, "judge")
    try:
        separate = spawn_local(_judge_worker, 2, pool_settings)
    finally:
        exit_codes, logs = stop_engine_world(pool, tmp_path, "judge")
    assert exit_codes == [0, 0], logs

    assert [r["engine"] for r in colocated] == ["HFRolloutEngine"] * 2
    assert [r["engine"] for r in separate] == ["EnginePoolProxy"] * 2
    # (6 + 1 + 3) pairs, both orders; every verdict parses, and they are not all alike.
    assert colocated[0]["counts"]["verdicts"] == 20
    assert colocated[0]["counts"].get("unparseable_verdicts", 0) == 0
    assert any(abs(rate - 0.5) > 0.1 for rates in colocated[0]["extras"]["win_rate"]
               for rate in rates)
    for report in colocated[1:] + separate:
        assert report["scores"] == colocated[0]["scores"]
        assert report["counts"] == colocated[0]["counts"]
        assert report["extras"] == colocated[0]["extras"]


def test_tpo_engine_serve_judge_refuses_what_it_cannot_serve(capsys, tmp_path):
    from megatron_tpo.cli.engine import main

    overrides = tiny_run_overrides(tmp_path, 1)
    assert main(["--serve", "judge", *overrides]) == 2
    assert "tpo-engine --serve judge serves a pairwise judge's own model only" in \
        capsys.readouterr().err
    assert main(["--serve", "judge", *overrides, "judge=pairwise",
                 f"judge.pairwise.model={tmp_path / 'policy'}"]) == 2
    assert "judge.pairwise.placement='colocated': tpo-engine --serve judge serves only" in \
        capsys.readouterr().err
    assert main(["--serve=critic", *overrides]) == 2
    assert "--serve 'critic': must be one of ('policy', 'judge')" in capsys.readouterr().err


# -- on a local Slurm ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not slurm_installed(),
                    reason="Slurm daemons not installed (.ci/run installs them)")
def test_a_tiny_job_with_a_judge_pool_step_judges_through_it_to_the_end(slurm, tmp_path):
    """slurm/common.sh tpo_launch_judge_pool: a `tpo-engine --serve judge` step (one HF
    engine of the tiny judge) beside a one-rank trainer step, in one allocation."""
    import json
    from collections import Counter

    import pyarrow.parquet as pq

    repository = Path(__file__).resolve().parents[2]
    judge_dir = write_verdict_judge(tmp_path / "judge")
    overrides = [o for o in tiny_run_overrides(tmp_path, 1) if not o.startswith("run.dir")]
    overrides += ["judge=pairwise", f"judge.pairwise.model={judge_dir}",
                  "judge.pairwise.sampling.max_new_tokens=1",
                  "judge.pairwise.max_pairs_per_prompt=2",
                  "judge.pairwise.bridge.timeout_seconds=120"]
    script, run_dir, output = tmp_path / "job.sh", tmp_path / "run", tmp_path / "job.out"
    script.write_text("#!/bin/bash\nset -euo pipefail\nsource slurm/common.sh\n"
                      'JUDGE_TASKS=1 JUDGE_NODES=0 tpo_launch_judge_pool "run.dir=$RUN_DIR" "$@"\n')
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={output}",
         f"--chdir={repository}",
         f"--export=ALL,VENV={Path(sys.prefix)},RUN_DIR={run_dir},"
         "MASTER_ADDR=127.0.0.1,GLOO_SOCKET_IFNAME=lo", str(script), *overrides],
        env=slurm.env, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    state = slurm.wait_for_job(job_id, timeout=600)
    log = output.read_text() if output.exists() else ""
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log[-4000:]}"
    assert "judge pool of 1 tasks beside the trainer" in log and "1 trainer tasks" in log, \
        log[-4000:]
    stage = run_dir / "stages" / "iteration_000"
    parsed = Counter(row["prompt_id"] for row in pq.read_table(stage / "rollouts.parquet")
                     .to_pylist() if row["parse_ok"])
    judged = Counter(row["prompt_id"]
                     for row in pq.read_table(stage / "judgments.parquet").to_pylist())
    assert set(judged) == {p for p, k in parsed.items() if k >= 2}, (judged, parsed)
    counts = json.loads((stage / "judgments.manifest.json").read_text())["counts"]
    # Per prompt at most 2 pairs of its parsed samples, each judged in both orders, every
    # verdict from the pool's judge parsed.
    pairs = sum(min(2, k * (k - 1) // 2) for k in parsed.values())
    assert pairs > 0 and counts["verdicts"] == 2 * pairs, (counts, parsed)
    assert counts.get("unparseable_verdicts", 0) == 0, counts
    resolved = (run_dir / "config.yaml").read_text()
    assert f"model: {judge_dir}" in resolved and "placement: separate" in resolved
