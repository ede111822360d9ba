"""The node's UDP socket: batched reads with the stream layer settled once per batch."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

from pilot_node._node import _READ_BATCH, Node, _UdpEndpoint  # pyright: ignore[reportPrivateUsage]


class _Layer:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def begin_batch(self) -> None:
        self.log.append("begin")

    def end_batch(self) -> None:
        self.log.append("end")


class _FakeNode:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.stats: dict[str, int] = {}
        self.stream_layer = _Layer(self.log)

    def _on_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        self.log.append(data.decode())


async def test_a_readable_socket_is_drained_in_bounded_batches() -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    node = _FakeNode()
    endpoint = _UdpEndpoint(loop, sock, cast(Node, cast(Any, node)))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.settimeout(10)
    try:
        total = _READ_BATCH + 6
        for i in range(total):
            sender.sendto(str(i).encode(), sock.getsockname())
        await asyncio.wait_for(_until(lambda: node.log.count("end") >= 2), 10)
        first_end = node.log.index("end")
        # The first batch stops at the limit, framed by begin/end; the rest follow.
        assert node.log[0] == "begin"
        assert node.log[1:first_end] == [str(i) for i in range(_READ_BATCH)]
        got = [entry for entry in node.log if entry not in ("begin", "end")]
        assert got == [str(i) for i in range(total)]

        # Sends go out directly; after close nothing is sent and reading stops.
        endpoint.sendto(b"out", sender.getsockname())
        assert sender.recv(16) == b"out"
        endpoint.close()
        endpoint.close()
        endpoint.sendto(b"late", sender.getsockname())
        sender.setblocking(False)
        await asyncio.sleep(0)
        try:
            late = sender.recv(16)
        except BlockingIOError:
            late = b""
        assert late == b""
    finally:
        endpoint.close()
        sender.close()


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)
