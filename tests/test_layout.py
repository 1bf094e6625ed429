"""The layout of DESIGN.md holds: imports point down the layers only, `piip.models` knows no Lightning or
Hydra, no task reads `trainer.datamodule`, files stay small and nothing but errors sits at the package root.

Read from the source text (the imports as written, also those inside functions), not from a running import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIIP = Path(__file__).resolve().parents[1] / "piip"

# lowest first; a module may import from its own layer and the layers below it
LAYERS = [
    "piip.errors",  # with the package itself (`piip/__init__.py`)
    "piip.models",
    "piip.evaluation",
    "piip.data",
    "piip.tasks",
    "piip.analysis",
    "piip.distributed",
    "piip.run",
    "piip.tools",
]
NOT_IN_MODELS = ("lightning", "pytorch_lightning", "hydra", "omegaconf")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PIIP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    if module == "piip":
        return 0
    for index, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return index
    return None


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in `source` (the text of `module`), relative imports resolved."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            if base == "piip":  # `from piip import run`: the names are modules
                found += [(node.lineno, f"piip.{alias.name}") for alias in node.names]
    return sorted(found)


SOURCES = sorted(PIIP.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PIIP.parent)))
def test_imports_point_down_the_layers(path):
    assert layer_of(module_name(path)) is not None, f"{path} belongs to no layer of {LAYERS}"
    upward = upward_imports(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not upward, f"{path.relative_to(PIIP.parent)} imports upward: {upward}"


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    own = layer_of(module)
    return [
        f"line {line}: {imported} ({LAYERS[layer_of(imported)]} is above {LAYERS[own]})"
        for line, imported in imported_modules(source, module, is_package)
        if imported.startswith("piip") and layer_of(imported) is not None and layer_of(imported) > own
    ]


def test_the_model_layer_needs_no_lightning_hydra_or_omegaconf():
    offending = [
        f"{path.relative_to(PIIP.parent)}:{line} {module}"
        for path in (PIIP / "models").rglob("*.py")
        for line, module in imported_modules(path.read_text(), module_name(path))
        if module.split(".")[0] in NOT_IN_MODELS
    ]
    assert not offending


def test_the_import_check_sees_upward_imports_written_every_way():
    """The check itself: function-level, package-name and relative imports upward are all found."""
    source = (
        "from piip.models.backbone import PIIPBackbone\n"
        "def f():\n    from piip.run.config import compose\n"
        "from piip import tasks\n"
        "from ...data import base\n"
    )
    found = upward_imports(source, "piip.models.heads.probe")
    assert [entry.split(":")[1].split()[0] for entry in found] == [
        "piip.run.config",
        "piip.tasks",
        "piip.data",
    ]
    assert upward_imports("import torch\nfrom piip.errors import ConfigError\n", "piip.models.probe") == []


def test_no_task_reads_the_trainers_data_module():
    """Tasks learn about their data through `TaskData` (attached by the run layer), never `.datamodule`."""
    readers = [
        f"{path.relative_to(PIIP.parent)}:{node.lineno}"
        for path in (PIIP / "tasks").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "datamodule"
    ]
    assert not readers


def test_files_stay_small_and_the_package_root_holds_only_errors():
    long_files = {
        str(path.relative_to(PIIP.parent)): n
        for path in SOURCES
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long_files
    assert sorted(p.name for p in PIIP.glob("*.py")) == ["__init__.py", "errors.py"]
