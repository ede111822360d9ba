"""Every distribution declares what its source imports, and imports what it declares.

Each ``packages/*/src`` tree is parsed (``ast``, nothing is imported); every
absolute import is mapped to the distribution that ships the module (by the
installed distributions' file lists, so namespace packages such as
``langgraph.checkpoint`` resolve to the right one), and compared with the
``dependencies`` (and optional extras) of that package's ``pyproject.toml``.
A module that works only because another dependency happens to pull its
distribution in is a bug: installed alone from PyPI it fails.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p.parent for p in (ROOT / "packages").glob("*/pyproject.toml"))

# Declared on purpose although no module imports them by name (reason each).
DECLARED_NOT_IMPORTED: dict[str, set[str]] = {}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match is not None, requirement
    return _canonical(match[1])


def _project(package: Path) -> dict[str, object]:
    return tomllib.loads((package / "pyproject.toml").read_text())["project"]


@cache
def _workspace_modules() -> dict[str, str]:
    """Top-level import name -> distribution, for the workspace's own packages."""
    found: dict[str, str] = {}
    for package in PACKAGES:
        name = _canonical(str(_project(package)["name"]))
        for child in (package / "src").iterdir():
            if (child / "__init__.py").exists():
                found[child.name] = name
    return found


@cache
def _installed_modules() -> dict[str, set[str]]:
    """Dotted module name -> distributions whose files provide it."""
    modules: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        name = _canonical(dist.metadata["Name"])
        for file in dist.files or ():
            parts = file.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or ".." in parts:
                continue
            if file.suffix not in (".py", ".so", ".pyd") and file.name != "py.typed":
                continue
            dotted = [*parts[:-1]]
            stem = file.name.split(".")[0]
            if stem not in ("__init__", "py"):
                dotted.append(stem)
            for depth in range(1, len(dotted) + 1):
                modules.setdefault(".".join(dotted[:depth]), set()).add(name)
    return modules


def _distributions_of(module: str) -> set[str]:
    top = module.split(".")[0]
    if top in _workspace_modules():
        return {_workspace_modules()[top]}
    installed = _installed_modules()
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):
        owners = installed.get(".".join(parts[:depth]))
        if owners and (len(owners) == 1 or depth == len(parts)):
            return owners
    return set()


def _imports(source_root: Path) -> dict[str, set[str]]:
    """Absolute imports (full dotted names, with ``from x import y`` as ``x.y``) -> files."""
    found: dict[str, set[str]] = {}
    for path in sorted(source_root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _owners(dotted: str) -> set[str]:
    # ``from pkg import name``: name may be a submodule (its own distribution for a
    # namespace package) or an attribute of ``pkg``.
    owners = _distributions_of(dotted)
    if not owners and "." in dotted:
        owners = _distributions_of(dotted.rsplit(".", 1)[0])
    return owners


@pytest.mark.parametrize("package", PACKAGES, ids=[p.name for p in PACKAGES])
def test_imports_match_declared_dependencies(package: Path) -> None:
    project = _project(package)
    own = _canonical(str(project["name"]))
    required = {_requirement_name(r) for r in project.get("dependencies", [])}  # type: ignore[union-attr]
    extras = {
        _requirement_name(r)
        for group in dict(project.get("optional-dependencies", {})).values()  # type: ignore[arg-type]
        for r in group
    }
    undeclared: dict[str, set[str]] = {}
    used: set[str] = set()
    unknown: dict[str, set[str]] = {}
    for dotted, files in _imports(package / "src").items():
        top = dotted.split(".")[0]
        if top == "__future__" or top in sys.stdlib_module_names:
            continue
        owners = _owners(dotted)
        if not owners:
            unknown[dotted] = files
            continue
        if own in owners:
            continue
        satisfied = owners & (required | extras)
        if satisfied:
            used |= satisfied
        else:
            undeclared.setdefault(" or ".join(sorted(owners)), set()).update(files)
    assert not unknown, f"imports no installed distribution provides: {unknown}"
    assert not undeclared, (
        f"{own} imports distributions its pyproject does not declare: {undeclared}"
    )
    unused = required - used - DECLARED_NOT_IMPORTED.get(own, set())
    assert not unused, f"{own} declares dependencies none of its modules imports: {unused}"


def test_the_checker_sees_namespace_packages_and_workspace_packages() -> None:
    # The checker itself: a namespace package resolves to the distribution of the
    # submodule, and a workspace package to its own distribution.
    assert _owners("langgraph.checkpoint.base.BaseCheckpointSaver") == {"langgraph-checkpoint"}
    assert _owners("pilot_rpc.PilotClient") == {"pilot-rpc"}
    assert "pilot-rpc" in {
        owner
        for dotted in _imports(ROOT / "packages" / "pilot-checkpoint-sqlite" / "src")
        for owner in _owners(dotted)
    }
