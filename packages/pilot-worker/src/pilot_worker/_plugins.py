"""Plugins: installed distributions that add handlers to a worker.

A distribution publishes a :class:`Plugin` object in the entry-point group
``pilot_worker.plugins``::

    [project.entry-points."pilot_worker.plugins"]
    checkpoint-sqlite = "pilot_checkpoint_sqlite.worker:plugin"

The CLI adds each selected plugin's :class:`PluginOption` flags to its parser,
resolves values (command line, then the option's environment variable, then its
default) and calls ``plugin.setup(PluginContext(...))`` before serving. Nothing
is global: a plugin receives everything through its context.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pilot_worker._env import PLUGIN_ENTRY_POINT_GROUP
from pilot_worker.errors import PluginError, PluginNotFoundError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pilot_worker._server import WorkerServer

__all__ = [
    "Plugin",
    "PluginContext",
    "PluginOption",
    "discover_plugins",
    "load_plugin",
    "option_key",
]

_FLAG_RE = re.compile(r"^--[a-z0-9][a-z0-9-]*$")


def option_key(flag: str) -> str:
    """``"--checkpoint-db"`` -> ``"checkpoint_db"`` (the key in ``PluginContext.options``)."""
    return flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True, kw_only=True)
class PluginOption:
    """A command-line option a plugin adds to ``pilot-worker``.

    Attributes:
        flag: Long flag, e.g. ``"--checkpoint-db"``.
        help: Help text shown by ``--help`` and ``--list-plugins``.
        default: Value when neither the flag nor ``env`` is set.
        env: Environment variable read when the flag is absent.
        required: Fail at start-up if no value results.
    """

    flag: str
    help: str
    default: str | None = None
    env: str | None = None
    required: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.flag, str) or not _FLAG_RE.match(self.flag):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise PluginError(f"plugin option flag must look like '--name', got {self.flag!r}")

    @property
    def key(self) -> str:
        """Key of this option in :attr:`PluginContext.options`."""
        return option_key(self.flag)


@dataclass(frozen=True, kw_only=True)
class Plugin:
    """What a distribution publishes under the ``pilot_worker.plugins`` entry-point group.

    Attributes:
        name: Name used with ``--plugin``.
        description: One line shown by ``--list-plugins``.
        options: Command-line options the plugin adds.
        setup: Called once with a :class:`PluginContext` before the worker
            serves; may be sync or async. It registers handlers, periodic tasks
            and shutdown hooks. An exception aborts start-up with a
            :class:`~pilot_worker.errors.PluginError`.
    """

    name: str
    description: str = ""
    options: Sequence[PluginOption] = ()
    setup: Callable[[PluginContext], Awaitable[None] | None]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise PluginError("Plugin.name must be a non-empty str")
        object.__setattr__(self, "options", tuple(self.options))
        seen: set[str] = set()
        for opt in self.options:
            if not isinstance(opt, PluginOption):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise PluginError(f"plugin {self.name!r}: options must be PluginOption objects")
            if opt.flag in seen:
                raise PluginError(f"plugin {self.name!r}: option {opt.flag} declared twice")
            seen.add(opt.flag)
        if not callable(self.setup):
            raise PluginError(f"plugin {self.name!r}: setup must be callable")


@dataclass(frozen=True, kw_only=True)
class PluginContext:
    """What a plugin's ``setup`` receives.

    Attributes:
        worker: The :class:`WorkerServer` (``register()``, ``include_module()``,
            ``add_periodic(interval, fn)``, ``on_shutdown(async fn)``, ``add_middleware()``).
        options: The plugin's option values keyed by flag without dashes
            (``"checkpoint_db"``); ``None`` when unset and without default.
        transport: The worker's ``pilot_transport.Transport`` (``None`` offline).
        logger: A logger named ``pilot_worker.plugins.<name>``.
        metrics_registry: The worker's Prometheus ``CollectorRegistry``.
    """

    worker: WorkerServer
    options: Mapping[str, str | None] = field(default_factory=dict[str, "str | None"])
    transport: Any = None
    logger: logging.Logger = field(
        default_factory=lambda: logging.getLogger("pilot_worker.plugins")
    )
    metrics_registry: CollectorRegistry | None = None


def discover_plugins() -> dict[str, Plugin | PluginError]:
    """Installed plugins by name; a broken entry point maps to the error loading it."""
    found: dict[str, Plugin | PluginError] = {}
    for ep in importlib.metadata.entry_points(group=PLUGIN_ENTRY_POINT_GROUP):
        try:
            found[ep.name] = _as_plugin(ep.load(), ep.value)
        except PluginError as exc:
            found[ep.name] = exc
        except Exception as exc:
            found[ep.name] = PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}")
    return found


def _as_plugin(obj: Any, where: str) -> Plugin:
    if isinstance(obj, Plugin):
        return obj
    if inspect.isfunction(obj):
        # A factory returning a Plugin is accepted too (lets a plugin defer imports).
        try:
            made = obj()
        except Exception as exc:
            raise PluginError(f"{where}: the plugin factory raised {exc!r}") from exc
        if isinstance(made, Plugin):
            return made
    raise PluginError(f"{where} is not a pilot_worker.Plugin (got {type(obj).__name__})")


def load_plugin(name: str) -> Plugin:
    """Find a plugin by entry-point name, or import ``module:attribute``.

    Raises:
        PluginNotFoundError: No installed plugin has that name.
        PluginError: The entry point or object is broken.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise PluginError(f"plugin {name!r}: cannot import {module_name!r}: {exc!r}") from exc
        try:
            obj = getattr(module, attr)
        except AttributeError as exc:
            raise PluginError(f"plugin {name!r}: {module_name} has no attribute {attr!r}") from exc
        return _as_plugin(obj, name)
    eps = importlib.metadata.entry_points(group=PLUGIN_ENTRY_POINT_GROUP, name=name)
    for ep in eps:
        try:
            return _as_plugin(ep.load(), ep.value)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {name!r} ({ep.value}) failed to load: {exc!r}") from exc
    installed = importlib.metadata.entry_points(group=PLUGIN_ENTRY_POINT_GROUP)
    available = sorted(ep.name for ep in installed)
    raise PluginNotFoundError(
        f"no plugin named {name!r} is installed (available: {', '.join(available) or 'none'}); "
        "plugins are published in the entry-point group " + PLUGIN_ENTRY_POINT_GROUP
    )
