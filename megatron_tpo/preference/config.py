"""The ``preference`` group: what becomes of the samples the judge never sees."""

from dataclasses import dataclass

from megatron_tpo.config.errors import ConfigError

INVALID_SAMPLE_POLICIES = ("drop", "reject")


@dataclass(kw_only=True)
class PreferenceConfig:
    parse_failures: str = "drop"
    """What becomes of an output that does not follow the thought template: ``drop``, or
    ``reject``: used as the rejected sample of its prompt (the paper does the latter)."""
    truncated: str = "drop"
    """Outputs cut at max_new_tokens are never chosen: ``drop`` them, or ``reject``: use
    them as rejected."""

    def validate(self) -> None:
        for name in ("parse_failures", "truncated"):
            if getattr(self, name) not in INVALID_SAMPLE_POLICIES:
                raise ConfigError(f"preference.{name}={getattr(self, name)!r}: must be one of "
                                  f"{INVALID_SAMPLE_POLICIES}")
