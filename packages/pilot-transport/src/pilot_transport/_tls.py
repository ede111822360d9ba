"""The security layer: TLS 1.3 with mutual authentication over any carrier stream.

Theory of operation
-------------------

One code path for every carrier: an :class:`ssl.SSLObject` between two
:class:`ssl.MemoryBIO` buffers, pumped by hand over a :class:`CarrierStream`.
The carrier moves ciphertext; it never sees plaintext nor decides trust.

Certificates. Python's ``ssl`` cannot take a verification callback, so trust
is expressed as certificates OpenSSL verifies natively:

- each side presents a *leaf* certificate for its Ed25519 key: subject
  ``CN=<node id>``, issuer ``CN=pilot-anchor, serialNumber=<hex of the key>``
  (the *anchor name* of that key), ``CA:FALSE``, signed with the key itself.
  It is self-signed cryptographically but not self-issued by name, so OpenSSL
  takes its ordinary chain path instead of the depth-zero self-signed one;
- for every trusted key we synthesise a *trust anchor*: subject = that key's
  anchor name, public key = the trusted key, ``CA:TRUE``. OpenSSL checks the
  leaf's signature with the anchor's public key (and does not check the
  anchor's own signature, so a throwaway key signs it). A leaf verifies
  against an anchor only if it was signed by the trusted key, and the TLS
  CertificateVerify proves the peer holds the leaf's key right now.

After the handshake we check again that the leaf's key itself is in the trust
store (a trusted peer could otherwise sign a leaf for another key) and, when we
dialled a named peer, that it is exactly that peer's key.

Both contexts are rebuilt when the trust store's version changes, so trust
edits apply to the next handshake without a restart.

Preamble. Before the first TLS flight each side sends ``PLT1`` + its 32-byte
public key in clear, in the same write as its first flight (no extra round
trip). It is used only to show the fingerprint of a refused peer in errors
and logs; the certificate is what is verified.

Confirmation. In TLS 1.3 the client finishes its handshake before the server
has checked the client certificate. So the server sends one application byte
(``0x01``) once it has accepted the client, and the client's ``connect``
returns only after reading it: a client the server refuses gets
:class:`RejectedByPeerError` from ``connect`` and never a stream that fails
later.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import ssl
import tempfile
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from pilot_transport._address import Address, SocketAddress
from pilot_transport._carrier import CarrierStream
from pilot_transport._identity import Identity, encode_public_key, fingerprint_of
from pilot_transport._peer import PeerInfo
from pilot_transport._trust import TrustedPeer, TrustStore
from pilot_transport.errors import (
    HandshakeError,
    PeerIdentityMismatchError,
    PeerNotTrustedError,
    RejectedByPeerError,
    StreamClosedError,
    StreamResetError,
    TransportError,
)

__all__ = ["SecureStream", "TLSConfig", "client_handshake", "server_handshake"]

logger = logging.getLogger("pilot_transport.tls")

_ANCHOR_CN = "pilot-anchor"
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
_PREAMBLE_MAGIC = b"PLT1"
_PREAMBLE_SIZE = len(_PREAMBLE_MAGIC) + 32
_CONFIRM = b"\x01"
_READ_CHUNK = 256 * 1024
"""Ciphertext read from the carrier per call: big, so bulk reads take few calls."""
_WRITE_CHUNK = 256 * 1024
"""Plaintext encrypted per carrier write: bounds memory, lets backpressure act."""
_RECORD_PLAIN = 16 * 1024
"""Largest plaintext of one TLS record."""
_RECORD_OVERHEAD = 64
"""More than TLS 1.3 adds to a record (5-byte header, content type, 16-byte AEAD tag)."""
_MAX_READ = 1024 * 1024
"""Largest single read."""
_RECORD_READ = 16 * 1024
"""Plaintext asked of one ``SSLObject.read`` call. A call returns at most one TLS
record (at most 16 KiB of plaintext) but allocates its whole ``n`` up front: a
256 KiB request costs about 17 us against 2 us for 16 KiB, per record."""
_CLOSE_NOTIFY_TIMEOUT = 1.0
_IGNORE_UNEXPECTED_EOF: int = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
_TRUNCATION_REASONS = frozenset(
    {"UNEXPECTED_EOF_WHILE_READING", "EOF_OCCURRED_IN_VIOLATION_OF_PROTOCOL"}
)


def _is_truncation(exc: ssl.SSLError) -> bool:
    """Whether ``exc`` says the carrier ended without a TLS close.

    OpenSSL reports it as :class:`ssl.SSLEOFError` or, on some builds, as a
    plain :class:`ssl.SSLError` whose reason is ``UNEXPECTED_EOF_WHILE_READING``.
    """
    return isinstance(exc, ssl.SSLEOFError) or exc.reason in _TRUNCATION_REASONS


_REJECTED_REASONS = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    }
)


# -- certificates --------------------------------------------------------------


def _anchor_name(public_key: bytes) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, _ANCHOR_CN),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, public_key.hex()),
        ]
    )


def _serial(public_key: bytes, tag: bytes) -> int:
    return int.from_bytes(hashlib.sha256(tag + public_key).digest()[:16], "big") >> 1 | 1


def _leaf_certificate(identity: Identity) -> x509.Certificate:
    public = identity.private_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id)]))
        .issuer_name(_anchor_name(identity.public_key))
        .public_key(public)
        .serial_number(_serial(identity.public_key, b"leaf"))
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(identity.private_key, algorithm=None)
    )


_anchor_signer: Ed25519PrivateKey | None = None
_anchor_cache: dict[bytes, bytes] = {}


def _anchor_der(public_key: bytes) -> bytes:
    """DER of the synthetic trust anchor for ``public_key`` (cached per key)."""
    global _anchor_signer
    der = _anchor_cache.get(public_key)
    if der is not None:
        return der
    if _anchor_signer is None:
        _anchor_signer = Ed25519PrivateKey.generate()
    key = Ed25519PublicKey.from_public_bytes(public_key)
    name = _anchor_name(public_key)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key)
        .serial_number(_serial(public_key, b"anchor"))
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .sign(_anchor_signer, algorithm=None)
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    if len(_anchor_cache) > 4096:
        _anchor_cache.clear()
    _anchor_cache[public_key] = der
    return der


def _peer_public_key(sslobj: ssl.SSLObject) -> bytes:
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        raise HandshakeError("the peer presented no certificate")
    key = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise HandshakeError(f"the peer's certificate key is {type(key).__name__}, not Ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class TLSConfig:
    """Our certificate plus SSL contexts that follow the trust store.

    Contexts are cached per trust-store version and rebuilt on change.
    """

    def __init__(self, identity: Identity, trust: TrustStore) -> None:
        self.identity = identity
        self.trust = trust
        certificate = _leaf_certificate(identity)
        self._chain_pem = (
            certificate.public_bytes(serialization.Encoding.PEM) + identity.private_key_pem()
        )
        self._version: int | None = None
        self._client: ssl.SSLContext | None = None
        self._server: ssl.SSLContext | None = None
        self.preamble = _PREAMBLE_MAGIC + identity.public_key

    def contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        """``(client_context, server_context)`` for the current trust store content."""
        version = self.trust.version
        if version != self._version or self._client is None or self._server is None:
            keys = self.trust.public_keys()
            cadata = b"".join(_anchor_der(key) for key in sorted(keys))
            self._client = self._build(ssl.PROTOCOL_TLS_CLIENT, cadata)
            self._server = self._build(ssl.PROTOCOL_TLS_SERVER, cadata)
            self._version = version
        return self._client, self._server

    def _build(self, protocol: int, cadata: bytes) -> ssl.SSLContext:
        context = ssl.SSLContext(protocol)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.maximum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        # Some builds (Debian's Python) turn this on by default: it makes a peer that
        # vanished mid-stream read as a clean end of data. Truncation must be an error.
        context.options &= ~_IGNORE_UNEXPECTED_EOF
        if protocol == ssl.PROTOCOL_TLS_SERVER:
            context.num_tickets = 0  # no session resumption: nothing to gain, bytes to save
        if cadata:
            context.load_verify_locations(cadata=cadata)
        # ssl can load a certificate chain only from a file: a 0600 temp file, removed at once.
        fd, name = tempfile.mkstemp(prefix="pilot-cert-", suffix=".pem")
        try:
            os.write(fd, self._chain_pem)
            os.close(fd)
            context.load_cert_chain(name)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)
        return context


# -- the handshake ---------------------------------------------------------------


class _Handshake:
    """Drives ``do_handshake`` over a carrier stream and parses the peer's preamble."""

    def __init__(self, stream: CarrierStream, config: TLSConfig, *, server_side: bool) -> None:
        self.stream = stream
        self.config = config
        client_context, server_context = config.contexts()
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        context = server_context if server_side else client_context
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self.server_side = server_side
        self.preamble_pending = True
        self.claim = bytearray()
        self.claimed_key: bytes | None = None

    async def flush(self) -> None:
        data = self.outgoing.read()
        if not data:
            return  # never write first out of turn: a small-buffer carrier would deadlock
        if self.preamble_pending:
            self.preamble_pending = False
            data = self.config.preamble + data
        await self.stream.write(data)

    async def receive(self) -> None:
        data = await self.stream.read(_READ_CHUNK)
        if not data:
            raise _PeerClosed
        if self.claimed_key is None and len(self.claim) < _PREAMBLE_SIZE:
            need = _PREAMBLE_SIZE - len(self.claim)
            self.claim += data[:need]
            data = data[need:]
            if len(self.claim) == _PREAMBLE_SIZE:
                if not self.claim.startswith(_PREAMBLE_MAGIC):
                    raise HandshakeError("the peer does not speak pilot-transport (bad preamble)")
                self.claimed_key = bytes(self.claim[len(_PREAMBLE_MAGIC) :])
        if data:
            self.incoming.write(data)

    async def run(self) -> None:
        while True:
            try:
                self.sslobj.do_handshake()
            except ssl.SSLWantReadError:
                await self.flush()
                await self.receive()
            else:
                await self.flush()
                return

    async def read_confirmation(self) -> None:
        while True:
            try:
                data = self.sslobj.read(1)
            except ssl.SSLWantReadError:
                await self.flush()
                await self.receive()
                continue
            except ssl.SSLZeroReturnError:
                raise _PeerClosed from None
            if data == _CONFIRM:
                return
            raise HandshakeError(f"the peer sent {data!r} instead of its acceptance")

    async def send_confirmation(self) -> None:
        self.sslobj.write(_CONFIRM)
        await self.flush()

    async def send_alert(self) -> None:
        """Best effort: deliver the alert OpenSSL queued, so the peer learns why."""
        if not self.outgoing.pending:
            return
        with contextlib.suppress(TransportError, TimeoutError):
            async with asyncio.timeout(_CLOSE_NOTIFY_TIMEOUT):
                await self.flush()

    def trusted_peer(self, who: str) -> TrustedPeer:
        """Our trust-store entry for the key the peer proved in the finished handshake.

        Raises:
            PeerNotTrustedError: the key is not in our trust store.
        """
        public_key = _peer_public_key(self.sslobj)
        entry = self.config.trust.by_public_key(public_key)
        if entry is None:
            raise PeerNotTrustedError(
                f"{who} proved key {fingerprint_of(public_key)}, which is not in our trust store",
                fingerprint=fingerprint_of(public_key),
            )
        return entry

    def secure_stream(self, entry: TrustedPeer) -> SecureStream:
        """The secure stream over the carrier stream, once both sides accepted each other."""
        return SecureStream(
            self.stream,
            self.sslobj,
            self.incoming,
            self.outgoing,
            peer=_peer_info(entry, self.stream),
            local=PeerInfo.of_identity(self.config.identity),
        )

    def claimed(self) -> tuple[str, str]:
        """(fingerprint, base64 key) the peer claims in its preamble, for messages."""
        if self.claimed_key is None:
            return "(unknown: it sent no key)", "<its public key>"
        return fingerprint_of(self.claimed_key), encode_public_key(self.claimed_key)


class _PeerClosed(Exception):
    pass


class AbandonedHandshakeError(HandshakeError):
    """An inbound dialler hung up before presenting a certificate.

    An abandoned dial or a port probe, not a refusal: the listener logs it
    quietly instead of as a refused connection.
    """


def _map_error(
    exc: BaseException, shake: _Handshake, *, who: str, expected_name: str | None
) -> HandshakeError:
    """Translate a failed handshake into our errors, with fingerprints an operator can act on."""
    fingerprint, key_text = shake.claimed()
    ours = shake.config.identity
    if isinstance(exc, ssl.SSLCertVerificationError) or (
        isinstance(exc, ssl.SSLError) and exc.reason == "CERTIFICATE_VERIFY_FAILED"
    ):
        known = shake.config.trust.get(expected_name) if expected_name is not None else None
        command = f"pilot-transport trust add {expected_name or 'NAME'} {key_text}"
        if known is not None and known.address is not None:
            # An address names a host's daemon, not a process: another process
            # behind the same daemon answers with its own key.
            command = (
                f"pilot-transport trust add NAME {key_text} --address {known.address} "
                "--port PORT  (if it is another process behind the same Pilot address), "
                f"or add --replace to `trust add {expected_name} ...` if "
                f"{expected_name}'s key really changed"
            )
        elif known is not None:
            command += " --replace  (if its key really changed)"
        return PeerNotTrustedError(
            f"{who} claims the key with fingerprint {fingerprint}, which is not in our "
            f"trust store; if you expect this peer, trust it with: {command}",
            fingerprint=fingerprint if shake.claimed_key is not None else None,
        )
    if isinstance(exc, ssl.SSLError) and exc.reason in _REJECTED_REASONS:
        return RejectedByPeerError(
            f"{who} (fingerprint {fingerprint}) refused us: it does not trust our key "
            f"{ours.fingerprint}; on that peer run: "
            f"pilot-transport trust add NAME {ours.public_key_text}",
            fingerprint=ours.fingerprint,
        )
    if isinstance(exc, _PeerClosed | StreamResetError):
        if not shake.server_side and shake.sslobj.version() is not None:
            # TLS done on our side, then the peer hung up instead of confirming:
            # that is how a server that does not trust us (or our leaf) answers.
            return RejectedByPeerError(
                f"{who} (fingerprint {fingerprint}) closed the connection after the "
                f"handshake: it does not accept our key {ours.fingerprint}; on that peer "
                f"run: pilot-transport trust add NAME {ours.public_key_text}",
                fingerprint=ours.fingerprint,
            )
        if shake.server_side and shake.claimed_key is None:
            return AbandonedHandshakeError(
                f"{who} closed the connection before presenting a certificate"
            )
        return HandshakeError(f"{who} closed the connection during the TLS handshake")
    if isinstance(exc, ssl.SSLError):
        return HandshakeError(f"TLS handshake with {who} failed: {exc.reason or exc}")
    return HandshakeError(f"TLS handshake with {who} failed: {exc}")


async def client_handshake(
    stream: CarrierStream,
    config: TLSConfig,
    *,
    expected_key: bytes | None,
    expected_name: str | None,
    target: str,
) -> SecureStream:
    """Authenticate as a client over ``stream`` and return the secure stream.

    The carrier stream is closed on failure.

    Raises:
        PeerNotTrustedError: the server's key is not in our trust store.
        RejectedByPeerError: the server does not trust our key.
        PeerIdentityMismatchError: trusted, but not ``expected_key``.
        HandshakeError: any other TLS failure.
        ConnectError, StreamError: the carrier failed (e.g. no listener on the port).
    """
    shake = _Handshake(stream, config, server_side=False)
    who = f"peer {target}"
    try:
        try:
            await shake.run()
            entry = shake.trusted_peer(who)
            if expected_key is not None and entry.public_key != expected_key:
                raise PeerIdentityMismatchError(
                    f"{who} is trusted peer {entry.name!r} ({entry.fingerprint}), not the "
                    f"peer we dialled (expected {fingerprint_of(expected_key)})",
                    fingerprint=entry.fingerprint,
                )
            await shake.read_confirmation()
        except (ssl.SSLError, _PeerClosed, StreamResetError) as exc:
            await shake.send_alert()
            raise _map_error(exc, shake, who=who, expected_name=expected_name) from exc
    except BaseException:
        await _abort(stream)
        raise
    return shake.secure_stream(entry)


async def server_handshake(stream: CarrierStream, config: TLSConfig) -> SecureStream:
    """Authenticate an inbound ``stream`` and return the secure stream.

    The carrier stream is closed on failure.

    Raises:
        PeerNotTrustedError: the client's key is not in our trust store.
        RejectedByPeerError: the client does not trust our key.
        HandshakeError: any other TLS failure.
        StreamError: the carrier failed.
    """
    shake = _Handshake(stream, config, server_side=True)
    who = f"inbound peer from {stream.remote_hint or 'unknown'}"
    try:
        try:
            await shake.run()
            entry = shake.trusted_peer(who)
            await shake.send_confirmation()
        except (ssl.SSLError, _PeerClosed, StreamResetError) as exc:
            await shake.send_alert()
            raise _map_error(exc, shake, who=who, expected_name=None) from exc
    except BaseException:
        await _abort(stream)
        raise
    return shake.secure_stream(entry)


def _carrier_address(stream: CarrierStream) -> str | None:
    """The peer's Pilot address if the carrier knows it (``PilotStream.remote``)."""
    remote = getattr(stream, "remote", None)
    if isinstance(remote, SocketAddress):
        return str(remote.address)
    if isinstance(remote, Address):
        return str(remote)
    return None


def _peer_info(entry: TrustedPeer, stream: CarrierStream) -> PeerInfo:
    address = entry.address or _carrier_address(stream)
    return PeerInfo(
        node_id=entry.node_id,
        name=entry.name,
        address=address,
        public_key=entry.public_key,
        fingerprint=entry.fingerprint,
    )


async def _abort(stream: CarrierStream) -> None:
    with contextlib.suppress(Exception):
        await asyncio.shield(stream.aclose())


# -- the stream --------------------------------------------------------------------


class SecureStream:
    """An authenticated, encrypted, ordered byte stream to one peer.

    Obtained from ``Transport.connect`` or ``Listener.accept``; never built
    directly. One task may read while another writes; concurrent readers (or
    writers) are served one after the other. Usable as an async context
    manager (closes on exit).

    Attributes:
        peer: the authenticated remote peer (name from our trust store).
        local: ourselves.
    """

    __slots__ = (
        "__weakref__",
        "_carrier",
        "_closed",
        "_eof_received",
        "_eof_sent",
        "_failure",
        "_incoming",
        "_outgoing",
        "_read_lock",
        "_sslobj",
        "_stash",
        "_write_lock",
        "local",
        "peer",
    )

    def __init__(
        self,
        carrier: CarrierStream,
        sslobj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        *,
        peer: PeerInfo,
        local: PeerInfo,
    ) -> None:
        self._carrier = carrier
        self._sslobj = sslobj
        self._incoming = incoming
        self._outgoing = outgoing
        self._read_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._eof_sent = False
        self._eof_received = False
        self._failure: TransportError | None = None
        self._stash = bytearray()
        self.peer = peer
        self.local = local

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    @property
    def remote_hint(self) -> str:
        """Where the carrier says the bytes come from (for logs)."""
        return self._carrier.remote_hint

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return the next 1..``max_bytes`` bytes; ``b""`` once the peer sent EOF.

        Safe to repeat; after EOF every call returns ``b""``. Cancelling a
        pending read loses no data: the stream stays usable.

        Raises:
            ValueError: ``max_bytes`` < 1.
            StreamClosedError: the stream was closed locally.
            StreamResetError: the connection broke, or the peer vanished without
                closing the TLS session (it may have crashed).
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._closed:
            raise StreamClosedError("read on a closed stream")
        if self._eof_received:
            return b""
        if self._failure is not None:
            raise self._failure
        lock = self._read_lock
        await lock.acquire()
        try:
            return await self._read(min(max_bytes, _MAX_READ))
        finally:
            lock.release()

    async def _read(self, max_bytes: int) -> bytes:
        if self._stash:
            data = bytes(self._stash[:max_bytes])
            del self._stash[:max_bytes]
            return data
        sslobj = self._sslobj
        incoming = self._incoming
        while True:
            if not incoming.pending and not sslobj.pending() and not incoming.eof:
                # Nothing to decrypt: fetch ciphertext first rather than pay for an
                # SSL_read that can only fail with WANT_READ.
                if self._outgoing.pending and not self._write_lock.locked():
                    # A post-handshake message (e.g. a key update answer); a busy
                    # writer sends it with its own bytes, in order, so never wait here.
                    await self._send_pending()
                try:
                    chunk = await self._carrier.read(_READ_CHUNK)
                except TransportError as exc:
                    raise self._carrier_error(exc, "reading") from None
                if chunk:
                    incoming.write(chunk)
                else:
                    # The carrier ended. OpenSSL decides whether that was after the
                    # peer's close_notify (clean EOF) or a truncation (SSLEOFError).
                    incoming.write_eof()
            try:
                data = sslobj.read(min(max_bytes, _RECORD_READ))
            except ssl.SSLWantReadError:
                continue  # a partial record: OpenSSL kept it, fetch the rest
            except ssl.SSLZeroReturnError:
                self._eof_received = True
                return b""
            except ssl.SSLError as exc:
                if _is_truncation(exc):
                    raise self._fail(self._truncated()) from exc
                raise self._fail(StreamResetError(f"TLS error on the stream: {exc}")) from exc
            if not data:
                self._eof_received = True
                return b""
            if len(data) < max_bytes and (incoming.pending or sslobj.pending()):
                data = self._gather(data, max_bytes)
            return data

    def _truncated(self) -> StreamResetError:
        return StreamResetError(
            f"the connection to {self.peer.name or self.peer.node_id} ended "
            "without a TLS close (the peer may have crashed)"
        )

    def _gather(self, first: bytes, max_bytes: int) -> bytes:
        """Append the records already buffered, up to ``max_bytes``, in one result."""
        parts = [first]
        size = len(first)
        sslobj = self._sslobj
        incoming = self._incoming
        while size < max_bytes and (incoming.pending or sslobj.pending()):
            try:
                more = sslobj.read(min(max_bytes - size, _RECORD_READ))
            except ssl.SSLWantReadError:
                break  # a partial record: the next read fetches the rest
            except ssl.SSLZeroReturnError:
                self._eof_received = True  # return what we have; then b""
                break
            except ssl.SSLError as exc:
                self._fail(
                    self._truncated()
                    if _is_truncation(exc)
                    else StreamResetError(f"TLS error on the stream: {exc}")
                )
                break  # return what we have; the next read raises
            if not more:
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts)

    def _carrier_error(self, exc: TransportError, doing: str) -> TransportError:
        """The error to raise for a carrier failure while ``doing`` I/O."""
        if isinstance(exc, StreamClosedError):
            if self._closed:
                return StreamClosedError(f"the stream was closed while {doing}")
            return self._fail(StreamResetError("the carrier stream was closed"))
        return self._fail(exc)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting while the peer applies backpressure.

        Cancelling a pending write may leave part of ``data`` sent.

        Raises:
            StreamClosedError: the stream was closed locally, or after :meth:`write_eof`.
            StreamResetError: the connection broke.
        """
        self._check_writable()
        if self.try_write(data):
            # Encrypted and handed to the carrier without suspending: no lock, no
            # carrier coroutine (the common case of a small write with credit).
            return
        view = memoryview(data)
        size = view.nbytes
        if not size:
            return
        lock = self._write_lock
        await lock.acquire()
        try:
            self._check_writable()
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            if size <= _WRITE_CHUNK:
                try:
                    self._sslobj.write(view)
                except ssl.SSLError as exc:
                    raise self._fail(StreamResetError(f"TLS error on the stream: {exc}")) from exc
                try:
                    await self._carrier.write(self._outgoing.read())
                except TransportError as exc:
                    raise self._carrier_error(exc, "writing") from None
                return
            try:
                for offset in range(0, size, _WRITE_CHUNK):
                    self._sslobj.write(view[offset : offset + _WRITE_CHUNK])
                    await self._carrier_write(self._outgoing.read())
            except ssl.SSLError as exc:
                raise self._fail(StreamResetError(f"TLS error on the stream: {exc}")) from exc
        finally:
            lock.release()

    def try_write(self, data: bytes | bytearray | memoryview) -> bool:
        """Send all of ``data`` now, without waiting, or nothing at all.

        Succeeds (True) only when no other write is in progress on this stream
        and the carrier can take the encrypted bytes at once (below its buffer's
        high-water mark, within the peer's flow-control credit); then every
        byte is encrypted and handed to the carrier before this returns, in
        order after all earlier writes. Otherwise returns False and nothing was
        encrypted or sent: use :meth:`write`. Data larger than 256 KiB always
        takes :meth:`write`. The call never suspends, so it cannot be cancelled
        half-way; it is safe to repeat.

        Returns False, too, on a stream that is closed, half-closed or failed;
        the next :meth:`write` raises the error.

        Raises:
            StreamResetError: the TLS layer or the carrier failed during the write
                (the stream is failed from then on).
        """
        if self._closed or self._eof_sent or self._failure is not None:
            return False
        if self._write_lock.locked():
            return False  # another write is in progress: ours would have to wait
        view = memoryview(data)
        size = view.nbytes
        if not size:
            return True
        if size > _WRITE_CHUNK:
            return False
        carrier = self._carrier
        # An upper bound of the ciphertext, so the carrier is asked before anything is
        # encrypted: records that encryption produced could not be taken back.
        bound = size + (size // _RECORD_PLAIN + 1) * _RECORD_OVERHEAD + self._outgoing.pending
        if carrier.write_room() < bound:
            return False
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        try:
            self._sslobj.write(view)
        except ssl.SSLError as exc:
            raise self._fail(StreamResetError(f"TLS error on the stream: {exc}")) from exc
        try:
            accepted = carrier.try_write(self._outgoing.read())
        except TransportError as exc:
            raise self._carrier_error(exc, "writing") from None
        if not accepted:
            # The carrier broke its word; the records are lost, so is the stream.
            raise self._fail(StreamResetError("the carrier refused a write it had room for"))
        return True

    def _check_writable(self) -> None:
        if self._closed:
            raise StreamClosedError("write on a closed stream")
        if self._eof_sent:
            raise StreamClosedError("write after write_eof()")
        if self._failure is not None:
            raise self._failure

    async def _carrier_write(self, data: bytes) -> None:
        try:
            await self._carrier.write(data)
        except TransportError as exc:
            raise self._carrier_error(exc, "writing") from None

    async def _send_pending(self) -> None:
        async with self._write_lock:
            data = self._outgoing.read()
            if data:
                await self._carrier_write(data)

    async def write_eof(self) -> None:
        """Half-close: send a TLS close, after which the peer's reads return ``b""``.

        We may keep reading. Safe to repeat.

        Raises:
            StreamClosedError: the stream was closed locally.
            StreamResetError: the connection broke.
        """
        if self._closed:
            raise StreamClosedError("write_eof on a closed stream")
        if self._eof_sent:
            return
        if self._failure is not None:
            raise self._failure
        async with self._write_lock:
            if self._eof_sent:
                return
            self._eof_sent = True
            self._close_notify()
            await self._carrier_write(self._outgoing.read())
            with contextlib.suppress(TransportError):
                await self._carrier.write_eof()

    def _close_notify(self) -> None:
        # OpenSSL's shutdown may try to read the peer's close_notify and would
        # drop application records already buffered: decrypt those into the
        # stash first, so nothing the peer sent is lost.
        if self._incoming.pending and not self._read_lock.locked():
            while True:
                try:
                    more = self._sslobj.read(_RECORD_READ)
                except ssl.SSLError:
                    break
                if not more:
                    break
                self._stash += more
        with contextlib.suppress(ssl.SSLError):
            self._sslobj.unwrap()

    async def aclose(self) -> None:
        """Close both directions (sending a TLS close if possible). Idempotent.

        Never raises on a broken stream. Pending reads and writes on this
        stream fail with :class:`StreamClosedError`.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if not self._eof_sent and self._failure is None and not self._write_lock.locked():
                self._eof_sent = True
                self._close_notify()
                data = self._outgoing.read()
                if data:
                    with contextlib.suppress(TransportError, TimeoutError):
                        async with asyncio.timeout(_CLOSE_NOTIFY_TIMEOUT):
                            await self._carrier.write(data)
        finally:
            with contextlib.suppress(TransportError):
                await self._carrier.aclose()

    def _fail(self, error: TransportError) -> TransportError:
        """Record the stream's failure; the first one recorded is the one reported."""
        if self._failure is None:
            self._failure = error
        return self._failure

    async def _revoke(self, error: TransportError) -> None:
        """Fail the stream with ``error`` and drop its connection (no TLS close).

        Pending and later reads and writes raise ``error``; ``aclose`` still works.
        """
        if self._closed:
            return
        self._fail(error)
        with contextlib.suppress(TransportError, TimeoutError):
            async with asyncio.timeout(_CLOSE_NOTIFY_TIMEOUT):
                await self._carrier.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SecureStream peer={self.peer.name or self.peer.node_id!r} {state}>"
