"""The rollout seam: every generation backend (vLLM on GPUs, HF on CPU) looks like this."""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

FINISH_REASONS = ("stop", "length")


def tensor_checksum(tensor: torch.Tensor, chunk: int = 1 << 22) -> Tuple[float, float]:
    """``(sum, sum of squares)`` in float64: cheap, and changed by any corruption that
    matters. Converted a slice at a time, so a large tensor needs no float64 copy."""
    flat = tensor.detach().reshape(-1)
    total = torch.zeros(2, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), chunk):
        values = flat[start:start + chunk].double()
        total += torch.stack([values.sum(), (values * values).sum()])
    return float(total[0]), float(total[1])


@dataclass(kw_only=True)
class SamplingParams:
    """How to sample; the defaults are the paper's (K=8, temperature 0.8, top-p 0.95)."""

    n: int = 8
    """Samples per prompt (the paper's K)."""
    temperature: float = 0.8
    """0 samples greedily."""
    top_p: float = 0.95
    """Nucleus sampling: the smallest set of tokens with this much probability."""
    max_new_tokens: int = 2048
    """Tokens a sample may add after its prompt (thought and response together)."""
    seed: Optional[int] = None
    """Seeds the draws; null: unseeded."""
    stop: List[str] = field(default_factory=list)
    """Strings that end a sample as EOS does; neither the stop string nor the stop (or
    EOS) token is part of the returned text and token ids."""
    stop_token_ids: List[int] = field(default_factory=list)
    """Token ids that end a sample as EOS does (not returned either)."""
    logprobs: bool = False
    """Return the sampled tokens' log-probs under the raw model distribution (before
    temperature and top-p), as vLLM's default ``raw_logprobs``."""

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
        if any(not text for text in self.stop):
            raise ConfigError(f"sampling.stop={list(self.stop)!r}: stop strings must be non-empty")
        if any(token < 0 for token in self.stop_token_ids):
            raise ConfigError(f"sampling.stop_token_ids={list(self.stop_token_ids)!r}: "
                              "token ids must be >= 0")


@dataclass
class GenerationOutput:
    """The ``n`` completions of one prompt.

    Per sample ``k``: ``token_ids[k]`` are the sampled completion ids, cut before the
    first EOS, stop token or stop string (none of which is included); ``texts[k]`` is
    exactly ``tokenizer.decode(token_ids[k], skip_special_tokens=True)``;
    ``num_tokens[k] == len(token_ids[k])``; ``finish_reasons[k]`` is ``"stop"`` (EOS, a
    stop token or a stop string) or ``"length"`` (``max_new_tokens`` reached); and, when
    asked for, ``logprobs[k][i]`` is the log-prob of ``token_ids[k][i]``. DPO trains on
    these ids: re-tokenizing the text can give other tokens than the ones sampled.
    """

    prompt: str
    texts: List[str]
    num_tokens: List[int]
    prompt_token_ids: List[int] = field(default_factory=list)
    token_ids: List[List[int]] = field(default_factory=list)
    finish_reasons: List[str] = field(default_factory=list)
    logprobs: Optional[List[List[float]]] = None


class RolloutEngine(ABC):
    # Which trainer weights the engine holds: 0 as built, then bumped by every sync.
    weight_version: int = 0

    @abstractmethod
    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> List[GenerationOutput]:
        """``sampling.n`` completions of every (already chat-formatted) prompt, in order."""

    @abstractmethod
    def update_weights(self, stream: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's weights, given as ``(hf_name, tensor)`` pairs.

        The tensors may be views of a reused buffer: copy them, keep no reference.
        """

    def score(self, token_ids: Sequence[Sequence[int]]) -> List[List[float]]:
        """Per-token log-probs of each sequence: entry ``i`` is log p(ids[i+1] | ids[:i+1]),
        so ``len(ids) - 1`` values per sequence (the post-sync parity check uses it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot score token sequences")

    def score_each_replica(self, token_ids: Sequence[Sequence[int]]) -> List[List[List[float]]]:
        """``score`` of every sequence by every engine replica behind this one: one here; a
        separate pool's proxy fronts several, and the parity check must cover each."""
        return [self.score(token_ids)]

    def weight_checksums(self, names: Sequence[str]) -> Dict[str, Tuple[float, float]]:
        """``(sum, sum of squares)`` in float64 of each named weight the engine holds, in
        HF naming; a failed parity check uses them to name the tensor that differs."""
        raise NotImplementedError(f"{type(self).__name__} cannot report weight checksums")

    def set_weight_version(self, version: int) -> None:
        if version <= self.weight_version:
            raise ValueError(f"weight version {version} is not newer than the engine's "
                             f"{self.weight_version}")
        self.weight_version = version

    # The memory hooks below are called by the run's placement (``placement.Placement``)
    # as the loop enters its phases, and by nothing else in a run.
    def sleep(self, keep_weights: bool = False) -> None:
        """Release accelerator memory for other tenants; a no-op where there is none to
        free. ``keep_weights``: the next wake must find the weights (no sync comes first)."""

    def wake_weights(self) -> None:
        """Make the weights resident for a weight sync, without the KV cache; by default the
        same as ``wake``."""
        self.wake()

    def wake(self) -> None:
        """Undo ``sleep`` before the next ``generate``."""

    def close(self) -> None:
        """Release the engine while the process group it may share still exists (tpo-run
        calls it before tearing the world down); a no-op where nothing needs it."""
