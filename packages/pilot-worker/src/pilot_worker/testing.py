"""Drive handlers in unit tests, without a network.

Calls go through the worker's real pipeline (ACL, limits, codec, validation,
idempotency, middleware, timeouts, metrics), exactly as over pilot-rpc; only
the transport is missing. Requests and results are round-tripped through
msgpack by default, so a handler returning something the wire cannot carry
fails here too. Errors are the ``pilot_rpc.RpcError`` subclasses a remote
caller would receive::

    from pilot_worker.testing import WorkerTestClient

    async def test_search():
        async with WorkerTestClient([search], caller="alice") as client:
            assert await client.call("search", {"q": "x"}) == {...}
            items = await client.stream("count", 3)          # collected list
            with pytest.raises(PermissionDenied):
                await client.call("search", {}, caller="mallory")

To call a handler function directly with a context, build one with
:func:`make_context`. To test against a real worker *process* (signals,
reload, HTTP endpoints), use :func:`run_worker_process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from pilot_worker._codec import PayloadCodec
from pilot_worker._config import WorkerConfig
from pilot_worker._context import Context
from pilot_worker._handler import HandlerKind, HandlerSpec
from pilot_worker._server import Middleware, WorkerServer

__all__ = [
    "FakePeer",
    "OfflineCall",
    "WorkerProcess",
    "WorkerTestClient",
    "make_context",
    "make_peer",
    "run_worker_process",
    "start_worker_process",
]

_request_ids = itertools.count(1)


@dataclass(frozen=True, kw_only=True)
class FakePeer:
    """A stand-in for ``pilot_transport.PeerInfo`` (same attributes)."""

    node_id: str
    name: str | None = None
    address: str | None = None
    public_key: bytes = b""
    fingerprint: str = ""


def make_peer(name: str, *, address: str | None = None) -> FakePeer:
    """A peer whose node id is derived from ``name`` (stable across runs)."""
    key = hashlib.sha256(name.encode()).digest()
    return FakePeer(
        node_id=key.hex()[:32],
        name=name,
        address=address,
        public_key=key,
        fingerprint="SHA256:" + key.hex()[:16],
    )


@dataclass(kw_only=True)
class OfflineCall:
    """An incoming call without a network (satisfies ``IncomingCall``)."""

    peer: FakePeer
    request_id: str = field(default_factory=lambda: f"test-{next(_request_ids)}")
    deadline: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict[str, str])
    traceparent: str | None = None
    idempotency_key: str | None = None
    on_progress: Callable[[Any], Any] | None = None
    progress: list[Any] = field(default_factory=list[Any])
    cancelled: bool = False

    async def send_progress(self, value: Any) -> None:
        self.progress.append(value)
        if self.on_progress is not None:
            result = self.on_progress(value)
            if asyncio.iscoroutine(result):
                await result


def _roundtrip(value: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False, strict_map_key=False)


def make_context(
    handler_name: str = "handler",
    *,
    caller: str | FakePeer = "test-caller",
    metadata: Mapping[str, str] | None = None,
    timeout: float | None = None,
    idempotency_key: str | None = None,
    traceparent: str | None = None,
) -> Context:
    """A :class:`Context` for calling a handler function directly.

    Must be called inside a running event loop. Progress reports are kept in
    ``ctx._call.progress`` (prefer :class:`WorkerTestClient` to check them).
    """
    loop = asyncio.get_running_loop()
    peer = caller if isinstance(caller, FakePeer) else make_peer(caller)
    deadline = None if timeout is None else loop.time() + timeout
    call = OfflineCall(
        peer=peer,
        deadline=deadline,
        metadata=dict(metadata or {}),
        traceparent=traceparent,
        idempotency_key=idempotency_key,
    )
    return Context(call=call, handler_name=handler_name, deadline=deadline, loop=loop)


class WorkerTestClient:
    """Call a worker's handlers in-process through its full pipeline.

    Args:
        handlers: A :class:`WorkerServer` (used as is), or handlers to register
            on a fresh offline worker (decorated functions, plain functions,
            :class:`HandlerSpec` objects, or modules).
        caller: Default caller: a name (its node id is derived from it, see
            :func:`make_peer`) or a :class:`FakePeer`.
        config: Options of the fresh worker.
        codec: Payload codec of the fresh worker.
        middleware: Middleware of the fresh worker.
        wire_roundtrip: Pass requests and results through msgpack, as the
            network would.
    """

    __test__ = False

    def __init__(
        self,
        handlers: WorkerServer | Sequence[Any] | Any,
        *,
        caller: str | FakePeer = "test-caller",
        config: WorkerConfig | None = None,
        codec: PayloadCodec | None = None,
        middleware: Sequence[Middleware] = (),
        wire_roundtrip: bool = True,
    ) -> None:
        if isinstance(handlers, WorkerServer):
            self.worker = handlers
        else:
            self.worker = WorkerServer(None, config, codec=codec, middleware=middleware)
            items: Sequence[Any] = (
                handlers if isinstance(handlers, list | tuple) else [handlers]  # pyright: ignore[reportUnknownVariableType]
            )
            for item in items:
                if hasattr(item, "__file__") or isinstance(item, str):
                    self.worker.include_module(item)
                else:
                    self.worker.register(item)
        self._default_caller = caller
        self._roundtrip = wire_roundtrip
        self.last_call: OfflineCall | None = None

    @staticmethod
    def peer(caller: str | FakePeer) -> FakePeer:
        """The :class:`FakePeer` used for ``caller``."""
        return caller if isinstance(caller, FakePeer) else make_peer(caller)

    def _call(
        self,
        caller: str | FakePeer | None,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        idempotency_key: str | None,
        traceparent: str | None,
        on_progress: Callable[[Any], Any] | None,
    ) -> OfflineCall:
        loop = asyncio.get_running_loop()
        call = OfflineCall(
            peer=self.peer(caller if caller is not None else self._default_caller),
            deadline=None if timeout is None else loop.time() + timeout,
            metadata=dict(metadata or {}),
            idempotency_key=idempotency_key,
            traceparent=traceparent,
            on_progress=on_progress,
        )
        self.last_call = call
        return call

    async def call(
        self,
        name: str,
        payload: Any = None,
        *,
        caller: str | FakePeer | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the caller's deadline, as in RpcClient.call
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        on_progress: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Call a unary handler and return its (wire-shaped) result.

        ``timeout`` plays the caller's deadline. Progress values are passed to
        ``on_progress`` and kept in ``client.last_call.progress``.

        Raises:
            pilot_rpc.RpcError: The subclass a remote caller would receive.
        """
        spec = self._spec(name)
        if spec is not None and spec.kind is HandlerKind.SERVER_STREAMING:
            raise TypeError(f"{name!r} is a streaming handler: use stream()")
        call = self._call(caller, timeout, metadata, idempotency_key, traceparent, on_progress)
        request = _roundtrip(payload) if self._roundtrip else payload
        result = await self.worker.dispatch_unary(name, request, call)
        return _roundtrip(result) if self._roundtrip else result

    async def stream(
        self,
        name: str,
        payload: Any = None,
        *,
        caller: str | FakePeer | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the caller's deadline, as in RpcClient.call
        metadata: Mapping[str, str] | None = None,
        traceparent: str | None = None,
        limit: int | None = None,
    ) -> list[Any]:
        """Call a streaming handler and collect its items (at most ``limit``).

        Raises:
            pilot_rpc.RpcError: The subclass a remote caller would receive.
        """
        items: list[Any] = []
        stream = self.iter_stream(
            name,
            payload,
            caller=caller,
            timeout=timeout,
            metadata=metadata,
            traceparent=traceparent,
        )
        async with contextlib.aclosing(stream):
            async for item in stream:
                items.append(item)
                if limit is not None and len(items) >= limit:
                    break
        return items

    async def iter_stream(
        self,
        name: str,
        payload: Any = None,
        *,
        caller: str | FakePeer | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the caller's deadline, as in RpcClient.call
        metadata: Mapping[str, str] | None = None,
        traceparent: str | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Iterate a streaming handler's items as they come."""
        call = self._call(caller, timeout, metadata, None, traceparent, None)
        request = _roundtrip(payload) if self._roundtrip else payload
        agen = self.worker.dispatch_stream(name, request, call)
        try:
            async for item in agen:
                yield _roundtrip(item) if self._roundtrip else item
        finally:
            await agen.aclose()

    def _spec(self, name: str) -> HandlerSpec | None:
        return self.worker.handlers.get(name)

    async def aclose(self) -> None:
        """Close the worker (a no-op for the network parts it never started)."""
        await self.worker.aclose()

    async def __aenter__(self) -> WorkerTestClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


_MAX_LOG_LINES = 20_000
_READY_POLL_SECS = 0.05
_W = TypeVar("_W", bound="WorkerProcess")


class WorkerProcess:
    """A worker child process: started, waited for until it serves, stopped by pid.

    The one launcher behind every "start a worker process and wait for its
    ready file" in this repository's tests, demo and benchmarks (pilot-worker,
    pilot-checkpoint-sqlite, langgraph-pilot). Start one with
    :meth:`start` (or :func:`start_worker_process`), or use
    :func:`run_worker_process` as an async context manager.

    The child's stdout and stderr (merged) are read by a daemon thread: every
    line is kept in :attr:`logs` (the last 20,000) and, with ``log_file``,
    appended to that file as it comes. Only this process is ever signalled.

    Both sync and async code can drive it: ``wait_ready_blocking`` /
    ``stop_blocking`` / ``kill_blocking`` block the calling thread;
    ``wait_ready`` / ``wait_for_log`` / ``wait`` / ``stop`` / ``kill`` are
    their cancellable async twins.

    Attributes:
        popen: The ``subprocess.Popen`` object.
        name: A label for messages (default: the ready file's stem).
        ready_file: Where the worker writes its ready record.
        log_file: Copy of the output, or ``None``.
        info: The ready record once ready: ``node_id``, ``endpoint``
            (``"127.0.0.1:PORT"`` on tcp://), ``port``, ``pid``,
            ``metrics_port``, ``carrier``, ``handlers``.
        logs: Output lines so far (bounded).
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        ready_file: Path,
        log_file: Path | None = None,
        name: str | None = None,
        captured: bool = True,
    ) -> None:
        self.popen = popen
        self.name = name or ready_file.stem
        self.ready_file = ready_file
        self.log_file = log_file
        self.info: dict[str, Any] = {}
        self.logs: list[str] = []
        self._lock = threading.Condition()
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._eof = not captured
        self._reader: threading.Thread | None = None
        if captured:
            self._reader = threading.Thread(
                target=self._read_output, name=f"worker-output-{popen.pid}", daemon=True
            )
            self._reader.start()

    @classmethod
    def start(
        cls: type[_W],
        args: Sequence[str],
        *,
        ready_file: str | os.PathLike[str],
        python: str | None = None,
        module: str = "pilot_worker",
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_file: str | os.PathLike[str] | None = None,
        name: str | None = None,
        capture: bool = True,
    ) -> _W:
        """Start ``python -m MODULE ARGS --ready-file READY_FILE`` (not yet ready).

        Args:
            args: Command-line arguments of the worker.
            ready_file: Where the worker writes its ready record (a stale one
                is removed first).
            python: Interpreter (default: this one).
            module: Module run with ``-m`` (``pilot_worker``,
                ``pilot_langgraph._worker_cli``...).
            command: Replaces ``[python, "-m", module]`` (e.g. a benchmark's
                own server script); it must accept ``--ready-file PATH``.
            env: The child's whole environment (default: this process's).
            cwd: The child's working directory.
            log_file: Also write the output to this file.
            name: Label used in messages.
            capture: Read the output in this process (:attr:`logs`,
                :meth:`wait_for_log`). ``False`` with a ``log_file``: the child
                writes straight to the file and this process never touches its
                output (benchmarks: no reader thread competing for the CPU).

        Raises:
            OSError: The process could not be started.
        """
        ready = Path(ready_file)
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        argv = [*(command or (python or sys.executable, "-m", module)), *args]
        argv += ["--ready-file", str(ready)]
        log = Path(log_file) if log_file is not None else None
        captured = capture or log is None
        with contextlib.ExitStack() as stack:
            sink: Any = subprocess.PIPE
            if not captured and log is not None:
                sink = stack.enter_context(log.open("ab"))
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=None if cwd is None else str(cwd),
            )
        return cls(popen, ready_file=ready, log_file=log, name=name, captured=captured)

    # ------------------------------------------------------------------ output

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, or ``None`` while running."""
        return self.popen.poll()

    @property
    def endpoint(self) -> str:
        """``host:port`` of the worker's tcp listener, from its ready record.

        Raises:
            RuntimeError: Not ready yet, or the record has no endpoint.
        """
        raw = str(self.info.get("endpoint") or "")
        if "://" in raw:
            raw = raw.split("://", 1)[1]
        if not raw:
            raise RuntimeError(f"worker {self.name}: ready record has no endpoint: {self.info!r}")
        return raw

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of output."""
        if self._reader is None and self.log_file is not None:
            try:
                text = self.log_file.read_text(encoding="utf-8", errors="replace")
            except OSError:
                return ""
            return "\n".join(text.splitlines()[-lines:])
        with self._lock:
            return "\n".join(self.logs[-lines:])

    def _read_output(self) -> None:
        stream = self.popen.stdout
        sink = self.log_file.open("ab") if self.log_file is not None else None
        try:
            if stream is not None:
                for raw in iter(stream.readline, b""):
                    if sink is not None:
                        sink.write(raw)
                        sink.flush()
                    with self._lock:
                        self.logs.append(raw.decode("utf-8", "replace").rstrip("\n"))
                        del self.logs[:-_MAX_LOG_LINES]
                        self._notify()
        finally:
            if sink is not None:
                sink.close()
            if stream is not None:
                stream.close()
            with self._lock:
                self._eof = True
                self._notify()

    def _notify(self) -> None:
        """Wake every waiter (called with the lock held)."""
        self._lock.notify_all()
        for loop, event in list(self._async_waiters):
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(event.set)

    # -------------------------------------------------------------- readiness

    def _check_ready(self) -> bool:
        """True once the ready record is readable; raises if the process ended first."""
        try:
            text = self.ready_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        if text.strip():
            try:
                self.info = json.loads(text.strip().splitlines()[0])
                return True
            except ValueError:
                pass  # written atomically by the worker; a foreign writer may be mid-write
        code = self.popen.poll()
        if code is not None:
            raise EOFError(
                f"worker {self.name} (pid {self.pid}) exited with {code} before serving; "
                f"last lines:\n{self.log_tail()}"
            )
        return False

    def wait_ready_blocking(self, timeout: float = 60.0) -> dict[str, Any]:
        """Block until the worker wrote its ready record; return it.

        Raises:
            EOFError: The worker exited first (its last output is in the message).
            TimeoutError: Not ready within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._check_ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"worker {self.name} not ready within {timeout:g}s; last lines:\n"
                        + "\n".join(self.logs[-20:])
                        + (self.log_tail() if self._reader is None else "")
                    )
                # Woken by any output; the ready file itself is rechecked at least this often.
                self._lock.wait(min(left, _READY_POLL_SECS))
        return self.info

    async def _until(
        self,
        test: Callable[[], bool],
        timeout: float,  # noqa: ASYNC109 - a bound on waiting for the child
        what: Callable[[], str],
    ) -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter = (loop, event)
        with self._lock:
            self._async_waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event.clear()
                    if test():
                        return
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_READY_POLL_SECS):
                            await event.wait()
        except TimeoutError:
            raise TimeoutError(what()) from None
        finally:
            with self._lock:
                self._async_waiters.discard(waiter)

    async def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Wait until the worker wrote its ready record; return it.

        Cancellable. Raises ``EOFError`` (exited first) or ``TimeoutError``.
        """
        await self._until(
            self._check_ready,
            timeout,
            lambda: (
                f"worker {self.name} not ready within {timeout:g}s; last lines:\n" + self.log_tail()
            ),
        )
        return self.info

    async def wait_for_log(
        self,
        match: str | Callable[[str], bool],
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - a bound on waiting for output
        start: int = 0,
    ) -> str:
        """Wait for an output line containing ``match`` (or satisfying it); return it.

        Lines before index ``start`` of :attr:`logs` are ignored (pass
        ``len(proc.logs)`` to wait for a *new* line).

        Raises:
            TimeoutError: No such line within ``timeout``; the message shows
                the last lines.
            EOFError: The process closed its output (exited) first.
        """
        test: Callable[[str], bool] = (
            (lambda line: match in line) if isinstance(match, str) else match
        )
        found: list[str] = []
        seen = start

        def check() -> bool:
            nonlocal seen
            with self._lock:
                lines = self.logs[seen:]
                eof = self._eof
                seen = max(seen, len(self.logs))
            for line in lines:
                if test(line):
                    found.append(line)
                    return True
            if eof:
                raise EOFError(
                    f"worker exited ({self.popen.poll()}) before logging {match!r}; "
                    f"last lines:\n{self.log_tail()}"
                )
            return False

        await self._until(
            check,
            timeout,
            lambda: (
                f"no log line matching {match!r} within {timeout}s; last lines:\n" + self.log_tail()
            ),
        )
        return found[0]

    # ----------------------------------------------------------------- stopping

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to this process (and only this process), if it runs."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    def _exited(self) -> bool:
        return self.popen.poll() is not None and self._eof

    async def wait(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """Wait for the process to exit (and its output to be read); return its exit code.

        Raises:
            TimeoutError: It is still running after ``timeout``.
        """
        await self._until(
            self._exited, timeout, lambda: f"worker {self.name} still running after {timeout:g}s"
        )
        return self.popen.wait()

    async def stop(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit code."""
        self.send_signal(signal.SIGTERM)
        try:
            return await self.wait(timeout)
        except TimeoutError:
            self.send_signal(signal.SIGKILL)
            return await self.wait(10)

    async def kill(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """SIGKILL (no drain) and reap; return the exit code."""
        self.send_signal(signal.SIGKILL)
        return await self.wait(timeout)

    def wait_blocking(self, timeout: float = 30.0) -> int:
        """Block until the process exits; return its exit code.

        Raises:
            subprocess.TimeoutExpired: It is still running after ``timeout``.
        """
        code = self.popen.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return code

    def stop_blocking(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout``; return the exit code."""
        self.send_signal(signal.SIGTERM)
        try:
            return self.wait_blocking(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            return self.wait_blocking(10)

    def kill_blocking(self, timeout: float = 30.0) -> int:
        """SIGKILL (no drain, no flush) and reap; return the exit code."""
        self.send_signal(signal.SIGKILL)
        return self.wait_blocking(timeout)


def start_worker_process(
    args: Sequence[str],
    *,
    ready_file: str | os.PathLike[str],
    python: str | None = None,
    module: str = "pilot_worker",
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log_file: str | os.PathLike[str] | None = None,
    name: str | None = None,
    capture: bool = True,
) -> WorkerProcess:
    """Start a worker process (see :meth:`WorkerProcess.start`); wait with ``wait_ready``.

    Raises:
        OSError: The process could not be started.
    """
    return WorkerProcess.start(
        args,
        ready_file=ready_file,
        python=python,
        module=module,
        command=command,
        env=env,
        cwd=cwd,
        log_file=log_file,
        name=name,
        capture=capture,
    )


@contextlib.asynccontextmanager
async def run_worker_process(
    args: Sequence[str],
    *,
    ready_file: str | os.PathLike[str],
    python: str | None = None,
    module: str = "pilot_worker",
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log_file: str | os.PathLike[str] | None = None,
    capture: bool = True,
    ready_timeout: float = 60.0,
    stop_timeout: float = 30.0,
) -> AsyncGenerator[WorkerProcess, None]:
    """Start ``python -m pilot_worker ARGS --ready-file READY_FILE`` and wait until it serves.

    On exit the process gets SIGTERM (then SIGKILL after ``stop_timeout``)
    unless it already ended. Only this process is signalled.

    Raises:
        EOFError: The worker exited before serving (its output is in the message).
        TimeoutError: It did not serve within ``ready_timeout``.
    """
    proc = start_worker_process(
        args,
        ready_file=ready_file,
        python=python,
        module=module,
        command=command,
        env=env,
        cwd=cwd,
        log_file=log_file,
        capture=capture,
    )
    try:
        await proc.wait_ready(ready_timeout)
        yield proc
    finally:
        await proc.stop(stop_timeout)
