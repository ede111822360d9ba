"""The TLS layer on its own, over in-memory carrier pairs: who gets in, with what error."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import pytest
from pilot_transport import Identity, SecureStream, TrustedPeer, TrustStore
from pilot_transport._carriers.memory import memory_stream_pair
from pilot_transport._tls import TLSConfig, _is_truncation, client_handshake, server_handshake
from pilot_transport.errors import (
    HandshakeError,
    PeerIdentityMismatchError,
    PeerNotTrustedError,
    RejectedByPeerError,
    StreamResetError,
)


def _store(*pairs: tuple[str, Identity]) -> TrustStore:
    return TrustStore.in_memory(TrustedPeer(name, identity.public_key) for name, identity in pairs)


ALICE = Identity.generate()
BOB = Identity.generate()
MALLORY = Identity.generate()


async def _shake(
    client: TLSConfig, server: TLSConfig, *, expected_key: bytes | None = None
) -> tuple[SecureStream | BaseException, SecureStream | BaseException]:
    a, b = memory_stream_pair()
    results = await asyncio.gather(
        client_handshake(a, client, expected_key=expected_key, expected_name="bob", target="bob"),
        server_handshake(b, server),
        return_exceptions=True,
    )
    return results[0], results[1]


async def test_mutual_trust_gives_authenticated_streams() -> None:
    client, server = await _shake(
        TLSConfig(ALICE, _store(("bob", BOB))), TLSConfig(BOB, _store(("alice", ALICE)))
    )
    assert isinstance(client, SecureStream)
    assert isinstance(server, SecureStream)
    assert client.peer.name == "bob"
    assert client.peer.public_key == BOB.public_key
    assert client.peer.node_id == BOB.node_id
    assert client.peer.fingerprint == BOB.fingerprint
    assert server.peer.name == "alice"
    assert server.peer.node_id == ALICE.node_id
    assert client.local.node_id == ALICE.node_id
    await client.write(b"ping")
    assert await server.read() == b"ping"
    assert client._sslobj.version() == "TLSv1.3"
    await client.aclose()
    await server.aclose()


async def test_untrusted_client_is_refused_on_both_sides_with_fingerprints() -> None:
    client, server = await _shake(
        TLSConfig(MALLORY, _store(("bob", BOB))), TLSConfig(BOB, _store(("alice", ALICE)))
    )
    assert isinstance(client, RejectedByPeerError)
    assert client.fingerprint == MALLORY.fingerprint
    assert MALLORY.fingerprint in str(client)
    assert MALLORY.public_key_text in str(client)
    assert isinstance(server, PeerNotTrustedError)
    assert server.fingerprint == MALLORY.fingerprint
    assert f"trust add NAME {MALLORY.public_key_text}" in str(server)


async def test_untrusted_server_is_refused_on_both_sides_with_fingerprints() -> None:
    client, server = await _shake(
        TLSConfig(ALICE, _store(("bob", BOB))), TLSConfig(MALLORY, _store(("alice", ALICE)))
    )
    assert isinstance(client, PeerNotTrustedError)
    assert client.fingerprint == MALLORY.fingerprint
    assert f"trust add bob {MALLORY.public_key_text}" in str(client)
    assert isinstance(server, RejectedByPeerError)
    assert server.fingerprint == MALLORY.fingerprint


async def test_trusted_but_wrong_peer_is_an_identity_mismatch() -> None:
    client, _server = await _shake(
        TLSConfig(ALICE, _store(("bob", BOB), ("mallory", MALLORY))),
        TLSConfig(MALLORY, _store(("alice", ALICE))),
        expected_key=BOB.public_key,
    )
    assert isinstance(client, PeerIdentityMismatchError)
    assert "mallory" in str(client)


async def test_a_trusted_peer_cannot_vouch_for_another_key() -> None:
    # Bob is trusted; he signs a leaf for Mallory's key under his own anchor
    # name. OpenSSL accepts the chain; the key check after the handshake must not.
    from pilot_transport import _tls

    real_leaf = _tls._leaf_certificate

    def forged_leaf(identity: Identity) -> object:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
            .issuer_name(_tls._anchor_name(BOB.public_key))
            .public_key(identity.private_key.public_key())
            .serial_number(7)
            .not_valid_before(_tls._NOT_BEFORE)
            .not_valid_after(_tls._NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(BOB.private_key, algorithm=None)
        )

    _tls._leaf_certificate = forged_leaf  # type: ignore[assignment]
    try:
        forged = TLSConfig(MALLORY, _store(("alice", ALICE)))
    finally:
        _tls._leaf_certificate = real_leaf
    client, server = await _shake(forged, TLSConfig(ALICE, _store(("bob", BOB))))
    assert isinstance(server, PeerNotTrustedError)
    assert not isinstance(client, SecureStream)


async def test_trust_changes_apply_to_the_next_handshake() -> None:
    server_trust = _store()
    server = TLSConfig(BOB, server_trust)
    client = TLSConfig(ALICE, _store(("bob", BOB)))
    first, _ = await _shake(client, server)
    assert isinstance(first, RejectedByPeerError)
    server_trust.add(TrustedPeer("alice", ALICE.public_key))
    second, accepted = await _shake(client, server)
    assert isinstance(second, SecureStream)
    assert isinstance(accepted, SecureStream)
    server_trust.remove("alice")
    third, _ = await _shake(client, server)
    assert isinstance(third, RejectedByPeerError)


async def test_garbage_instead_of_a_preamble_is_a_handshake_error() -> None:
    a, b = memory_stream_pair()
    await a.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 64)
    with pytest.raises(HandshakeError, match="does not speak pilot-transport"):
        await server_handshake(b, TLSConfig(BOB, _store(("alice", ALICE))))


async def test_peer_closing_during_handshake() -> None:
    a, b = memory_stream_pair()
    await a.aclose()
    with pytest.raises(HandshakeError, match="closed the connection"):
        await server_handshake(b, TLSConfig(BOB, _store(("alice", ALICE))))


@pytest.fixture(params=["interpreter-defaults", "ignore-unexpected-eof-on"])
def context_defaults(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with this interpreter's SSL defaults, and with Debian's."""
    if request.param == "ignore-unexpected-eof-on":
        original = ssl.SSLContext.__new__

        def new(cls: type[ssl.SSLContext], *args: Any, **kwargs: Any) -> ssl.SSLContext:
            context = original(cls, *args, **kwargs)
            context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
            return context

        monkeypatch.setattr(ssl.SSLContext, "__new__", new)
    return str(request.param)


def test_every_context_clears_ignore_unexpected_eof(context_defaults: str) -> None:
    client_context, server_context = TLSConfig(ALICE, _store(("bob", BOB))).contexts()
    for context in (client_context, server_context):
        assert not context.options & ssl.OP_IGNORE_UNEXPECTED_EOF


def test_both_truncation_forms_are_recognised() -> None:
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    plain = ssl.SSLError(1, "[SSL: UNEXPECTED_EOF_WHILE_READING] unexpected eof while reading")
    plain.reason = "UNEXPECTED_EOF_WHILE_READING"
    other = ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad record mac")
    other.reason = "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"
    assert _is_truncation(eof)
    assert _is_truncation(plain)
    assert not _is_truncation(other)


async def test_truncated_stream_is_a_reset_not_an_eof(context_defaults: str) -> None:
    client, server = await _shake(
        TLSConfig(ALICE, _store(("bob", BOB))), TLSConfig(BOB, _store(("alice", ALICE)))
    )
    assert isinstance(client, SecureStream)
    assert isinstance(server, SecureStream)
    await client.write(b"partial")
    # The carrier ends without a TLS close: like a peer killed mid-stream.
    await client._carrier.write_eof()
    assert await server.read() == b"partial"
    with pytest.raises(StreamResetError, match="without a TLS close"):
        await server.read()
    with pytest.raises(StreamResetError):
        await server.read()


async def test_reading_side_sees_reset_when_the_carrier_resets() -> None:
    client, server = await _shake(
        TLSConfig(ALICE, _store(("bob", BOB))), TLSConfig(BOB, _store(("alice", ALICE)))
    )
    assert isinstance(client, SecureStream)
    assert isinstance(server, SecureStream)
    reader = asyncio.create_task(server.read())
    client._carrier._reset()  # type: ignore[attr-defined]
    with pytest.raises(StreamResetError):
        await asyncio.wait_for(reader, 5)


def test_leaf_certificate_shape() -> None:
    from cryptography import x509
    from pilot_transport._tls import _anchor_name, _leaf_certificate

    leaf = _leaf_certificate(ALICE)
    assert leaf.issuer == _anchor_name(ALICE.public_key)
    assert leaf.subject != leaf.issuer  # not self-issued by name
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is False


async def test_large_bidirectional_transfer_over_tls() -> None:
    client, server = await _shake(
        TLSConfig(ALICE, _store(("bob", BOB))), TLSConfig(BOB, _store(("alice", ALICE)))
    )
    assert isinstance(client, SecureStream)
    assert isinstance(server, SecureStream)
    data = bytes(range(256)) * 20_000

    async def drain(stream: SecureStream, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunks += await stream.read(1 << 20)
        return bytes(chunks)

    _, got = await asyncio.gather(client.write(data), drain(server, len(data)))
    assert got == data


async def test_failed_handshake_logs_nothing_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await _shake(TLSConfig(MALLORY, _store(("bob", BOB))), TLSConfig(BOB, _store()))
    assert "PRIVATE KEY" not in caplog.text


async def test_a_large_read_returns_every_record_already_received() -> None:
    # OpenSSL hands out one record (at most 16 KiB) per call; a read asking for
    # more gathers the records already buffered into one result.
    client, server = await _shake(
        TLSConfig(ALICE, _store(("bob", BOB))), TLSConfig(BOB, _store(("alice", ALICE)))
    )
    assert isinstance(client, SecureStream)
    assert isinstance(server, SecureStream)
    data = bytes(range(256)) * 400  # 100 KiB: seven records
    await client.write(data)
    await client.write_eof()
    got = await server.read(1 << 20)
    assert len(got) > 16 * 1024
    rest = bytearray()
    while more := await server.read(1 << 20):
        rest += more
    assert got + rest == data
    await client.aclose()
    await server.aclose()
