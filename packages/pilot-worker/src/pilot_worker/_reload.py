"""``--reload``: re-import handler modules when their source changes.

The watcher (``watchfiles``) reports changes to the files of the modules named
with ``--handlers``. Each change re-executes a fresh copy of every watched
module and swaps the worker's handlers in one step
(:meth:`WorkerServer.replace_handlers`). If the new code does not import, or
defines a handler name twice, the old handlers stay in place and the error is
logged; the next edit is tried again. Calls already running finish with the
code they started with. Only the named modules are re-executed, not the
modules they import.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import types
from pathlib import Path

import watchfiles

from pilot_worker._handler import HandlerSpec
from pilot_worker._modules import collect_specs, module_watch_paths, reimport_module
from pilot_worker._server import WorkerServer
from pilot_worker.errors import DuplicateHandlerError, WorkerError

__all__ = ["Reloader"]

logger = logging.getLogger("pilot_worker.reload")


class Reloader:
    """Watches handler modules and reloads them into ``worker``."""

    def __init__(
        self, worker: WorkerServer, modules: list[types.ModuleType], *, debounce_ms: int = 100
    ) -> None:
        self._worker = worker
        self._modules = list(modules)
        self._debounce_ms = debounce_ms
        self._files = {path for m in self._modules for path in module_watch_paths(m)}
        self.reloads = 0
        self.failures = 0
        self._attempted = asyncio.Event()

    @property
    def files(self) -> set[Path]:
        """The source files being watched."""
        return set(self._files)

    def reload_now(self) -> bool:
        """Re-import every watched module and swap handlers. Returns success.

        Never raises for a bad edit: it logs why and keeps the old handlers.
        """
        try:
            fresh = [reimport_module(module) for module in self._modules]
            plan = [
                (old.__name__, collect_specs(new))
                for old, new in zip(self._modules, fresh, strict=True)
            ]
            self._check_names(plan)
            for source, specs in plan:
                self._worker.replace_handlers(
                    remove=self._worker.handlers_from(source), add=specs, source=source
                )
        except WorkerError as exc:
            # Put the old module objects back so the next edit starts from them.
            for module in self._modules:
                sys.modules[module.__name__] = module
            self.failures += 1
            logger.error("reload failed, keeping the previous handlers: %s", exc)
            return False
        self._modules = fresh
        self.reloads += 1
        logger.info(
            "reloaded handlers: %s",
            ", ".join(sorted(spec.name for _, specs in plan for spec in specs)) or "(none)",
        )
        return True

    def _check_names(self, plan: list[tuple[str, list[HandlerSpec]]]) -> None:
        sources = {source for source, _ in plan}
        taken = {
            name: spec
            for name, spec in self._worker.handlers.items()
            if self._worker.source_of(name) not in sources
        }
        for _, specs in plan:
            for spec in specs:
                other = taken.get(spec.name)
                if other is not None and other is not spec:
                    raise DuplicateHandlerError(
                        f"handler name {spec.name!r} is defined twice: {other.origin} "
                        f"and {spec.origin}"
                    )
                taken[spec.name] = spec

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop`` is set (or the task is cancelled)."""
        if not self._files:
            logger.warning("--reload: no handler module files to watch")
            return
        directories = sorted({str(path.parent) for path in self._files})
        files = {str(path) for path in self._files}
        logger.info("watching %s for changes", ", ".join(sorted(files)))

        def only_ours(change: watchfiles.Change, path: str) -> bool:
            return str(Path(path).resolve()) in files

        async for _changes in watchfiles.awatch(
            *directories,
            watch_filter=only_ours,
            stop_event=stop,
            debounce=self._debounce_ms,
            step=50,
            recursive=False,
            rust_timeout=500,
        ):
            self.reload_now()
            self._attempted.set()

    async def wait_attempt(self) -> None:
        """Wait until the watcher next tries a reload (for tests and tooling)."""
        self._attempted.clear()
        await self._attempted.wait()
