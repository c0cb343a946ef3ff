"""Every setting is documented where it is declared, and config/docs.py reads those docs."""

import typing
from dataclasses import dataclass, fields, is_dataclass

from megatron_tpo.config.docs import documented_settings, field_docs
from megatron_tpo.evaluation.suite import EvalSuiteConfig
from megatron_tpo.tiny.assets import TinyTaskConfig
from megatron_tpo.tpo_config import TPOConfig

# tpo-run's config, tpo-eval's and the tiny task's: every config class is reached from these.
ROOTS = (TPOConfig, EvalSuiteConfig, TinyTaskConfig)


def config_classes() -> list:
    """The roots and every dataclass their fields hold (inside Optional, List, Dict too)."""
    found, pending = [], list(ROOTS)
    while pending:
        cls = pending.pop()
        if cls in found:
            continue
        found.append(cls)
        for hint in typing.get_type_hints(cls).values():
            for inner in (hint, *typing.get_args(hint)):
                if is_dataclass(inner):
                    pending.append(inner)
    return found


def test_every_field_of_every_config_class_has_a_doc_under_it():
    undocumented = [f"{cls.__module__}.{cls.__name__}.{item.name}"
                    for cls in config_classes() for item in fields(cls)
                    if not field_docs(cls).get(item.name)]
    assert undocumented == [], "write a string literal under each of these fields"


def test_every_config_class_takes_keywords_only():
    positional = [f"{cls.__name__}.{item.name}" for cls in config_classes()
                  for item in fields(cls) if not item.kw_only]
    assert positional == [], "declare these classes @dataclass(kw_only=True)"


@dataclass(kw_only=True)
class _Example:
    documented: int = 1
    """Spread over
    two lines."""
    commented: int = 2  # a comment is not a doc
    bare: str = "x"
    inner: "_Inner" = None


@dataclass(kw_only=True)
class _Inner:
    depth: float = 0.5
    """How deep."""


def test_a_fields_doc_is_the_string_directly_under_it_on_one_line():
    assert field_docs(_Example) == {"documented": "Spread over two lines."}


def test_settings_are_listed_by_dotted_key_in_declaration_order_nested_ones_walked_into():
    assert list(documented_settings(_Example(inner=_Inner(depth=2.0)))) == [
        ("documented", 1, "Spread over two lines."), ("commented", 2, ""), ("bare", "x", ""),
        ("inner.depth", 2.0, "How deep.")]
    assert list(documented_settings(_Example()))[-1] == ("inner", None, "")
