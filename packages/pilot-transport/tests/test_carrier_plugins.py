"""Carriers added by other distributions through the ``pilot_transport.carriers`` entry points."""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

import pytest
from pilot_transport import Identity, TransportOptions, TrustStore, open_transport
from pilot_transport._carrier import Carrier
from pilot_transport._carriers.memory import MemoryCarrier
from pilot_transport._transport import CARRIER_ENTRY_POINT_GROUP, check_url
from pilot_transport.errors import TransportURLError
from pilot_transport.testing import TestPeers

calls: list[tuple[str, str]] = []


class FakeCarrier(MemoryCarrier):
    """A memory carrier under another scheme: what a plugin carrier looks like."""

    scheme = "fake"


def fake_factory(url: str, identity: Identity, options: TransportOptions) -> Carrier:
    calls.append((url, identity.node_id))
    hub = url.split("://", 1)[1]
    return FakeCarrier(hub, identity.node_id)


def broken_factory(url: str, identity: Identity, options: TransportOptions) -> Any:
    return object()


class _Entry:
    """Quacks like ``importlib.metadata.EntryPoint`` (name, group, load)."""

    def __init__(self, name: str, target: Any) -> None:
        self.name = name
        self.group = CARRIER_ENTRY_POINT_GROUP
        self._target = target

    def load(self) -> Any:
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> list[_Entry]:
    """Replace the installed entry points of the carrier group with a controlled list."""
    entries: list[_Entry] = []
    real = importlib.metadata.entry_points

    def entry_points(**params: Any) -> Any:
        if params.get("group") == CARRIER_ENTRY_POINT_GROUP:
            return list(entries)
        return real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    calls.clear()
    return entries


def test_unknown_scheme_without_a_plugin_names_the_choices(plugins: list[_Entry]) -> None:
    with pytest.raises(TransportURLError, match="unknown transport scheme 'fake'"):
        check_url("fake://hub")
    plugins.append(_Entry("other", fake_factory))
    with pytest.raises(TransportURLError, match=r"other://"):
        check_url("fake://hub")


def test_a_plugin_scheme_passes_the_whole_url(plugins: list[_Entry]) -> None:
    plugins.append(_Entry("fake", fake_factory))
    assert check_url("fake://hub-1?x=1") == ("fake", "fake://hub-1?x=1", 0)
    assert check_url("FAKE://hub-1") == ("fake", "FAKE://hub-1", 0)


def test_builtin_schemes_cannot_be_overridden(plugins: list[_Entry]) -> None:
    plugins.append(_Entry("tcp", fake_factory))
    assert check_url("tcp://127.0.0.1:0") == ("tcp", "127.0.0.1", 0)


async def test_a_transport_runs_over_a_plugin_carrier(
    plugins: list[_Entry], peers: TestPeers
) -> None:
    plugins.append(_Entry("fake", fake_factory))
    url = "fake://plugin-hub"
    async with (
        open_transport(
            url, identity=peers["server"].identity, trust=peers["server"].trust
        ) as server,
        open_transport(
            url, identity=peers["client"].identity, trust=peers["client"].trust
        ) as client,
    ):
        assert client.carrier == "fake"
        assert [node for _, node in calls] == [peers["server"].node_id, peers["client"].node_id]
        listener = await server.listen(9)
        stream, accepted = await asyncio.gather(client.connect("server", 9), listener.accept())
        async with stream, accepted:
            await stream.write(b"over a plugin")
            assert await accepted.read() == b"over a plugin"
            assert accepted.peer.name == "client"  # TLS with pinned keys still on top


async def test_plugin_load_and_type_errors_are_url_errors(plugins: list[_Entry]) -> None:
    plugins.append(_Entry("broken", broken_factory))
    plugins.append(_Entry("missing", ImportError("no module named nowhere")))
    for url, message in (("broken://x", "not a Carrier"), ("missing://x", "could not be loaded")):
        with pytest.raises(TransportURLError, match=message):
            await open_transport(url, identity=Identity.generate(), trust=TrustStore.in_memory())
