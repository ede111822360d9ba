from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import settings
from pilot_transport import Transport, open_transport
from pilot_transport.testing import TestPeers, create_test_peers

# The CI machine is shared and loaded: judge properties, not speed.
settings.register_profile("pilot-transport", deadline=None)
settings.load_profile("pilot-transport")

_hub_numbers = itertools.count()


@pytest.fixture
def peers(tmp_path: Path) -> TestPeers:
    return create_test_peers(tmp_path / "peers", ["client", "server", "other"])


@pytest.fixture
def hub() -> str:
    return f"memory://test-hub-{next(_hub_numbers)}"


@pytest.fixture
async def tcp_pair(peers: TestPeers) -> AsyncIterator[tuple[Transport, Transport]]:
    """(client, server) transports on tcp://127.0.0.1:0; the server listens on port 7."""
    async with (
        open_transport(
            "tcp://127.0.0.1:0", identity=peers["server"].identity, trust=peers["server"].trust
        ) as server,
        open_transport(
            "tcp://127.0.0.1:0", identity=peers["client"].identity, trust=peers["client"].trust
        ) as client,
    ):
        yield client, server
