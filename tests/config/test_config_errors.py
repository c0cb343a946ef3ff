"""config/errors.py: the one error a setting that cannot work raises, whichever layer
checks it; callers that guard against bad values (``except ValueError``) catch it too."""

import pytest

from megatron_tpo import config
from megatron_tpo.config import errors
from megatron_tpo.config.model import ModelConfig


def test_a_config_error_is_a_value_error():
    assert issubclass(errors.ConfigError, ValueError)
    with pytest.raises(ValueError, match=r"model.hidden_size=30 is not divisible"):
        ModelConfig(hidden_size=30, num_attention_heads=4).validate()


def test_the_package_raises_and_exports_the_same_class():
    """A validator that imports the module and a CLI that catches the package's name must
    meet: two classes of one name would let the error through as a crash."""
    assert config.ConfigError is errors.ConfigError
    with pytest.raises(config.ConfigError):
        ModelConfig(num_query_groups=3).validate()
