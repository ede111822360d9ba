"""Beacon message codecs against literal bytes."""

from __future__ import annotations

import pytest
from pilot_node import TunnelError
from pilot_node._beacon import (
    decode_endpoint,
    decode_relay_deliver,
    discover,
    punch_request,
    relay,
)


def test_beacon_messages() -> None:
    assert discover(2) == b"\x01\x00\x00\x00\x02"
    assert punch_request(1, 2) == b"\x03\x00\x00\x00\x01\x00\x00\x00\x02"
    assert relay(1, 2, b"PILA") == b"\x05\x00\x00\x00\x01\x00\x00\x00\x02PILA"
    assert decode_endpoint(b"\x02\x04\x7f\x00\x00\x01\xc2\x60") == ("127.0.0.1", 49760)
    assert decode_relay_deliver(b"\x06\x00\x00\x00\x01PILS") == (1, b"PILS")


@pytest.mark.parametrize(
    "data", [b"\x02", b"\x02\x05\x01\x02\x03\x04\x05\x00\x01", b"\x02\x04\x7f"]
)
def test_malformed_endpoints_are_refused(data: bytes) -> None:
    with pytest.raises(TunnelError):
        decode_endpoint(data)
