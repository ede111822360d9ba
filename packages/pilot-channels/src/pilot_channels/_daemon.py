"""Adapter to a Pilot daemon's built-in event stream (port 1002).

Wire format (pilot-transport's PILOT-DAEMON.md): each event is ``[u16 topic_len][topic][u32
len][payload]``, big-endian. The first event a stream sends is its
subscription (``*`` = every topic); later events are publishes, fanned out by
the daemon to its other subscribers. There are no acknowledgements, no
persistence and no replay, so over a daemon every topic is at-most-once,
events carry no publisher identity (``Event.publisher`` is None) and no offset,
and a publish returns once the bytes are handed to the daemon.

The daemon's broker knows exact topics and ``*`` only: a pattern with
wildcards subscribes to ``*`` and is filtered here. The daemon wedges when a
reader stops reading, so a reader task always drains the stream into a bounded
queue; when the application falls behind, the oldest events are dropped and
counted (``PilotChannel.dropped``), whatever policy was asked for.

The daemon does not authenticate stream peers (pilot-transport's PILOT-DAEMON.md): treat events
from its event stream as coming from any node that can reach that daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pilot_transport.daemon import DEFAULT_SOCKET_PATH, PilotCarrier, PilotStream

from ._errmap import from_lower
from ._tasks import cancel_and_wait
from ._topics import compile_pattern
from .errors import (
    BrokerProtocolError,
    BrokerUnavailableError,
    ChannelConfigError,
    PayloadTooLargeError,
)

__all__ = [
    "DAEMON_EVENT_PORT",
    "DaemonBackend",
    "EventDecoder",
    "encode_event",
]

logger = logging.getLogger("pilot_channels.daemon")

DAEMON_EVENT_PORT = 1002
DEFAULT_MAX_PAYLOAD = 1024 * 1024
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def encode_event(topic: str, payload: bytes) -> bytes:
    """One event in the daemon's framing.

    Raises:
        ChannelConfigError: the topic is longer than 65,535 UTF-8 bytes.
    """
    raw = topic.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ChannelConfigError("a daemon event topic is at most 65,535 bytes")
    return b"".join((_U16.pack(len(raw)), raw, _U32.pack(len(payload)), payload))


class EventDecoder:
    """Sans-IO decoder: bytes in, ``(topic, payload)`` events out.

    Args:
        max_payload: larger announced payloads raise BrokerProtocolError before
            anything is buffered for them.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """Add bytes; return every complete event.

        Raises:
            BrokerProtocolError: an event announces a payload above the limit.
        """
        buf = self._buf
        buf += data
        events: list[tuple[str, bytes]] = []
        start = 0
        while True:
            if len(buf) - start < 2:
                break
            (tlen,) = _U16.unpack_from(buf, start)
            head = start + 2 + tlen + 4
            if len(buf) < head:
                break
            (plen,) = _U32.unpack_from(buf, start + 2 + tlen)
            if plen > self._max:
                raise BrokerProtocolError(
                    f"daemon event of {plen} bytes exceeds the limit of {self._max} bytes"
                )
            end = head + plen
            if len(buf) < end:
                break
            topic = bytes(buf[start + 2 : start + 2 + tlen]).decode("utf-8", "replace")
            events.append((topic, bytes(buf[head:end])))
            start = end
        if start:
            del buf[:start]
        return events

    @property
    def buffered(self) -> int:
        return len(self._buf)


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    raise ChannelConfigError(
        f"a Pilot daemon's event stream carries bytes: publish bytes or str, "
        f"not {type(payload).__name__}"
    )


class DaemonBackend:
    """A client backend over a Pilot daemon's port-1002 event stream.

    Args:
        socket_path: the local daemon's Unix socket.
        address: Pilot address of the daemon whose broker to use (default:
            the local daemon itself).
        carrier: an existing :class:`PilotCarrier` to share (not closed here).
        max_payload: largest payload accepted in either direction.
        queue_size: events buffered per subscription before the oldest drop.
    """

    def __init__(
        self,
        *,
        socket_path: str | None = None,
        address: str | None = None,
        carrier: PilotCarrier | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        queue_size: int = 4096,
    ) -> None:
        socket_path = socket_path or DEFAULT_SOCKET_PATH
        self._carrier = carrier if carrier is not None else PilotCarrier(socket_path)
        self._owns = carrier is None
        self._address = address
        self._max = max_payload
        self._queue_size = queue_size
        self._pub_stream: PilotStream | None = None
        self._pub_drain: asyncio.Task[None] | None = None
        self._pub_lock = asyncio.Lock()
        self.description = f"Pilot daemon event stream ({address or 'local'} via {socket_path})"

    async def _open(self, first_topic: str) -> PilotStream:
        try:
            address = self._address or str(await self._carrier.address())
            stream = await self._carrier.open_raw_stream(address, DAEMON_EVENT_PORT)
            await stream.write(encode_event(first_topic, b""))
        except Exception as exc:
            raise from_lower(exc, what=self.description) from exc
        return stream

    @asynccontextmanager
    async def subscribe(self, request: dict[str, Any]) -> AsyncGenerator[AsyncIterator[Any]]:
        pattern = compile_pattern(str(request.get("pattern")))
        wanted = pattern.text if pattern.is_exact else "*"
        size = request.get("queue") or self._queue_size
        stream = await self._open(wanted)
        queue: deque[list[Any]] = deque()
        state = {"dropped": 0}
        ready = asyncio.Event()
        failure: list[BaseException] = []

        async def reader() -> None:
            decoder = EventDecoder(self._max)
            try:
                while True:
                    data = await stream.read(65536)
                    if not data:
                        raise BrokerUnavailableError(f"{self.description} ended the stream")
                    now = time.time()
                    for topic, payload in decoder.feed(data):
                        if not pattern.matches(topic):
                            continue
                        if len(queue) >= size:
                            queue.popleft()
                            state["dropped"] += 1
                        queue.append([topic, payload, None, now, None])
                    if queue:
                        ready.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure.append(exc)
                ready.set()

        task = asyncio.get_running_loop().create_task(reader(), name="pilot-channels daemon reader")

        async def items() -> AsyncGenerator[Any]:
            yield {"ready": {"cursor": None, "daemon": True}}
            while True:
                if queue:
                    batch = list(queue)
                    queue.clear()
                    yield {"ev": batch, "dropped": state["dropped"]}
                    continue
                if failure:
                    exc = failure[0]
                    raise from_lower(exc, what=self.description) from exc
                ready.clear()
                await ready.wait()

        gen = items()
        try:
            yield gen
        finally:
            await cancel_and_wait(task)
            await gen.aclose()
            await stream.aclose()

    async def _publisher_stream(self) -> PilotStream:
        stream = self._pub_stream
        if stream is not None:
            return stream
        # The first event is a subscription: a private topic, so the daemon sends
        # this stream nothing but what is published to that name; still drained.
        stream = await self._open(f"_pilot_channels.publisher.{secrets.token_hex(8)}")

        async def drain() -> None:
            with contextlib.suppress(Exception):
                while await stream.read(65536):
                    pass

        self._pub_stream = stream
        self._pub_drain = asyncio.get_running_loop().create_task(drain())
        return stream

    async def _drop_publisher_stream(self) -> None:
        stream, self._pub_stream = self._pub_stream, None
        task, self._pub_drain = self._pub_drain, None
        if task is not None:
            await cancel_and_wait(task)
        if stream is not None:
            await stream.aclose()

    async def publish(self, events: list[list[Any]], timeout: float) -> list[int | None]:  # noqa: ASYNC109
        frames: list[bytes] = []
        for topic, payload in events:
            data = _payload_bytes(payload)
            if len(data) > self._max:
                raise PayloadTooLargeError(
                    f"payload of {len(data)} bytes exceeds the limit of {self._max} bytes"
                )
            frames.append(encode_event(str(topic), data))
        async with self._pub_lock:
            try:
                async with asyncio.timeout(timeout):
                    stream = await self._publisher_stream()
                    # One write for the whole batch: the daemon delays small writes
                    # that follow unacknowledged data (Nagle), so never split them.
                    await stream.write(b"".join(frames))
            except Exception as exc:
                await self._drop_publisher_stream()
                raise from_lower(exc, what=self.description) from exc
        return [None] * len(events)

    async def call(self, method: str, request: Any, timeout: float) -> Any:  # noqa: ASYNC109
        raise ChannelConfigError(f"{method} is not available on a Pilot daemon's event stream")

    async def aclose(self) -> None:
        await self._drop_publisher_stream()
        if self._owns:
            await self._carrier.aclose()
