"""Worker processes for the demo (and for tests): start, wait until serving, stop.

Every process started here is tracked by its ``Popen`` object and stopped by
pid (SIGTERM, then SIGKILL after a grace period); nothing is ever signalled
by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot_langgraph.errors import PilotUsageError

__all__ = ["WorkerProcess", "endpoint_of", "start_worker", "stop_all", "wait_ready"]

_POLL_SECS = 0.02


@dataclass
class WorkerProcess:
    """A worker process started by :func:`start_worker`."""

    name: str
    proc: subprocess.Popen[bytes]
    identity: Path
    trust: Path
    ready_file: Path
    log_file: Path
    ready: dict[str, Any] = field(default_factory=dict[str, Any])

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def endpoint(self) -> str:
        return endpoint_of(self.ready)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


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
    ``workdir/<name>.ready``.
    """
    identity = workdir / f"{name}.key"
    trust = workdir / f"{name}.trust.json"
    ready = workdir / f"{name}.ready"
    log = workdir / f"{name}.log"
    with contextlib.suppress(FileNotFoundError):
        ready.unlink()
    module = "pilot_langgraph._worker_cli" if langgraph_codec else "pilot_worker._cli"
    argv = [
        sys.executable,
        "-m",
        module,
        "--transport",
        "tcp://127.0.0.1:0",
        "--identity",
        str(identity),
        "--trust",
        str(trust),
        "--port",
        str(port),
        "--ready-file",
        str(ready),
    ]
    for h in handlers:
        argv += ["--handlers", h]
    for p in plugins:
        argv += ["--plugin", p]
    argv += list(extra_args)
    child_env = dict(os.environ)
    child_env.update(env or {})
    with log.open("wb") as log_handle:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=str(workdir),
        )
    return WorkerProcess(
        name=name, proc=proc, identity=identity, trust=trust, ready_file=ready, log_file=log
    )


def wait_ready(workers: Sequence[WorkerProcess], *, timeout: float = 30.0) -> None:
    """Wait until every worker wrote its ready file (or fail with its log)."""
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        for worker in list(pending):
            code = worker.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"worker {worker.name} exited with code {code} before serving:\n"
                    f"{worker.log_tail()}"
                )
            try:
                text = worker.ready_file.read_text()
            except FileNotFoundError:
                continue
            line = text.strip().splitlines()[0] if text.strip() else ""
            if not line:
                continue
            try:
                worker.ready = json.loads(line)
            except json.JSONDecodeError:
                continue  # being written
            pending.remove(worker)
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(w.name for w in pending)
            tails = "\n".join(f"--- {w.name}:\n{w.log_tail()}" for w in pending)
            raise TimeoutError(f"workers not ready after {timeout:g}s: {names}\n{tails}")
        time.sleep(_POLL_SECS)


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
