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
    # The text after which the response starts; exactly one occurrence is required.
    response_marker: str = ""
    # Text that opens the thought; stripped from the thought when present.
    thought_marker: Optional[str] = None
    # Sent as the system turn instead of the user turn when set (the paper's "System"
    # variant); the user turn then holds the bare instruction.
    system_prompt: Optional[str] = None

    def validate(self) -> None:
        if not self.response_marker:
            raise ConfigError(f"thought template {self.name!r}: response_marker is empty")
        if self.system_prompt is None and INSTRUCTION_FIELD not in self.prompt:
            raise ConfigError(f"thought template {self.name!r}: prompt has no "
                              f"{INSTRUCTION_FIELD} placeholder")

    def user_message(self, instruction: str) -> str:
        if self.system_prompt is not None:
            return instruction
        return self.prompt.replace(INSTRUCTION_FIELD, instruction)


# Wording of Figure 2 of Wu et al. 2024 ("Thinking LLMs"), the generic thought prompt.
GENERIC = ThoughtTemplate(
    name="generic",
    prompt=('Respond to the following user query in a comprehensive and detailed way. You can '
            'write down your thought process before responding. Write your thoughts after '
            '"Here is my thought process:" and write your response after "Here is my '
            'response:".\n\nUser query: {instruction}'),
    thought_marker="Here is my thought process:",
    response_marker="Here is my response:",
)

# The "specific" prompt of the paper's arXiv version: a draft and its evaluation in the
# thought, the final response after <R>.
SPECIFIC = ThoughtTemplate(
    name="specific",
    prompt=('Respond to the following user query in a comprehensive and detailed way. But '
            'first write down your internal thoughts. This must include your draft response '
            'and its evaluation. After this, write your final response after "<R>".\n\n'
            'User query: {instruction}'),
    response_marker="<R>",
)

BUILTIN_TEMPLATES = {t.name: t for t in (GENERIC, SPECIFIC)}


def load_thought_template(name_or_path: Union[str, Path]) -> ThoughtTemplate:
    """A built-in template by name, ``configs/thought/<name>.yaml``, or a YAML path."""
    if str(name_or_path) in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[str(name_or_path)]
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "thought" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"thought template {name_or_path!r} not found (built-in: "
                          f"{', '.join(BUILTIN_TEMPLATES)}; or a YAML path)")
    template = load_structured(ThoughtTemplate, path)
    template.validate()
    return template
