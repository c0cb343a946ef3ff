"""What each setting means, read from where it is declared: the string literal directly
under a config dataclass's field (docs/configuration.md).

Python keeps no such string at run time, so the class's source is parsed with ``ast``,
once per class. ``tpo-run --show-config`` prints every setting with its doc from here.
"""

import ast
import inspect
import textwrap
from dataclasses import fields, is_dataclass
from functools import lru_cache
from typing import Any, Dict, Iterator, Tuple


@lru_cache(maxsize=None)
def field_docs(cls: type) -> Dict[str, str]:
    """``{field name: its doc}`` for the fields of ``cls`` (and of its dataclass bases)
    that have a string literal directly under their declaration, on one line."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def documented_settings(config: Any, prefix: str = "") -> Iterator[Tuple[str, Any, str]]:
    """``(dotted key, value, doc)`` for every leaf setting of the dataclass ``config``, in
    declaration order; a field holding a dataclass is walked into, not listed itself."""
    docs = field_docs(type(config))
    for field in fields(config):
        value = getattr(config, field.name)
        key = f"{prefix}{field.name}"
        if is_dataclass(value):
            yield from documented_settings(value, f"{key}.")
        else:
            yield key, value, docs.get(field.name, "")
