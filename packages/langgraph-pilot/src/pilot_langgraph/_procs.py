"""Worker processes for the demo (and for tests): start, wait until serving, stop.

A thin layer over pilot-worker's one launcher
(:class:`pilot_worker.testing.WorkerProcess`): every process is tracked by its
``Popen`` object and stopped by pid (SIGTERM, then SIGKILL after a grace
period); nothing is ever signalled by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pilot_worker.testing import WorkerProcess as _LaunchedWorker

from pilot_langgraph.errors import PilotUsageError

__all__ = ["WorkerProcess", "endpoint_of", "start_worker", "stop_all", "wait_ready"]


class WorkerProcess(_LaunchedWorker):
    """A worker process started by :func:`start_worker`.

    pilot-worker's launcher class, plus the worker's key and trust files and
    the names this package has always used: ``proc`` (the ``Popen``) and
    ``ready`` (the ready record).
    """

    identity: Path
    trust: Path

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.popen

    @property
    def ready(self) -> dict[str, Any]:
        return self.info

    @property
    def endpoint(self) -> str:
        return endpoint_of(self.info)


def endpoint_of(ready: Mapping[str, Any]) -> str:
    """``host:port`` of a worker's tcp listener, from its ready-file record."""
    raw = str(ready.get("endpoint") or "")
    if "://" in raw:
        raw = raw.split("://", 1)[1]
    if not raw:
        raise PilotUsageError(f"ready file has no endpoint: {dict(ready)!r}")
    return raw


def start_worker(
    name: str,
    *,
    workdir: Path,
    handlers: Sequence[str] = (),
    plugins: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    port: int = 5000,
    langgraph_codec: bool = True,
) -> WorkerProcess:
    """Start one worker on ``tcp://127.0.0.1:0`` with its own identity in ``workdir``.

    Its key file is ``workdir/<name>.key`` and its trust file ``workdir/<name>.trust.json``
    (both must exist or are created by the worker); readiness is reported to
    ``workdir/<name>.ready`` and its output copied to ``workdir/<name>.log``.
    """
    identity = workdir / f"{name}.key"
    trust = workdir / f"{name}.trust.json"
    args = [
        "--transport",
        "tcp://127.0.0.1:0",
        "--identity",
        str(identity),
        "--trust",
        str(trust),
        "--port",
        str(port),
    ]
    for h in handlers:
        args += ["--handlers", h]
    for p in plugins:
        args += ["--plugin", p]
    args += list(extra_args)
    log = workdir / f"{name}.log"
    log.unlink(missing_ok=True)
    worker = WorkerProcess.start(
        args,
        ready_file=workdir / f"{name}.ready",
        module="pilot_langgraph._worker_cli" if langgraph_codec else "pilot_worker._cli",
        env={**os.environ, **(env or {})},
        cwd=workdir,
        log_file=log,
        name=name,
    )
    worker.identity = identity
    worker.trust = trust
    return worker


def wait_ready(workers: Sequence[WorkerProcess], *, timeout: float = 30.0) -> None:
    """Wait until every worker wrote its ready file (or fail with its log)."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.wait_ready_blocking(max(0.0, deadline - time.monotonic()))
        except EOFError:
            raise RuntimeError(
                f"worker {worker.name} exited with code {worker.returncode} before serving:\n"
                f"{worker.log_tail()}"
            ) from None
        except TimeoutError:
            pending = [w for w in workers if not w.info]
            names = ", ".join(w.name for w in pending)
            tails = "\n".join(f"--- {w.name}:\n{w.log_tail()}" for w in pending)
            raise TimeoutError(f"workers not ready after {timeout:g}s: {names}\n{tails}") from None


def stop_all(procs: Sequence[subprocess.Popen[Any]], *, grace: float = 5.0) -> None:
    """Stop processes we started: SIGTERM, wait up to ``grace`` s, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5.0)
