"""cli/engine.py: ``tpo-engine``'s role (``--serve policy|judge``) and the settings each
role must be started with, checked before any engine or process group exists: a pool
serves only a separate placement, with as many ranks as its bridge expects."""

import pytest

from megatron_tpo.cli.engine import check_judge_settings, check_settings, main, split_role
from megatron_tpo.config import ConfigError
from megatron_tpo.judge.config import JudgeConfig, PairwiseJudgeConfig
from megatron_tpo.rollout.config import BridgeConfig, RolloutConfig
from megatron_tpo.tpo_config import TPOConfig


def test_the_role_is_taken_out_of_the_overrides_in_either_spelling():
    assert split_role(["rollout=tiny", "run.seed=3"]) == ("policy", ["rollout=tiny", "run.seed=3"])
    assert split_role(["a=1", "--serve", "judge", "b=2"]) == ("judge", ["a=1", "b=2"])
    assert split_role(["--serve=judge", "a=1"]) == ("judge", ["a=1"])


@pytest.mark.parametrize("argv, named", [(["--serve", "critic"], "'critic'"),
                                         (["a=1", "--serve"], "''")])
def test_an_unknown_or_missing_role_is_refused_listing_the_roles(argv, named):
    with pytest.raises(ConfigError) as refused:
        split_role(argv)
    assert str(refused.value) == f"--serve {named}: must be one of ('policy', 'judge')"


def test_help_prints_the_usage_without_reading_a_config(capsys):
    assert main(["rollout=no_such_group", "--help"]) == 0
    assert "--serve judge" in capsys.readouterr().out


def test_a_policy_pool_is_started_with_the_ranks_its_bridge_expects():
    separate = RolloutConfig(placement="separate", bridge=BridgeConfig(engine_ranks=2))
    check_settings(separate, 2)
    with pytest.raises(ConfigError, match=r"^rollout.bridge.engine_ranks=2, but tpo-engine "
                                          r"was started with 3 ranks$"):
        check_settings(separate, 3)
    with pytest.raises(ConfigError, match=r"^rollout.placement='colocated': tpo-engine serves "
                                          r"only placement=separate"):
        check_settings(RolloutConfig(bridge=BridgeConfig(engine_ranks=2)), 2)


def _judged_by(judge: PairwiseJudgeConfig, kind: str = "pairwise") -> TPOConfig:
    return TPOConfig(judge=JudgeConfig(kind=kind, pairwise=judge))


def test_a_judge_pool_is_a_pairwise_judges_own_model_placed_apart_with_its_ranks():
    judge = PairwiseJudgeConfig(model="/models/judge", placement="separate",
                                bridge=BridgeConfig(port=29710, engine_ranks=2))
    check_judge_settings(_judged_by(judge), 2)
    with pytest.raises(ConfigError, match=r"^judge.pairwise.bridge.engine_ranks=2, but "
                                          r"tpo-engine --serve judge was started with 4 ranks$"):
        check_judge_settings(_judged_by(judge), 4)


@pytest.mark.parametrize("kind, judge, message", [
    ("format", PairwiseJudgeConfig(model="/models/judge", placement="separate"),
     "judge.kind='format', judge.pairwise.model=/models/judge: tpo-engine --serve judge "
     "serves a pairwise judge's own model only"),
    ("pairwise", PairwiseJudgeConfig(),   # the policy judging itself: no model of its own
     "judge.kind='pairwise', judge.pairwise.model=None: tpo-engine --serve judge serves a "
     "pairwise judge's own model only"),
    ("pairwise", PairwiseJudgeConfig(model="/models/judge"),
     "judge.pairwise.placement='colocated': tpo-engine --serve judge serves only "
     "placement=separate"),
])
def test_a_judge_pool_refuses_what_it_cannot_serve_naming_the_setting(kind, judge, message):
    with pytest.raises(ConfigError) as refused:
        check_judge_settings(_judged_by(judge, kind), 1)
    assert str(refused.value) == message


def test_a_judge_pool_on_the_policy_pools_port_is_refused():
    """Both pools may serve one trainer only on ports of their own."""
    config = _judged_by(PairwiseJudgeConfig(model="/models/judge", placement="separate",
                                            bridge=BridgeConfig(port=29700)))
    config.rollout = RolloutConfig(placement="separate", bridge=BridgeConfig(port=29700))
    with pytest.raises(ConfigError, match=r"judge.pairwise.bridge.port=29700"):
        check_judge_settings(config, 1)
