"""Every module of megatron_tpo/ is imported by a test file where the tests mirror the
package, directly or through its package's re-exported names, so a reader finds its test
and a bug in it fails beside it: a module of megatron_tpo/<package>/ (or of a package
inside it) by a file under tests/<package>/, a top-level module (megatron_tpo/<module>.py)
by any file under tests/. Other folders' tests and the shared helpers (tests/helpers/)
using a package's module do not count for it.

The scan is static (the AST of every file under tests/): a package's re-export is
followed through the ``from ... import`` lines of its ``__init__.py`` to the module that
defines the name, and only a name that cannot be followed so is looked up with importlib
(importing the packages would pull in torch: seconds)."""

import ast
import importlib
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, Optional, Set

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_tpo"
TESTS = ROOT / "tests"


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


def imports_of(path: Path) -> Set[str]:
    """The megatron_tpo modules one file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_tpo"):
            found.update(defining(node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
    return found - {None}


def imports_by_file(tests: Path = TESTS) -> Dict[Path, Set[str]]:
    """Each file under ``tests``, relative to it, with the modules it imports."""
    return {path.relative_to(tests): imports_of(path) for path in tests.rglob("*.py")}


def home_folder(module: str) -> Optional[str]:
    """The folder under tests/ whose files count for ``module``: its package's, the first
    one under megatron_tpo/ (megatron_tpo.plan.cost.tenants: plan); None for a top-level
    module, which any file counts for."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def belongs_in(module: str) -> str:
    """Where the test of ``module`` belongs: tests/plan/test_plan_cost_tenants.py."""
    parts = module.split(".")[1:]
    folder = home_folder(module)
    return f"tests/{folder}/test_{'_'.join(parts)}.py" if folder else f"tests/test_{parts[0]}.py"


def untested(modules: Iterable[str], imports: Dict[Path, Set[str]]) -> Dict[str, str]:
    """Each of ``modules`` that no file counting for it imports, with where its test
    belongs."""
    counted = {module for path, imported in imports.items() for module in imported
               if home_folder(module) in (None, path.parts[0])}
    return {module: belongs_in(module) for module in sorted(set(modules) - counted)}


def test_every_module_is_imported_by_a_test_in_its_packages_folder():
    missing = untested(MODULES, imports_by_file())
    assert not missing, (
        f"{len(missing)} modules of megatron_tpo/ no test file of their package's folder "
        "imports (tests in other folders and tests/helpers/ do not count); add or move "
        "their tests there:\n  " + "\n  ".join(f"{module}: {where}"
                                               for module, where in missing.items()))


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


def test_only_a_test_in_the_packages_folder_counts_for_its_modules(tmp_path):
    """The rule itself, on a tests/ tree of its own: a package's module imported from
    another package's folder, a top-level test or a helper is reported, with the folder
    its test belongs in; a top-level module counts from any file."""
    files = {
        "judge/test_judge_pool.py": "from megatron_tpo.cli.engine import main\n",
        "cli/test_cli_run.py": "import megatron_tpo.cli.run\n",
        "helpers/judge_fixtures.py": "from megatron_tpo.judge import Judge\n",
        "test_recipe_fit.py": "from megatron_tpo.plan.cost import tenants\n",
        "plan/report/test_plan_report_x.py": "from megatron_tpo.plan.cost.memory import "
                                            "training_memory\n",
        "helpers/tpo_fixtures.py": "from megatron_tpo.lifetime import die_with_parent\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    imports = imports_by_file(tmp_path)
    assert imports[Path("helpers/judge_fixtures.py")] == {"megatron_tpo.judge.base"}
    modules = ["megatron_tpo.cli.engine", "megatron_tpo.cli.run", "megatron_tpo.judge.base",
               "megatron_tpo.plan.cost.tenants", "megatron_tpo.plan.cost.memory",
               "megatron_tpo.lifetime", "megatron_tpo.loop"]
    assert untested(modules, imports) == {
        "megatron_tpo.cli.engine": "tests/cli/test_cli_engine.py",
        "megatron_tpo.judge.base": "tests/judge/test_judge_base.py",
        "megatron_tpo.loop": "tests/test_loop.py",
        "megatron_tpo.plan.cost.tenants": "tests/plan/test_plan_cost_tenants.py",
    }
