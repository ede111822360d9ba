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


def _synthetic_name(path: Path) -> str:
    stem = path.stem if path.name != "__init__.py" else path.parent.name
    return f"pilot_worker_handlers_{stem}"


def natural_module_name(path: Path) -> tuple[str, Path] | None:
    """The dotted name ``path`` is importable as, and the directory to import it from.

    ``handlers/x.py`` is ``x`` from ``handlers/``; inside packages (directories
    with ``__init__.py``) the name is package-relative: ``app/api/x.py`` with
    ``app/__init__.py`` and ``app/api/__init__.py`` is ``app.api.x`` from the
    directory holding ``app``. ``None`` when a part is not an identifier.
    """
    parts = [path.parent.name] if path.name == "__init__.py" else [path.stem]
    directory = path.parent.parent if path.name == "__init__.py" else path.parent
    while (directory / "__init__.py").is_file() and directory.parent != directory:
        parts.insert(0, directory.name)
        directory = directory.parent
    if not all(part.isidentifier() for part in parts):
        return None
    return ".".join(parts), directory


def _import_by_natural_name(path: Path) -> types.ModuleType | None:
    """Import ``path`` under its natural name, or ``None`` if that name means another file."""
    natural = natural_module_name(path)
    if natural is None:
        return None
    name, root = natural
    loaded = sys.modules.get(name)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
        return loaded if origin is not None and Path(origin).resolve() == path else None
    root_entry = str(root)
    if root_entry not in sys.path:
        # Appended, not prepended: a handler directory never shadows an installed
        # module (a file named like one falls back to a synthetic name below).
        sys.path.append(root_entry)
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or Path(spec.origin).resolve() != path:
        return None
    try:
        return importlib.import_module(name)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise HandlerImportError(
            f"handler module {str(path)!r} raised while importing: {type(exc).__name__}: {exc}"
        ) from exc


def import_handler_module(ref: str) -> types.ModuleType:
    """Import ``ref``: a dotted module name (``my_pkg.handlers``) or a ``.py`` path.

    The current directory is importable, like ``python -m``. A ``.py`` path is
    imported under its natural name (``x`` for ``dir/x.py``; ``pkg.x`` when
    ``dir/pkg/__init__.py`` exists), with its root directory appended to
    ``sys.path``, so the types it defines have the same importable name on
    the worker and on a caller that imports the same file (a typed codec can
    then rebuild ``x.Answer``). Only when that name already means another
    module (a file called ``json.py``) or is not a valid identifier
    (``my-handlers.py``) is the file loaded as ``pilot_worker_handlers_<stem>``.

    Raises:
        HandlerImportError: The module is missing or raised while importing;
            the message names the module and the cause.
    """
    if _is_path(ref):
        path = Path(ref).resolve()
        if not path.is_file():
            raise HandlerImportError(f"handler module file {ref!r} does not exist")
        module = _import_by_natural_name(path)
        if module is not None:
            return module
        return _exec_file(_synthetic_name(path), path)
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
    """Execute ``path``'s current source as a fresh module ``name``.

    The source is compiled from the file every time, never from a cached
    ``.pyc``: a bytecode cache is validated by whole-second mtime and size,
    so an edit of the same length within the same second would otherwise
    reload the old code.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise HandlerImportError(f"cannot load handler module from {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        code = compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102 - the operator's own handler module
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
