"""overrides.py on a real composed config: as_override writes what tpo-run's command line
reads back to the same config with_settings builds; with_settings leaves its input alone
and runs the changed groups' checks."""

import pytest

from megatron_tpo.cli.run import compose_config
from megatron_tpo.config import ConfigError
from megatron_tpo.overrides import as_override, with_settings
from megatron_tpo.tpo_config import TPOConfig

SETTINGS = [("parallel.tensor_model_parallel_size", 2),
            ("parallel.virtual_pipeline_model_parallel_size", None),
            ("parallel.sequence_parallel", True),
            ("train.micro_batch_pairs", 2),
            ("train.recompute_granularity", "selective"),
            ("train.fp8.enabled", False)]


@pytest.fixture(scope="module")
def composed():
    return compose_config(["experiment=tiny_cpu"])


@pytest.mark.parametrize("value, text", [(None, "null"), (True, "true"), (False, "false"),
                                         (4, "4"), (0.5, "0.5"), ("selective", "selective")])
def test_as_override_writes_the_command_line_form(value, text):
    assert as_override("train.x", value) == f"train.x={text}"


def test_with_settings_equals_composing_with_the_written_overrides(composed):
    changed = with_settings(composed, SETTINGS)
    assert isinstance(changed, TPOConfig)
    assert (changed.parallel.tensor_model_parallel_size, changed.parallel.sequence_parallel,
            changed.train.micro_batch_pairs, changed.train.recompute_granularity) == \
        (2, True, 2, "selective")
    written = [as_override(key, value) for key, value in SETTINGS]
    assert compose_config(["experiment=tiny_cpu", *written]) == changed


def test_with_settings_leaves_its_input_and_every_other_setting_alone(composed):
    before = compose_config(["experiment=tiny_cpu"])
    changed = with_settings(composed, [("train.lr", 0.25)])
    assert composed == before
    assert changed.train.lr == 0.25 and composed.train.lr != 0.25
    changed.train.lr = composed.train.lr
    assert changed == composed


def test_with_settings_runs_the_checks_of_the_groups_it_changes(composed):
    with pytest.raises(ConfigError, match=r"train\.lr=-1"):
        with_settings(composed, [("train.lr", -1.0)])
    with pytest.raises(ConfigError, match="judge.length_control.rho=-0.1"):
        with_settings(composed, [("judge.length_control.rho", -0.1)])
