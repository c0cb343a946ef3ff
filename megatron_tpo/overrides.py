"""Single settings of a run as ``tpo-run``'s command line writes them, and a config with
some of them changed: what the dry run proposes as a fix and tpo-plan emits as a layout."""

from typing import Sequence, Tuple

from omegaconf import OmegaConf

from megatron_tpo.tpo_config import TPOConfig


def as_override(key: str, value) -> str:
    """``key=value`` as tpo-run's command line takes it (``null``, ``true``, ``false``)."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    return f"{key}={text}"


def with_settings(config: TPOConfig, settings: Sequence[Tuple[str, object]]) -> TPOConfig:
    """``config`` with each dotted ``key`` set to its ``value``, its groups' checks run."""
    tree = OmegaConf.structured(config)
    for key, value in settings:
        OmegaConf.update(tree, key, value, merge=False)
    changed = OmegaConf.to_object(tree)
    changed.judge.validate()
    changed.rollout.validate()
    changed.train.validate()
    return changed
