"""The docs a user reads stand alone: on PyPI, on GitHub and in a checkout."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
# Markdown link targets: [text](target)
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_package_readme_links_work_on_pypi(package: Path) -> None:
    """A package README is its PyPI page: a repository-relative link breaks there."""
    text = (package / "README.md").read_text()
    relative = [
        target for target in LINK.findall(text) if not re.match(r"(https?://|#|mailto:)", target)
    ]
    assert relative == [], f"{package.name}/README.md has relative links: {relative}"


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_every_distribution_names_its_project_urls(package: Path) -> None:
    meta = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    urls = meta.get("urls", {})
    assert {"Homepage", "Repository", "Changelog"} <= set(urls), urls
    assert all(url.startswith("https://") for url in urls.values())


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_every_readme_says_how_to_install_it(package: Path) -> None:
    name = tomllib.loads((package / "pyproject.toml").read_text())["project"]["name"]
    assert f"pip install {name}" in (package / "README.md").read_text()


def _repository_texts() -> list[Path]:
    skip = {".git", ".venv", ".venvs", ".tools", "node_modules", "__pycache__"}
    found: list[Path] = []
    for path in ROOT.rglob("*"):
        if any(part in skip for part in path.relative_to(ROOT).parts):
            continue
        if path.is_file() and path.suffix in {".md", ".py", ".toml", ".sh", ".yml", ".yaml"}:
            found.append(path)
    return found


def test_no_document_points_outside_the_repository() -> None:
    """Design notes kept outside the repository are not something a user can open."""
    this = Path(__file__).resolve()
    offenders = [
        str(path.relative_to(ROOT))
        for path in _repository_texts()
        if path != this
        and re.search(r"\bDESIGN\.md\b|\bPILOT-IPC\.md\b|\.\./shared\b", path.read_text("utf-8"))
    ]
    assert offenders == []
