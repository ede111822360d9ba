"""--reload: fresh handler code swapped in; a broken edit keeps the old handlers."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
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
    # Make sure the mtime differs even on coarse-grained filesystems (the
    # watcher needs a change; the reload itself never trusts mtimes).
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_reload_reads_the_source_not_a_stale_bytecode_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # V1 and V2 have the same length; with an unchanged mtime a .pyc keyed on
    # (whole-second mtime, size) would still look valid for V2. Bytecode
    # caching is forced on (PYTHONDONTWRITEBYTECODE would hide the problem).
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert len(V1) == len(V2)
    source = tmp_path / "reload_handlers_same_size.py"
    source.write_text(V1)
    stamp = source.stat().st_mtime_ns
    worker = WorkerServer(None)
    module = import_handler_module(str(source))
    worker.include_module(module)
    reloader = Reloader(worker, [module])
    assert reloader.reload_now()  # executed (and cached, if anything caches) as V1
    source.write_text(V2)
    os.utime(source, ns=(stamp, stamp))
    assert reloader.reload_now()
    assert worker.handlers["version"].fn(None) == 2
    assert "new_only" in worker.handlers


async def test_reload_swaps_handlers_and_survives_bad_edits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deterministic: every step is a synchronous reload_now() whose outcome is
    # asserted through the reload/failure counters, and the fresh code is
    # compiled from the file (a same-length edit within one second used to
    # reload the cached bytecode of the previous version: "assert 1 == 2").
    # Bytecode caching on, as on a machine without PYTHONDONTWRITEBYTECODE.
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
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
        assert (reloader.reloads, reloader.failures) == (1, 0)
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


def test_file_path_handlers_keep_their_natural_module_name(tmp_path: Path) -> None:
    plain = tmp_path / "plain_dir"
    plain.mkdir()
    (plain / "typed_handlers_nat.py").write_text(
        "from pydantic import BaseModel\n\nclass Answer(BaseModel):\n    text: str\n"
    )
    module = import_handler_module(str(plain / "typed_handlers_nat.py"))
    assert module.__name__ == "typed_handlers_nat"
    # A caller importing the same file resolves the same type by name.
    import importlib

    assert importlib.import_module("typed_handlers_nat").Answer is module.Answer

    pkg = tmp_path / "nat_app" / "api"
    pkg.mkdir(parents=True)
    (tmp_path / "nat_app" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "nat_handlers.py").write_text("VALUE = 7\n")
    nested = import_handler_module(str(pkg / "nat_handlers.py"))
    assert nested.__name__ == "nat_app.api.nat_handlers"


def test_file_path_handlers_fall_back_to_a_synthetic_name(tmp_path: Path) -> None:
    # "json" already means the standard library module: never shadowed.
    (tmp_path / "json.py").write_text("VALUE = 1\n")
    module = import_handler_module(str(tmp_path / "json.py"))
    assert module.__name__ == "pilot_worker_handlers_json"
    import json

    assert not hasattr(json, "VALUE")
    (tmp_path / "my-handlers.py").write_text("VALUE = 2\n")
    dashed = import_handler_module(str(tmp_path / "my-handlers.py"))
    assert dashed.__name__ == "pilot_worker_handlers_my-handlers"
    assert dashed.VALUE == 2
