"""The ``evaluation`` group: the loop's held-out score of every iteration's policy."""

from dataclasses import dataclass

from megatron_tpo.config.errors import ConfigError


@dataclass(kw_only=True)
class EvaluationConfig:
    """Held-out instructions the policy answers greedily before every iteration and after
    the last: the run's judged score of M_t and its win rate against M_0."""

    path: str = ""
    """A prompt file as in the ``prompts`` group (.jsonl/.parquet/.arrow or a saved dataset)."""
    field: str = "instruction"
    """The column holding the instruction."""
    num_prompts: int = 64
    """The first this many (after dropping empty and repeated ones); 0 turns evaluation off."""
    failure_score: float = 0.0
    """The score of a held-out output that does not parse (it is never shown to the judge)."""

    def validate(self) -> None:
        if self.num_prompts < 0:
            raise ConfigError(f"evaluation.num_prompts={self.num_prompts}: must be >= 0")
        if self.num_prompts and not self.path:
            raise ConfigError("evaluation.path is empty (set evaluation.num_prompts=0 to run "
                              "without a held-out evaluation)")
