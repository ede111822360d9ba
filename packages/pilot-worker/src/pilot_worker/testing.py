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
import sys
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from pilot_worker._codec import PayloadCodec
from pilot_worker._config import WorkerConfig
from pilot_worker._context import Context
from pilot_worker._handler import HandlerKind, HandlerSpec
from pilot_worker._server import Middleware, WorkerServer

__all__ = ["FakePeer", "OfflineCall", "WorkerTestClient", "make_context", "make_peer"]

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


class WorkerProcess:
    """A ``pilot-worker`` child process started by :func:`run_worker_process`.

    Attributes:
        process: The ``asyncio.subprocess.Process``.
        info: The ready file's content: ``node_id``, ``endpoint``
            (``"127.0.0.1:PORT"`` on tcp://), ``port``, ``pid``, ``metrics_port``,
            ``handlers``.
        logs: Every stderr line so far (bounded to the last 20,000).
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.info: dict[str, Any] = {}
        self.logs: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read_stderr())

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _read_stderr(self) -> None:
        stream = self.process.stderr
        if stream is None:
            return
        while True:
            line = await stream.readline()
            async with self._changed:
                if line:
                    self.logs.append(line.decode("utf-8", "replace").rstrip("\n"))
                    del self.logs[:-_MAX_LOG_LINES]
                self._changed.notify_all()
            if not line:
                return

    async def wait_for_log(
        self,
        match: str | Callable[[str], bool],
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - a bound on waiting for output
        start: int = 0,
    ) -> str:
        """Wait for a stderr line containing ``match`` (or satisfying it); return it.

        Lines before index ``start`` of :attr:`logs` are ignored (pass
        ``len(proc.logs)`` to wait for a *new* line).

        Raises:
            TimeoutError: No such line within ``timeout``; the message shows
                the last lines.
            EOFError: The process closed stderr (exited) first.
        """
        test: Callable[[str], bool] = (
            (lambda line: match in line) if isinstance(match, str) else match
        )
        seen = start
        try:
            async with asyncio.timeout(timeout), self._changed:
                while True:
                    for line in self.logs[seen:]:
                        if test(line):
                            return line
                    seen = max(seen, len(self.logs))
                    if self._reader.done():
                        raise EOFError(
                            f"worker exited ({self.process.returncode}) before logging "
                            f"{match!r}; last lines:\n" + "\n".join(self.logs[-20:])
                        )
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"no log line matching {match!r} within {timeout}s; last lines:\n"
                + "\n".join(self.logs[-20:])
            ) from None

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to this process (and only this process)."""
        if self.process.returncode is None:
            self.process.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """Wait for the process to exit; return its exit code.

        Raises:
            TimeoutError: It is still running after ``timeout``.
        """
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await self._reader
        return code

    async def stop(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit code."""
        if self.process.returncode is None:
            self.process.terminate()
        try:
            return await self.wait(timeout)
        except TimeoutError:
            self.process.kill()
            return await self.wait(10)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@contextlib.asynccontextmanager
async def run_worker_process(
    args: Sequence[str],
    *,
    ready_file: str | os.PathLike[str],
    python: str | None = None,
    module: str = "pilot_worker",
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    ready_timeout: float = 60.0,
    stop_timeout: float = 30.0,
) -> AsyncGenerator[WorkerProcess, None]:
    """Start ``python -m pilot_worker ARGS --ready-file READY_FILE`` and wait until it serves.

    On exit the process gets SIGTERM (then SIGKILL after ``stop_timeout``)
    unless it already ended. Only this process is signalled.

    Raises:
        EOFError: The worker exited before serving (its stderr is in the message).
        TimeoutError: It did not serve within ``ready_timeout``.
    """
    ready = os.fspath(ready_file)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ready)
    process = await asyncio.create_subprocess_exec(
        python or sys.executable,
        "-m",
        module,
        *args,
        "--ready-file",
        ready,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else dict(env),
        cwd=None if cwd is None else str(cwd),
    )
    proc = WorkerProcess(process)
    try:
        await proc.wait_for_log("serving node_id=", timeout=ready_timeout)
        proc.info = _read_json(ready)
        yield proc
    finally:
        await proc.stop(stop_timeout)
