"""Tunnel frames, key derivation, the AEAD and the replay window (no I/O)."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st
from pilot_node._identity import NodeIdentity
from pilot_node._tunnel import (
    AUTH_FRAME_SIZE,
    REPLAY_WINDOW,
    AuthFrame,
    FrameError,
    KeyExchange,
    PeerCrypto,
    ReplayWindow,
    SecureFrame,
    UnauthFrame,
    auth_challenge,
    build_auth_frame,
    derive_key,
    parse_frame,
)


def test_derive_key_is_hkdf_sha256_with_empty_salt_and_the_v1_info() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    b_pub = b.public_key().public_bytes_raw()
    shared = a.exchange(X25519PublicKey.from_public_bytes(b_pub))
    prk = hmac.new(b"", shared, hashlib.sha256).digest()
    expected = hmac.new(prk, b"pilot-tunnel-v1\x01", hashlib.sha256).digest()
    assert derive_key(a, b_pub) == expected
    assert derive_key(b, a.public_key().public_bytes_raw()) == expected


def test_auth_frame_layout_and_signature() -> None:
    identity = NodeIdentity.generate()
    x25519 = KeyExchange().public
    frame = build_auth_frame(identity, 0x01020304, x25519)
    assert len(frame) == AUTH_FRAME_SIZE
    assert frame[:8] == b"PILA\x01\x02\x03\x04"
    assert frame[8:40] == x25519
    assert frame[40:72] == identity.public_key
    parsed = parse_frame(frame)
    assert isinstance(parsed, AuthFrame)
    assert parsed.node_id == 0x01020304
    assert auth_challenge(0x01020304, x25519) == b"auth\x01\x02\x03\x04" + x25519
    assert parsed.verify(identity.public_key)
    assert not parsed.verify(NodeIdentity.generate().public_key)


def test_auth_frame_with_a_foreign_signature_does_not_verify() -> None:
    victim, attacker = NodeIdentity.generate(), NodeIdentity.generate()
    forged = build_auth_frame(attacker, 7, KeyExchange().public)
    # Claim the victim's key but keep the attacker's signature.
    tampered = forged[:40] + victim.public_key + forged[72:]
    parsed = parse_frame(tampered)
    assert isinstance(parsed, AuthFrame)
    assert not parsed.verify(victim.public_key)


def test_parse_frame_kinds_and_malformed_bodies() -> None:
    assert isinstance(parse_frame(b"PILK" + struct.pack(">I", 9) + bytes(32)), UnauthFrame)
    assert parse_frame(b"PILT" + bytes(34)) is None
    assert parse_frame(b"PILP" + bytes(4)) is None
    assert parse_frame(b"XXXX") is None
    for short in (b"PILS" + bytes(10), b"PILA" + bytes(100), b"PILK" + bytes(8)):
        with pytest.raises(FrameError):
            parse_frame(short)


def pair() -> tuple[PeerCrypto, PeerCrypto]:
    a, b = KeyExchange(), KeyExchange()
    return a.crypto_for(b.public, 0.0), b.crypto_for(a.public, 0.0)


def test_seal_frame_layout_nonce_counter_and_aad() -> None:
    ours, theirs = pair()
    frame = ours.seal(42, b"hello")
    assert frame[:4] == b"PILS"
    assert frame[4:8] == struct.pack(">I", 42)
    assert frame[8:12] == ours.nonce_prefix
    assert frame[12:20] == struct.pack(">Q", 1)
    # AES-256-GCM with the sender's node id as associated data.
    assert AESGCM(ours.key).decrypt(frame[8:20], frame[20:], struct.pack(">I", 42)) == b"hello"
    parsed = parse_frame(frame)
    assert isinstance(parsed, SecureFrame)
    assert parsed.counter == 1
    assert theirs.open(parsed, 1.0) == b"hello"
    assert ours.seal(42, b"again")[12:20] == struct.pack(">Q", 2)


def test_open_rejects_replays_other_senders_and_tampering() -> None:
    ours, theirs = pair()
    frame = ours.seal(42, b"once")
    parsed = parse_frame(frame)
    assert isinstance(parsed, SecureFrame)
    assert theirs.open(parsed, 1.0) == b"once"
    with pytest.raises(FrameError, match="replay"):
        theirs.open(parsed, 1.0)
    # The same ciphertext claimed by another node id fails (the id is authenticated).
    other = parse_frame(frame[:4] + struct.pack(">I", 43) + frame[8:])
    assert isinstance(other, SecureFrame)
    fresh = ours.seal(42, b"twice")
    moved = parse_frame(fresh[:4] + struct.pack(">I", 43) + fresh[8:])
    assert isinstance(moved, SecureFrame)
    with pytest.raises(FrameError, match="authentication"):
        theirs.open(moved, 1.0)
    flipped = bytearray(fresh)
    flipped[-1] ^= 1
    bad = parse_frame(bytes(flipped))
    assert isinstance(bad, SecureFrame)
    with pytest.raises(FrameError):
        theirs.open(bad, 1.0)
    # A failed frame does not consume its counter: the genuine one still opens.
    good = parse_frame(fresh)
    assert isinstance(good, SecureFrame)
    assert theirs.open(good, 2.0) == b"twice"
    assert theirs.failures == 0


def test_a_forged_high_counter_does_not_advance_the_window() -> None:
    ours, theirs = pair()
    forged = SecureFrame(42, ours.nonce_prefix + struct.pack(">Q", 10_000), os.urandom(40))
    with pytest.raises(FrameError):
        theirs.open(forged, 1.0)
    assert theirs.window.highest == 0
    genuine = parse_frame(ours.seal(42, b"ok"))
    assert isinstance(genuine, SecureFrame)
    assert theirs.open(genuine, 1.0) == b"ok"


def test_replay_window_accepts_out_of_order_once_within_256() -> None:
    window = ReplayWindow()
    assert not window.would_accept(0)
    for counter in (5, 3, 4, 1, 300):
        assert window.would_accept(counter)
        window.record(counter)
    for counter in (5, 3, 4, 300):
        assert not window.would_accept(counter)
    assert not window.would_accept(1)  # 300 - 1 >= 256: outside
    assert window.outside(1)
    assert window.would_accept(300 - REPLAY_WINDOW + 1)
    assert not window.would_accept(300 - REPLAY_WINDOW)


@given(st.lists(st.integers(min_value=1, max_value=2000), max_size=200))
def test_replay_window_never_accepts_a_counter_twice(counters: list[int]) -> None:
    window = ReplayWindow()
    accepted: set[int] = set()
    for counter in counters:
        if window.would_accept(counter):
            assert counter not in accepted
            assert window.highest - counter < REPLAY_WINDOW or counter > window.highest
            window.record(counter)
            accepted.add(counter)


def test_an_older_dialect_frame_is_recognised() -> None:
    ours, theirs = pair()
    nonce = ours.nonce_prefix + struct.pack(">Q", 1)
    # Sealed without the sender id as associated data, as older builds did.
    old = SecureFrame(42, nonce, AESGCM(ours.key).encrypt(nonce, b"hello", None))
    with pytest.raises(FrameError):
        theirs.open(old, 1.0)
    assert "older tunnel dialect" in theirs.older_dialect(old)
    current = parse_frame(ours.seal(42, b"x"))
    assert isinstance(current, SecureFrame)
    forged = SecureFrame(42, current.nonce, os.urandom(len(current.ciphertext)))
    assert theirs.older_dialect(forged) == ""
