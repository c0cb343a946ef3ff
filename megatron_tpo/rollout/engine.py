"""The rollout seam: every generation backend (vLLM on GPUs, HF on CPU) looks like this."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch


@dataclass
class SamplingParams:
    """How to sample; the defaults are the paper's (K=8, temperature 0.8, top-p 0.95)."""

    n: int = 8
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 2048
    seed: Optional[int] = None

    def validate(self) -> None:
        from megatron_tpo.config.errors import ConfigError

        if self.n < 1:
            raise ConfigError(f"sampling.n={self.n}: must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens={self.max_new_tokens}: must be >= 1")


@dataclass
class GenerationOutput:
    """The ``n`` completions of one prompt, decoded without special tokens."""

    prompt: str
    texts: List[str]
    num_tokens: List[int]


class RolloutEngine(ABC):
    @abstractmethod
    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> List[GenerationOutput]:
        """``sampling.n`` completions of every (already chat-formatted) prompt, in order."""

    @abstractmethod
    def update_weights(self, stream: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's weights, given as ``(hf_name, tensor)`` pairs."""

    def sleep(self) -> None:
        """Release accelerator memory for training; a no-op where there is none to free."""

    def wake(self) -> None:
        """Undo ``sleep`` before the next ``generate``."""
