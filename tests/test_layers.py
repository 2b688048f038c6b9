"""The package layers (docs/ARCHITECTURE.md) hold: import-linter checks the import contracts in
pyproject.toml, and two source checks keep what it cannot see honest: no project import tucked inside a
function (where it would hide a cycle from the module graph), and no private name of one module used
by another."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("rlmem", "agents", "envs", "kernels")


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_project(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in PACKAGES


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    if not lint_imports.exists():
        pytest.skip("import-linter is not installed (pip install -e .[dev])")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_no_project_import_inside_a_function():
    found = []
    for path in sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                imports_project = (
                    isinstance(node, ast.Import) and any(is_project(a.name) for a in node.names)
                ) or (isinstance(node, ast.ImportFrom) and (node.level > 0 or is_project(node.module)))
                if imports_project:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, "project imports inside functions:\n" + "\n".join(found)


def test_no_private_name_of_another_module():
    found = []
    for path in sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        this = module_name(path)
        imported_modules: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and is_project(node.module) and node.module != this:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{alias.name}")
                    else:
                        imported_modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if is_project(alias.name):
                        imported_modules.add(alias.asname or alias.name.split(".")[0])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, (ast.Name, ast.Attribute))):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in imported_modules:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} uses {ast.unparse(node)}")
    assert not found, "private names used across modules:\n" + "\n".join(found)
