"""--reload: fresh handler code swapped in; a broken edit keeps the old handlers."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from pilot_worker import WorkerServer, pilot_handler
from pilot_worker._modules import import_handler_module
from pilot_worker._reload import Reloader
from pilot_worker.testing import WorkerTestClient

V1 = """
from pilot_worker import pilot_handler

@pilot_handler("version")
def version(payload):
    return 1

@pilot_handler("old_only")
def old_only(payload):
    return "old"
"""

V2 = """
from pilot_worker import pilot_handler

@pilot_handler("version")
def version(payload):
    return 2

@pilot_handler("new_only")
def new_only(payload):
    return "new"
"""

BROKEN = """
from pilot_worker import pilot_handler

@pilot_handler("version")
def version(payload):
    return 3
raise SyntaxError("half-typed edit")
"""

CLASH = """
from pilot_worker import pilot_handler

@pilot_handler("fixed")
def fixed(payload):
    return "clash"
"""


@pilot_handler("fixed")
def fixed(payload: object) -> str:
    return "registered directly"


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    # Make sure the mtime differs even on coarse-grained filesystems.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


async def test_reload_swaps_handlers_and_survives_bad_edits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "reload_handlers_a.py"
    _write(source, V1)
    worker = WorkerServer(None)
    worker.register(fixed)
    module = import_handler_module(str(source))
    worker.include_module(module)
    reloader = Reloader(worker, [module])
    async with WorkerTestClient(worker) as client:
        assert await client.call("version") == 1
        _write(source, V2)
        assert reloader.reload_now()
        assert await client.call("version") == 2
        assert "old_only" not in worker.handlers
        assert await client.call("new_only") == "new"

        caplog.set_level(logging.ERROR, logger="pilot_worker.reload")
        _write(source, BROKEN)
        assert not reloader.reload_now()
        assert "reload failed, keeping the previous handlers" in caplog.text
        assert "half-typed edit" in caplog.text
        assert await client.call("version") == 2

        _write(source, CLASH)
        assert not reloader.reload_now()
        assert "'fixed' is defined twice" in caplog.text
        assert await client.call("version") == 2
        assert await client.call("fixed") == "registered directly"

        _write(source, V1)
        assert reloader.reload_now()
        assert await client.call("version") == 1
        assert reloader.reloads == 2
        assert reloader.failures == 2


async def test_watcher_reloads_on_a_real_file_edit(tmp_path: Path) -> None:
    source = tmp_path / "reload_handlers_b.py"
    _write(source, V1)
    worker = WorkerServer(None)
    module = import_handler_module(str(source))
    worker.include_module(module)
    reloader = Reloader(worker, [module], debounce_ms=50)
    stop = asyncio.Event()
    watching = asyncio.create_task(reloader.run(stop))
    try:
        async with WorkerTestClient(worker) as client:
            # The watcher may start after a write: edit again until it reports a reload.
            for _ in range(30):
                _write(source, V2)
                try:
                    async with asyncio.timeout(1):
                        await reloader.wait_attempt()
                    break
                except TimeoutError:
                    continue
            assert reloader.reloads >= 1
            assert await client.call("version") == 2
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await watching
