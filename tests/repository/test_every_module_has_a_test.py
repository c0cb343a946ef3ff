"""Every module of megatron_tpo/ is imported by some test file, directly or through its
package's re-exported names, so a reader finds its test and a bug in it fails beside it.

The scan is static (the AST of every file under tests/): a package's re-export is
followed through the ``from ... import`` lines of its ``__init__.py`` to the module that
defines the name, and only a name that cannot be followed so is looked up with importlib
(importing the packages would pull in torch: seconds)."""

import ast
import importlib
from functools import lru_cache
from pathlib import Path
from typing import Optional, Set

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_tpo"


def _dotted(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


MODULES = {_dotted(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
PACKAGES = {_dotted(p.parent / "x")[:-2] for p in PACKAGE.rglob("__init__.py")}


@lru_cache(maxsize=None)
def _tree(dotted: str) -> ast.Module:
    parts = dotted.split(".")
    path = ROOT.joinpath(*parts, "__init__.py") if dotted in PACKAGES else \
        ROOT.joinpath(*parts).with_suffix(".py")
    return ast.parse(path.read_text())


def _absolute(node: ast.ImportFrom, importer: str) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")[:len(importer.split(".")) - node.level + (importer in PACKAGES)]
    return ".".join(base + ([node.module] if node.module else []))


def _followed(package: str, name: str) -> Optional[str]:
    """The module a package's ``__init__`` takes ``name`` from, followed to its definition."""
    for node in _tree(package).body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return defining(_absolute(node, package), alias.name)
    return None


def _by_importlib(package: str, name: str) -> Optional[str]:
    try:
        found = getattr(importlib.import_module(package), name)
    except Exception:
        return None
    module = getattr(found, "__module__", None) or getattr(found, "__name__", None)
    return module if module in MODULES else None


def defining(module: str, name: str) -> Optional[str]:
    """The megatron_tpo module that ``from module import name`` reaches, if any."""
    if f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    if module in MODULES:
        return module
    if module in PACKAGES:
        return _followed(module, name) or _by_importlib(module, name)
    return None


def imported_by_tests() -> Set[str]:
    found = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_tpo"):
                found.update(defining(node.module, alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in MODULES)
    return found - {None}


def test_every_module_is_imported_by_a_test():
    untested = sorted(MODULES - imported_by_tests())
    assert not untested, (f"{len(untested)} modules of megatron_tpo/ no test file imports "
                          "(add tests/<package>/test_<package>_<module>.py):\n  "
                          + "\n  ".join(untested))


def test_the_scan_follows_re_exports_to_the_defining_module():
    """The scan itself: a package's name is credited to the module that defines it."""
    assert "megatron_tpo.lifetime" in MODULES and "megatron_tpo.plan.report" in PACKAGES
    assert defining("megatron_tpo.preference", "judge_rollouts") == \
        "megatron_tpo.preference.judging"
    assert defining("megatron_tpo.config", "ConfigError") == "megatron_tpo.config.errors"
    assert defining("megatron_tpo.model", "llama_layout") == "megatron_tpo.model.llama_layout"
    assert defining("megatron_tpo.plan.report.emit", "emit_plan") == \
        "megatron_tpo.plan.report.emit"
    assert defining("megatron_tpo.config", "no_such_name") is None
