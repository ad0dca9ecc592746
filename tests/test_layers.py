"""The package's layers are a contract: imports point down only (pyproject.toml, [tool.importlinter]) and no
module imports itself through others. A change that imports upward or closes a circle fails here."""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE = REPOSITORY / "spearfl"


def layer_names() -> set[str]:
    contracts = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(contract["layers"] for contract in contracts if contract["type"] == "layers")
    return {name.strip() for layer in layers for name in layer.split("|")}


def test_the_import_contracts_hold():
    assert lint_imports(config_filename=str(REPOSITORY / "pyproject.toml"), no_cache=True) == 0


def test_every_top_level_module_sits_in_a_layer():
    top_level = {f"spearfl.{path.stem}" for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    top_level |= {f"spearfl.{path.parent.name}" for path in PACKAGE.glob("*/__init__.py")}
    assert top_level == layer_names()


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("spearfl")
    circles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if graph.chain_exists(importer=imported, imported=module):
                circles.append((module, imported))
    assert circles == []
