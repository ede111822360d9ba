"""Plugins: entry-point discovery, module:attribute loading, options."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from pilot_worker import (
    Plugin,
    PluginContext,
    PluginError,
    PluginNotFoundError,
    PluginOption,
    WorkerServer,
    discover_plugins,
    load_plugin,
)
from pilot_worker._plugins import option_key

PLUGIN_MODULE = """
from pilot_worker import Plugin, PluginOption, pilot_handler

@pilot_handler("greet")
def greet(payload):
    return f"hello {payload}"

def setup(ctx):
    ctx.worker.register(greet)
    ctx.logger.info("greeting with %s", ctx.options["greeting"])

plugin = Plugin(
    name="greeter",
    description="Says hello.",
    options=[PluginOption(flag="--greeting", help="what to say", default="hi", env="GREETING")],
    setup=setup,
)

def broken():
    raise RuntimeError("cannot build")
"""


@pytest.fixture
def installed_plugin(tmp_path: Path) -> Iterator[str]:
    """A fake installed distribution publishing two entry points (one broken)."""
    module = f"greeter_plugin_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text(PLUGIN_MODULE)
    dist = tmp_path / "greeter_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: greeter-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            f"""
            [pilot_worker.plugins]
            greeter = {module}:plugin
            broken = {module}:broken
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield module
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module, None)


def test_option_validation_and_keys() -> None:
    assert option_key("--checkpoint-db") == "checkpoint_db"
    assert PluginOption(flag="--checkpoint-db", help="x").key == "checkpoint_db"
    with pytest.raises(PluginError):
        PluginOption(flag="checkpoint-db", help="x")
    with pytest.raises(PluginError):
        PluginOption(flag="--Bad_Flag", help="x")
    with pytest.raises(PluginError, match="declared twice"):
        Plugin(
            name="p",
            options=[PluginOption(flag="--a", help=""), PluginOption(flag="--a", help="")],
            setup=lambda ctx: None,
        )
    with pytest.raises(PluginError):
        Plugin(name="", setup=lambda ctx: None)


def test_discover_and_load(installed_plugin: str) -> None:
    found = discover_plugins()
    assert isinstance(found["greeter"], Plugin)
    assert isinstance(found["broken"], PluginError)
    plugin = load_plugin("greeter")
    assert plugin.name == "greeter"
    assert [o.flag for o in plugin.options] == ["--greeting"]
    with pytest.raises(PluginError, match="cannot build"):
        load_plugin("broken")
    with pytest.raises(PluginNotFoundError, match=r"no plugin named 'nope'.*greeter"):
        load_plugin("nope")


def test_load_by_module_attribute(installed_plugin: str) -> None:
    assert load_plugin(f"{installed_plugin}:plugin").name == "greeter"
    with pytest.raises(PluginError, match="has no attribute"):
        load_plugin(f"{installed_plugin}:missing")
    with pytest.raises(PluginError, match="cannot import"):
        load_plugin("no_such_module_xyz:plugin")
    with pytest.raises(PluginError, match=r"not a pilot_worker\.Plugin"):
        load_plugin(f"{installed_plugin}:PluginOption")


def test_setup_registers_handlers(installed_plugin: str) -> None:
    plugin = load_plugin("greeter")
    worker = WorkerServer(None)
    plugin.setup(PluginContext(worker=worker, options={"greeting": "hey"}))
    assert "greet" in worker.handlers
