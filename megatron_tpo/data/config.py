"""The ``prompts`` and ``thought`` groups (``configs/prompts/``, ``configs/thought/``)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.loading import load_group_config

INSTRUCTION_FIELD = "{instruction}"


@dataclass(kw_only=True)
class PromptSetConfig:
    """The instruction set the iterations draw their prompts from (data/prompts.py)."""

    path: str = ""
    """A local .jsonl / .parquet / .arrow file, a directory written by save_to_disk, or a
    hub dataset name (when a hub is reachable)."""
    split: str = "train"
    """The split of a hub dataset or a saved DatasetDict (not read otherwise)."""
    field: str = "instruction"
    """The column holding the instruction."""
    min_tokens: int = 1
    """Shorter instructions (policy tokenizer, no special tokens) are dropped."""
    max_tokens: int = 1024
    """Longer instructions are dropped: they leave no room for thought+response."""
    prompts_per_iteration: int = 5000
    """Each iteration gets this many instructions never used before (the paper: 5000)."""
    seed: int = 0
    """The one shuffle the per-iteration slices are cut from."""

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("prompts.path is empty")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"prompts.min_tokens={self.min_tokens}, prompts.max_tokens="
                              f"{self.max_tokens}: need 0 <= min_tokens <= max_tokens")
        if self.prompts_per_iteration < 1:
            raise ConfigError(f"prompts.prompts_per_iteration={self.prompts_per_iteration}: "
                              "must be >= 1")


def load_prompt_set_config(name_or_path: Union[str, Path], **overrides) -> PromptSetConfig:
    """``configs/prompts/<name>.yaml`` or a YAML path, with ``overrides`` on top, validated."""
    return load_group_config(PromptSetConfig, "prompts", name_or_path, **overrides)


@dataclass(kw_only=True)
class ThoughtTemplate:
    """The thought prompt: how an instruction is rendered to ask the policy to think, then
    respond, and which marker separates the hidden thought from the response the judge and
    the user see (built-in ones and the loader: data/thought_templates.py)."""

    name: str = "generic"
    """The template's name in logs, reports and errors."""
    prompt: str = ""
    """The user turn; ``{instruction}`` is replaced by the instruction, nothing else is
    formatted, so braces in instructions or prompts are safe."""
    response_marker: Optional[str] = ""
    """The text after which the response starts; exactly one occurrence is required. None
    means no thought at all (the direct-response baseline): the whole output is the response."""
    thought_marker: Optional[str] = None
    """Text that opens the thought; stripped from the thought when present."""
    system_prompt: Optional[str] = None
    """Sent as the system turn instead of the user turn when set (the paper's "System"
    variant); the user turn then holds the bare instruction."""

    def validate(self) -> None:
        if self.response_marker == "":
            raise ConfigError(f"thought template {self.name!r}: response_marker is empty (null "
                              "asks for direct responses without a thought)")
        if self.system_prompt is None and INSTRUCTION_FIELD not in self.prompt:
            raise ConfigError(f"thought template {self.name!r}: prompt has no "
                              f"{INSTRUCTION_FIELD} placeholder")

    def user_message(self, instruction: str) -> str:
        if self.system_prompt is not None:
            return instruction
        return self.prompt.replace(INSTRUCTION_FIELD, instruction)
