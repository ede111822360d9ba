"""Finding handlers in modules named on the command line."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

from pilot_worker._handler import HandlerSpec, get_handler_spec
from pilot_worker.errors import HandlerImportError

__all__ = ["collect_specs", "import_handler_module", "module_watch_paths", "reimport_module"]


def _is_path(ref: str) -> bool:
    return ref.endswith(".py") or "/" in ref or "\\" in ref


def _module_name_for_path(path: Path) -> str:
    stem = path.stem if path.name != "__init__.py" else path.parent.name
    return f"pilot_worker_handlers_{stem}"


def import_handler_module(ref: str) -> types.ModuleType:
    """Import ``ref``: a dotted module name (``my_pkg.handlers``) or a ``.py`` path.

    The current directory is importable, like ``python -m``.

    Raises:
        HandlerImportError: The module is missing or raised while importing;
            the message names the module and the cause.
    """
    if _is_path(ref):
        path = Path(ref).resolve()
        if not path.is_file():
            raise HandlerImportError(f"handler module file {ref!r} does not exist")
        return _exec_file(_module_name_for_path(path), path)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(ref)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (ref == exc.name or ref.startswith(exc.name + ".")):
            raise HandlerImportError(
                f"handler module {ref!r} not found (is it installed, or in the current "
                f"directory {str(Path.cwd())!r}?)"
            ) from exc
        raise HandlerImportError(f"handler module {ref!r} failed to import: {exc}") from exc
    except Exception as exc:
        raise HandlerImportError(
            f"handler module {ref!r} raised while importing: {type(exc).__name__}: {exc}"
        ) from exc


def _exec_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise HandlerImportError(f"cannot load handler module from {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise HandlerImportError(
            f"handler module {str(path)!r} raised while importing: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def reimport_module(module: types.ModuleType) -> types.ModuleType:
    """Execute a fresh copy of ``module`` from its source file.

    The old module object stays untouched (and in ``sys.modules``) when the new
    code fails, so a broken edit never leaves a half-initialised module behind.

    Raises:
        HandlerImportError: The new code does not import.
    """
    path = getattr(module, "__file__", None)
    if path is None:
        raise HandlerImportError(f"module {module.__name__!r} has no source file to reload")
    importlib.invalidate_caches()
    return _exec_file(module.__name__, Path(path))


def module_watch_paths(module: types.ModuleType) -> list[Path]:
    """Files whose change should trigger a reload of ``module``."""
    path = getattr(module, "__file__", None)
    return [Path(path).resolve()] if path else []


def collect_specs(module: types.ModuleType) -> list[HandlerSpec]:
    """Every distinct :class:`HandlerSpec` reachable from ``module``'s namespace."""
    specs: list[HandlerSpec] = []
    seen: set[int] = set()
    for value in list(vars(module).values()):
        spec = value if isinstance(value, HandlerSpec) else get_handler_spec(value)
        if spec is not None and id(spec) not in seen:
            seen.add(id(spec))
            specs.append(spec)
    return specs
