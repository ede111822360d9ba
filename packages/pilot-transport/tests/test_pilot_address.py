"""Address and SocketAddress: text and wire forms, ordering, rejection of garbage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pilot_transport._address import Address, SocketAddress
from pilot_transport.errors import AddressError

# The shared CI machine is slow and noisy: judge correctness, not speed.
no_deadline = settings(deadline=None)

networks = st.integers(0, 0xFFFF)
nodes = st.integers(0, 0xFFFF_FFFF)
ports = st.integers(0, 0xFFFF)
addresses = st.builds(Address, networks, nodes)
socket_addresses = st.builds(SocketAddress, addresses, ports)


def test_known_forms() -> None:
    assert str(Address(0, 1)) == "0:0000.0000.0001"
    assert str(Address(1, 0x00A3F291)) == "1:0001.00A3.F291"
    assert str(Address(65535, 0xFFFFFFFF)) == "65535:FFFF.FFFF.FFFF"
    assert Address.parse("1:0001.00a3.f291") == Address(1, 0x00A3F291)
    assert Address(1, 0x00A3F291).to_bytes() == b"\x00\x01\x00\xa3\xf2\x91"
    assert SocketAddress.parse("0:0000.0000.0001:7") == SocketAddress(Address(0, 1), 7)
    assert SocketAddress(Address(0, 1), 1002).to_bytes() == b"\x00\x00\x00\x00\x00\x01\x03\xea"
    assert repr(Address(0, 1)) == "Address('0:0000.0000.0001')"


@no_deadline
@given(addresses)
def test_address_text_round_trip(address: Address) -> None:
    assert Address.parse(str(address)) == address
    assert Address.parse(str(address).lower()) == address


@no_deadline
@given(addresses)
def test_address_bytes_round_trip(address: Address) -> None:
    packed = address.to_bytes()
    assert len(packed) == 6
    assert Address.from_bytes(packed) == address
    assert Address.from_bytes(memoryview(bytearray(packed))) == address


@no_deadline
@given(socket_addresses)
def test_socket_address_round_trips(sa: SocketAddress) -> None:
    assert SocketAddress.parse(str(sa)) == sa
    assert SocketAddress.from_bytes(sa.to_bytes()) == sa
    assert sa.to_bytes()[:6] == sa.address.to_bytes()


@no_deadline
@given(addresses, addresses)
def test_ordering_and_hashing_follow_the_numbers(a: Address, b: Address) -> None:
    assert (a < b) == ((a.network, a.node) < (b.network, b.node))
    assert (a == b) == (hash(a) == hash(b) and a.to_bytes() == b.to_bytes())
    # bytes order equals numeric order (big-endian), handy for sorted wire dumps
    assert (a < b) == (a.to_bytes() < b.to_bytes())


@no_deadline
@given(st.binary())
def test_from_bytes_rejects_wrong_lengths(data: bytes) -> None:
    if len(data) == 6:
        assert Address.from_bytes(data).to_bytes() == data
    else:
        with pytest.raises(AddressError, match="6 bytes"):
            Address.from_bytes(data)
    if len(data) == 8:
        assert SocketAddress.from_bytes(data).to_bytes() == data
    else:
        with pytest.raises(AddressError, match="8 bytes"):
            SocketAddress.from_bytes(data)


@no_deadline
@given(st.text(max_size=80))
def test_garbage_text_parses_to_itself_or_raises_address_error(text: str) -> None:
    # Every failure is an AddressError (a ValueError), never IndexError/struct.error/...
    try:
        address = Address.parse(text)
    except AddressError:
        pass
    else:
        # only the canonical form (up to hex case and leading zeros of N) parses
        assert text.split(":")[1].upper() == str(address).split(":")[1]
        assert int(text.split(":")[0]) == address.network
    try:
        sa = SocketAddress.parse(text)
    except AddressError:
        pass
    else:
        assert SocketAddress.parse(str(sa)) == sa


@no_deadline
@given(addresses, st.integers(0, 11), st.characters(exclude_characters="0123456789abcdefABCDEF"))
def test_one_corrupted_character_is_rejected(address: Address, where: int, bad: str) -> None:
    text = str(address)
    # corrupt one character of the hex part, which is always 14 chars long
    start = len(text) - 14
    hex_positions = [i for i in range(start, len(text)) if text[i] != "."]
    i = hex_positions[where]
    corrupted = text[:i] + bad + text[i + 1 :]
    with pytest.raises(AddressError):
        Address.parse(corrupted)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "no ':'"),
        ("0-0000.0000.0001", "no ':'"),
        ("x:0000.0000.0001", "network id 'x'"),
        ("-1:0000.0000.0001", "network id '-1'"),
        ("65536:0000.0000.0001", "network id 65536"),
        ("\u0661:0001.0000.0001", "network id"),  # Arabic-Indic digit one
        ("1_0:000A.0000.0001", "network id"),
        ("0:0000.0000", "three dot-separated groups"),
        ("0:0000.0000.0001.0002", "three dot-separated groups"),
        ("0:0000.000.00001", "hex group '000'"),
        ("0:0000.00G0.0001", "hex group '00G0'"),
        ("0:0000.0000.+001", "hex group '+001'"),
        ("1:0000.0000.0001", "network id mismatch"),
        ("0:0000.0000.0001 ", "hex group '0001 '"),
        ("9" * 100, "too long"),
    ],
)
def test_rejection_names_the_bad_part(text: str, names: str) -> None:
    with pytest.raises(AddressError, match=names.replace("+", r"\+").replace(".", r"\.")):
        Address.parse(text)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("0:0000.0000.0001", "no port"),
        ("0:0000.0000.0001:", "port ''"),
        ("0:0000.0000.0001:65536", "port '65536'"),
        ("0:0000.0000.0001:x", "port 'x'"),
        ("0:0000.0000.001:7", "hex group '001'"),
    ],
)
def test_socket_address_rejection_names_the_bad_part(text: str, names: str) -> None:
    with pytest.raises(AddressError, match=names):
        SocketAddress.parse(text)


def test_constructor_validates() -> None:
    with pytest.raises(AddressError, match="network id 65536"):
        Address(65536, 0)
    with pytest.raises(AddressError, match="node id -1"):
        Address(0, -1)
    with pytest.raises(AddressError, match="node id must be an int"):
        Address(0, True)
    with pytest.raises(AddressError, match="port 70000"):
        SocketAddress(Address(0, 1), 70000)
    with pytest.raises(AddressError, match="must be an Address"):
        SocketAddress("0:0000.0000.0001", 1)  # type: ignore[arg-type]
    with pytest.raises(AddressError, match="must be str"):
        Address.parse(b"0:0000.0000.0001")  # type: ignore[arg-type]


def test_frozen_and_coerce() -> None:
    a = Address(0, 1)
    with pytest.raises(AttributeError):
        a.node = 2  # type: ignore[misc]
    assert Address.coerce("0:0000.0000.0001") is not a
    assert Address.coerce(a) is a
    assert {a, Address(0, 1)} == {a}
    assert sorted([SocketAddress(Address(0, 2), 1), SocketAddress(Address(0, 1), 9)])[0].port == 9
