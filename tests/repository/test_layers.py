"""No package of megatron_tpo imports from a layer above its own (docs/layers.md)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_tpo"


def declared_layers() -> dict:
    """``{package: layer}`` from the table in docs/layers.md."""
    layers = {}
    for line in (ROOT / "docs" / "layers.md").read_text().splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for name in re.findall(r"`([a-z_]+)`", row.group(2)):
                layers[name] = int(row.group(1))
    return layers


def package_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE).parts
    return relative[0][:-3] if len(relative) == 1 else relative[0]


def imported_packages(path: Path):
    """(line, package) for every megatron_tpo import in the file, lazy ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "megatron_tpo" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_every_package_has_a_layer():
    layers = declared_layers()
    packages = {package_of(path) for path in PACKAGE.rglob("*.py")} - {"__init__"}
    assert packages - set(layers) == set(), "add these to docs/layers.md"


def test_no_module_imports_from_a_layer_above_its_own():
    layers = declared_layers()
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = package_of(path)
        if source == "__init__":
            continue
        for line, target in imported_packages(path):
            if target in layers and layers[target] > layers[source]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({source}, layer "
                              f"{layers[source]}) imports {target} (layer {layers[target]})")
    assert upward == []
