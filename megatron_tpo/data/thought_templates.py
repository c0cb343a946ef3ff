"""The shipped thought templates (``ThoughtTemplate``, data/config.py) and the loader of
a template by name or YAML path."""

from pathlib import Path
from typing import Union

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.loading import CONFIG_DIR, load_structured
from megatron_tpo.data.config import ThoughtTemplate


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
