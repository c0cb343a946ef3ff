"""A pairwise judge with a model of its own: where it runs (judge.pairwise.placement).

vLLM's sleep-mode allocator is one per process and a second engine's start-up checks free
memory against the first's, so with rollout.engine=vllm the judge model is refused
beside the policy's engine and must be a tpo-engine pool of its own (``--serve judge``).
"""

import sys
from pathlib import Path

import pytest

from megatron_tpo.config import ConfigError
from megatron_tpo.judge.config import (JudgeConfig, PairwiseJudgeConfig,
                                       check_judge_placement)
from megatron_tpo.rollout.config import BridgeConfig, RolloutConfig, VLLMConfig

sys.path.insert(0, str(Path(__file__).parent))
from tpo_fixtures import tiny_run_overrides  # noqa: E402


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
