"""Thought prompts: the instruction wrapper that asks the policy to think, then respond.

A template knows how to render an instruction into the thought prompt and which marker
separates the hidden thought from the response the judge and the user see.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.loading import CONFIG_DIR, load_structured

INSTRUCTION_FIELD = "{instruction}"


@dataclass
class ThoughtTemplate:
    name: str = "generic"
    # The user turn; ``{instruction}`` is replaced by the instruction, nothing else is
    # formatted, so braces in instructions or prompts are safe.
    prompt: str = ""
    # The text after which the response starts; exactly one occurrence is required. None
    # means no thought at all (the direct-response baseline): the whole output is the response.
    response_marker: Optional[str] = ""
    # Text that opens the thought; stripped from the thought when present.
    thought_marker: Optional[str] = None
    # Sent as the system turn instead of the user turn when set (the paper's "System"
    # variant); the user turn then holds the bare instruction.
    system_prompt: Optional[str] = None

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


def _shipped(name: str) -> ThoughtTemplate:
    template = load_structured(ThoughtTemplate, CONFIG_DIR / "thought" / f"{name}.yaml")
    template.validate()
    return template


# The paper's prompts (generic: its Figure 2; specific: its arXiv version) and the
# direct-response baseline live in configs/thought/, which is also tpo-run's `thought` group.
GENERIC = _shipped("generic")
SPECIFIC = _shipped("specific")
DIRECT = _shipped("direct")
BUILTIN_TEMPLATES = {t.name: t for t in (GENERIC, SPECIFIC, DIRECT)}


def load_thought_template(name_or_path: Union[str, Path]) -> ThoughtTemplate:
    """A built-in template by name, ``configs/thought/<name>.yaml``, or a YAML path."""
    if str(name_or_path) in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[str(name_or_path)]
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "thought" / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in (CONFIG_DIR / "thought").glob("*.yaml"))
        raise ConfigError(f"thought template {name_or_path!r} not found (shipped in "
                          f"configs/thought: {', '.join(shipped)}; or a YAML path)")
    template = load_structured(ThoughtTemplate, path)
    template.validate()
    return template
