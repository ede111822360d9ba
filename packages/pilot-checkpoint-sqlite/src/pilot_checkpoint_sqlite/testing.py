"""Helpers for testing code that uses a checkpoint store.

* :func:`local_saver` / :func:`alocal_saver`: a :class:`PilotCheckpointSaver`
  over a store in this process (no network, same scoping and validation as a
  worker), closed on exit.
* :func:`start_store_worker`: a real ``pilot-worker --plugin checkpoint-sqlite``
  process on ``tcp://127.0.0.1`` (a free port), for multi-process tests; the
  returned :class:`StoreWorker` stops (SIGTERM) or kills (SIGKILL) exactly the
  process it started.
* :func:`scratch_postgres_schema`: a throwaway schema on a PostgreSQL server,
  so tests of the PostgreSQL path never see each other's tables.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pilot_worker.testing import WorkerProcess, start_worker_process

from pilot_checkpoint_sqlite._backend import LocalStoreBackend
from pilot_checkpoint_sqlite._options import SaverOptions, StoreOptions
from pilot_checkpoint_sqlite._saver import PilotCheckpointSaver
from pilot_checkpoint_sqlite._service import CheckpointService
from pilot_checkpoint_sqlite._store import CheckpointStore, open_store
from pilot_checkpoint_sqlite.errors import StoreTimeoutError, StoreUnavailableError

__all__ = [
    "StoreWorker",
    "alocal_saver",
    "local_saver",
    "scratch_postgres_schema",
    "start_store_worker",
]


@contextlib.contextmanager
def scratch_postgres_schema(base_url: str, *, prefix: str = "t") -> Generator[str]:
    """A fresh schema on the server of ``base_url``, dropped (with its tables) on exit.

    Yields ``base_url`` with ``search_path`` set to the new schema, ready for
    :func:`open_store`. Needs the ``postgres`` extra (psycopg).
    """
    import psycopg  # the optional extra: imported only when PostgreSQL is under test
    from psycopg import sql
    from sqlalchemy.engine import make_url

    base = make_url(base_url)
    schema = f"{prefix}_{uuid.uuid4().hex[:16]}"
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield base.render_as_string(hide_password=False) + (
            ("&" if base.query else "?") + "options=" + quote(f"-csearch_path={schema}")
        )
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@contextlib.contextmanager
def local_saver(
    url: str,
    *,
    caller_node_id: str = "local",
    store_options: StoreOptions | None = None,
    saver_options: SaverOptions | None = None,
) -> Generator[PilotCheckpointSaver]:
    """A saver over an in-process store at ``url``; both closed on exit."""
    store = CheckpointStore.open(url, store_options)
    saver = PilotCheckpointSaver(
        backend=LocalStoreBackend(CheckpointService(store), caller_node_id=caller_node_id),
        options=saver_options,
    )
    try:
        yield saver
    finally:
        saver.close()
        store.close()


@contextlib.asynccontextmanager
async def alocal_saver(
    url: str,
    *,
    caller_node_id: str = "local",
    store_options: StoreOptions | None = None,
    saver_options: SaverOptions | None = None,
) -> AsyncGenerator[PilotCheckpointSaver]:
    """Async twin of :func:`local_saver`."""
    store = await open_store(url, store_options)
    saver = PilotCheckpointSaver(
        backend=LocalStoreBackend(CheckpointService(store), caller_node_id=caller_node_id),
        options=saver_options,
    )
    try:
        yield saver
    finally:
        await saver.aclose()
        await store.aclose()


@dataclass
class StoreWorker:
    """A running store worker process started by :func:`start_store_worker`."""

    process: subprocess.Popen[bytes]
    node_id: str
    endpoint: str
    """``host:port`` of its tcp listener (put it in the callers' trust stores)."""
    port: int
    """Virtual port the store handlers are served on."""
    log_path: Path
    launcher: WorkerProcess | None = None
    """The :class:`pilot_worker.testing.WorkerProcess` that started it."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self, timeout: float = 30.0) -> int:
        """SIGKILL the process (no drain, no flush) and reap it."""
        if self.launcher is not None:
            return self.launcher.kill_blocking(timeout)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout``; returns the exit code."""
        if self.launcher is not None:
            return self.launcher.stop_blocking(timeout)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout)

    def log(self) -> str:
        """What the worker wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


def start_store_worker(
    *,
    identity: str | os.PathLike[str],
    trust: str | os.PathLike[str],
    db_url: str,
    port: int = 5000,
    listen: str = "tcp://127.0.0.1:0",
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready_timeout: float = 60.0,
    log_dir: str | os.PathLike[str] | None = None,
) -> StoreWorker:
    """Start ``pilot-worker --plugin checkpoint-sqlite`` and wait until it serves.

    A thin wrapper of pilot-worker's launcher
    (:func:`pilot_worker.testing.start_worker_process`).

    Args:
        identity: The worker's key file.
        trust: The worker's trust store file (callers must be in it).
        db_url: ``--checkpoint-db`` URL.
        port: Virtual port to serve on.
        listen: Transport URL (default: loopback, any free port).
        extra_args: More command-line arguments (e.g. ``--checkpoint-shared true``).
        env: Extra environment variables for the process.
        ready_timeout: Seconds to wait for the worker to be ready.
        log_dir: Where the worker's output file goes (default: a temp dir).

    Raises:
        StoreUnavailableError: the process exited before it was ready.
        StoreTimeoutError: it was not ready within ``ready_timeout``.
    """
    directory = (
        Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="pilot-store-"))
    )
    ready_file = directory / f"store-worker-{os.getpid()}-{time.monotonic_ns()}.ready.json"
    log_path = ready_file.with_suffix(".log")
    args = [
        "--transport",
        listen,
        "--identity",
        os.fspath(identity),
        "--trust",
        os.fspath(trust),
        "--port",
        str(port),
        "--plugin",
        "checkpoint-sqlite",
        "--checkpoint-db",
        db_url,
        "--no-call-log",
        *extra_args,
    ]
    launcher = start_worker_process(
        args,
        ready_file=ready_file,
        env={**os.environ, **(env or {})},
        log_file=log_path,
        name="store-worker",
    )
    try:
        info = launcher.wait_ready_blocking(ready_timeout)
    except EOFError as exc:
        launcher.wait_blocking(10)
        raise StoreUnavailableError(
            f"store worker exited with {launcher.returncode} before it was ready:\n"
            + launcher.log_tail(200)
        ) from exc
    except TimeoutError as exc:
        launcher.kill_blocking(10)
        raise StoreTimeoutError(
            f"store worker not ready within {ready_timeout}s:\n" + launcher.log_tail(200)
        ) from exc
    endpoint = str(info.get("endpoint") or "")
    if endpoint.startswith("tcp://"):
        endpoint = endpoint[len("tcp://") :]
    return StoreWorker(
        process=launcher.popen,
        node_id=str(info.get("node_id") or ""),
        endpoint=endpoint,
        port=int(info.get("port") or port),
        log_path=log_path,
        launcher=launcher,
    )
