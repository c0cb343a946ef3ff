"""Settings of the training checkpointer, and the error every integrity check raises."""

from dataclasses import dataclass

from megatron_tpo.config import ConfigError


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded as it is; the message names the file (and tensor)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """The trainer's dist checkpoints in the run directory."""

    keep_last: int = 2
    """Complete checkpoints kept after a save, the newest included; older ones are deleted."""

    def validate(self) -> None:
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last}: must be >= 1 "
                              "(the checkpoint just saved is always kept)")
