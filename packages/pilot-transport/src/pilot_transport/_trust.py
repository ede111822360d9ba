"""Who may talk to us: a file-backed trust store that doubles as the address book.

File format (JSON, UTF-8, written atomically with mode 0600)::

    {
      "version": 1,
      "peers": [
        {"name": "worker-a",
         "public_key": "<base64 of the raw 32-byte Ed25519 public key>",
         "endpoint": "127.0.0.1:7001",          # optional, for tcp://
         "address": "0:0000.0000.0001"}         # optional, for pilot://
      ]
    }

A missing file is an empty store; the first edit creates it. The file is
re-read automatically when its inode, size or modification time changes
(checked with one ``stat`` whenever the store is used), so ``pilot-transport
trust add`` in another process takes effect without a restart. A file that
becomes malformed after it was loaded is ignored with a warning and the last
good content is kept; a malformed file at :meth:`TrustStore.open` is an error.
Edits from several processes are serialised with an advisory lock on
``<file>.lock``.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pilot_transport._address import Address
from pilot_transport._files import atomic_write
from pilot_transport._identity import (
    decode_public_key,
    encode_public_key,
    fingerprint_of,
    node_id_of,
)
from pilot_transport.errors import AddressError, TrustStoreError, UnknownPeerError

__all__ = ["TrustStore", "TrustedPeer"]

logger = logging.getLogger("pilot_transport.trust")

_FORMAT_VERSION = 1
_FILE_MODE = 0o600
_MAX_FILE = 16 * 1024 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}", re.ASCII)
_ENDPOINT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})"
)


def _check_endpoint(endpoint: str) -> str:
    match = _ENDPOINT.fullmatch(endpoint)
    if match is None or not 0 < int(match["port"]) <= 0xFFFF:
        raise TrustStoreError(
            f"endpoint {endpoint!r} is not host:port (e.g. 127.0.0.1:7001 or [::1]:7001)"
        )
    return endpoint


@dataclass(frozen=True, slots=True)
class TrustedPeer:
    """A peer we trust, and how to reach it.

    Args:
        name: local name of the peer (letters, digits, ``._@+-``; starts with a
            letter or digit). Used to dial it: ``transport.connect(name, port)``.
        public_key: its raw 32-byte Ed25519 public key, or that key as base64/hex text.
        endpoint: ``host:port`` of its ``tcp://`` listener, if any.
        address: its Pilot address (``N:XXXX.XXXX.XXXX``), if any. An address
            names a host's daemon, not a process: several peers (identities)
            may share one, told apart by ``port`` or by their keys.
        port: the Pilot port it serves on behind ``address``, if several
            trusted peers share that address (optional).

    Raises:
        TrustStoreError: a field is malformed (the message says which).
    """

    name: str
    public_key: bytes
    endpoint: str | None = None
    address: str | None = None
    port: int | None = None
    node_id: str = field(init=False, compare=False, repr=False)
    fingerprint: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _NAME.fullmatch(self.name) is None:  # pyright: ignore[reportUnnecessaryIsInstance]  # runtime guard
            raise TrustStoreError(
                f"peer name {self.name!r} is invalid: use 1-128 letters, digits or ._@+- "
                "starting with a letter or digit"
            )
        try:
            key = decode_public_key(self.public_key)
        except (ValueError, TypeError) as exc:
            raise TrustStoreError(f"peer {self.name!r}: bad public key: {exc}") from exc
        object.__setattr__(self, "public_key", key)
        if self.endpoint is not None:
            _check_endpoint(self.endpoint)
        if self.address is not None:
            try:
                canonical = str(Address.parse(self.address))
            except AddressError as exc:
                raise TrustStoreError(f"peer {self.name!r}: bad address: {exc}") from exc
            object.__setattr__(self, "address", canonical)
        if self.port is not None and (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)  # pyright: ignore[reportUnnecessaryIsInstance]  # runtime guard
            or not 0 <= self.port <= 0xFFFF
        ):
            raise TrustStoreError(f"peer {self.name!r}: port must be an int in 0..65535")
        object.__setattr__(self, "node_id", node_id_of(key))
        object.__setattr__(self, "fingerprint", fingerprint_of(key))

    @property
    def public_key_text(self) -> str:
        """The public key as base64 text."""
        return encode_public_key(self.public_key)

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in the trust file."""
        out: dict[str, Any] = {
            "name": self.name,
            "public_key": self.public_key_text,
            "endpoint": self.endpoint,
            "address": self.address,
        }
        if self.port is not None:
            out["port"] = self.port
        return out

    @classmethod
    def from_json(cls, obj: object) -> Self:
        """Parse one entry of the trust file.

        Raises:
            TrustStoreError: the entry is malformed.
        """
        if not isinstance(obj, dict):
            raise TrustStoreError(f"trust entry must be an object, got {type(obj).__name__}")
        entry: dict[str, Any] = obj  # pyright: ignore[reportUnknownVariableType]
        unknown = set(entry) - {"name", "public_key", "endpoint", "address", "port"}
        if unknown:
            raise TrustStoreError(f"trust entry has unknown fields {sorted(unknown)}")
        for key in ("name", "public_key"):
            if not isinstance(entry.get(key), str):
                raise TrustStoreError(f"trust entry needs a string {key!r}: {entry!r}")
        for key in ("endpoint", "address"):
            if entry.get(key) is not None and not isinstance(entry.get(key), str):
                raise TrustStoreError(f"trust entry field {key!r} must be a string or null")
        return cls(
            name=entry["name"],
            public_key=entry["public_key"],
            endpoint=entry.get("endpoint"),
            address=entry.get("address"),
            port=entry.get("port"),
        )


@dataclass(frozen=True, slots=True)
class _Snapshot:
    peers: dict[str, TrustedPeer]
    by_key: dict[bytes, TrustedPeer]
    by_node_id: dict[str, TrustedPeer]
    by_address: dict[str, tuple[TrustedPeer, ...]]

    @classmethod
    def build(cls, peers: Iterable[TrustedPeer]) -> _Snapshot:
        by_name: dict[str, TrustedPeer] = {}
        by_key: dict[bytes, TrustedPeer] = {}
        by_address: dict[str, tuple[TrustedPeer, ...]] = {}
        for peer in peers:
            if peer.name in by_name:
                raise TrustStoreError(f"peer name {peer.name!r} appears twice")
            other = by_key.get(peer.public_key)
            if other is not None:
                raise TrustStoreError(
                    f"peers {other.name!r} and {peer.name!r} have the same public key"
                )
            if peer.address is not None:
                # Several identities may live behind one daemon's address; only
                # the same address *and* the same explicit port is ambiguous.
                sharing = by_address.get(peer.address, ())
                for other in sharing:
                    if peer.port is not None and other.port == peer.port:
                        raise TrustStoreError(
                            f"peers {other.name!r} and {peer.name!r} have the same "
                            f"address and port {peer.address}:{peer.port}"
                        )
                by_address[peer.address] = (*sharing, peer)
            by_name[peer.name] = peer
            by_key[peer.public_key] = peer
        by_node_id = {peer.node_id: peer for peer in by_name.values()}
        return cls(by_name, by_key, by_node_id, by_address)


_EMPTY = _Snapshot({}, {}, {}, {})
_Signature = tuple[int, int, int, int] | None  # (dev, inode, size, mtime_ns); None = no file


class TrustStore:
    """The set of peers whose keys we accept, with their names and addresses.

    Create one with :meth:`open` (file-backed) or :meth:`in_memory`. All
    methods are synchronous, cheap and thread-safe; lookups on a file-backed
    store first ``stat`` the file and re-read it if it changed.
    """

    def __init__(self, path: Path | None, snapshot: _Snapshot, signature: _Signature) -> None:
        """Internal: use :meth:`open` or :meth:`in_memory`."""
        self._path = path
        self._snapshot = snapshot
        self._signature = signature
        self._version = 0
        self._lock = threading.RLock()
        self._warned: _Signature = None

    # -- construction ---------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> TrustStore:
        """Open the trust file at ``path`` (a missing file is an empty store).

        Raises:
            TrustStoreError: the file exists but is malformed, unreadable, or
                writable by group or others.
        """
        file = Path(path).expanduser()
        snapshot, signature = _read_file(file)
        return cls(file, snapshot, signature)

    @classmethod
    def in_memory(cls, peers: Iterable[TrustedPeer] = ()) -> TrustStore:
        """A store that lives only in this process (for tests and embedding).

        Raises:
            TrustStoreError: two peers share a name, a key, or an address and port.
        """
        return cls(None, _Snapshot.build(peers), None)

    # -- reading --------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The backing file, or ``None`` for an in-memory store."""
        return self._path

    @property
    def version(self) -> int:
        """A counter that changes whenever the trusted set changes (after a reload check)."""
        self._refresh()
        return self._version

    def get(self, name: str) -> TrustedPeer | None:
        """The peer called ``name``, or ``None``."""
        return self._current().peers.get(name)

    def by_public_key(self, public_key: bytes) -> TrustedPeer | None:
        """The peer with this raw public key, or ``None``."""
        return self._current().by_key.get(bytes(public_key))

    def by_node_id(self, node_id: str) -> TrustedPeer | None:
        """The peer with this node id, or ``None``."""
        return self._current().by_node_id.get(node_id)

    def by_address(self, address: str | Address, port: int | None = None) -> TrustedPeer | None:
        """The one peer at this Pilot address (and port), or ``None``.

        Several peers may share an address (processes behind one daemon). With
        ``port``, an entry recorded with that port wins; otherwise, and
        without ``port``, the answer is the single entry that matches, and
        ``None`` when there are several (the TLS handshake then tells them
        apart by key).

        Raises:
            AddressError: ``address`` is not a valid Pilot address text.
        """
        found = self._current().by_address.get(str(Address.coerce(address)), ())
        if port is not None:
            exact = [p for p in found if p.port == port]
            if len(exact) == 1:
                return exact[0]
            found = tuple(p for p in found if p.port is None)
        return found[0] if len(found) == 1 else None

    def all_at_address(self, address: str | Address) -> builtins.list[TrustedPeer]:
        """Every peer recorded at this Pilot address (several identities may share one).

        Raises:
            AddressError: ``address`` is not a valid Pilot address text.
        """
        return list(self._current().by_address.get(str(Address.coerce(address)), ()))

    def is_trusted(self, public_key: bytes) -> bool:
        """Whether a peer presenting ``public_key`` is allowed in."""
        return bytes(public_key) in self._current().by_key

    def list(self) -> builtins.list[TrustedPeer]:
        """Every trusted peer, sorted by name."""
        return sorted(self._current().peers.values(), key=lambda peer: peer.name)

    def public_keys(self) -> frozenset[bytes]:
        """The raw public keys of every trusted peer."""
        return frozenset(self._current().by_key)

    def __len__(self) -> int:
        return len(self._current().peers)

    def __contains__(self, name: object) -> bool:
        return name in self._current().peers

    def __iter__(self) -> Iterator[TrustedPeer]:
        return iter(self.list())

    def __repr__(self) -> str:
        where = str(self._path) if self._path is not None else "memory"
        return f"<TrustStore {where} peers={len(self._snapshot.peers)}>"

    # -- editing --------------------------------------------------------------

    def add(self, peer: TrustedPeer, *, replace: bool = False) -> None:
        """Trust ``peer`` (and record its endpoint/address).

        Safe to repeat with the same entry. With ``replace=True`` an entry of
        the same name is overwritten (to change a key, endpoint or address).

        Raises:
            TrustStoreError: another entry already has this name (unless
                ``replace``), this public key, or this address and port; or the file
                cannot be written.
        """

        def edit(peers: dict[str, TrustedPeer]) -> None:
            existing = peers.get(peer.name)
            if existing is not None and existing != peer and not replace:
                raise TrustStoreError(
                    f"a different peer is already named {peer.name!r}; remove it first "
                    "or pass replace=True"
                )
            peers[peer.name] = peer

        self._edit(edit)

    def remove(self, name: str) -> TrustedPeer:
        """Stop trusting the peer called ``name``; returns the removed entry.

        Raises:
            UnknownPeerError: no peer has that name.
            TrustStoreError: the file cannot be written.
        """
        removed: list[TrustedPeer] = []

        def edit(peers: dict[str, TrustedPeer]) -> None:
            peer = peers.pop(name, None)
            if peer is None:
                raise UnknownPeerError(f"no trusted peer is named {name!r}")
            removed.append(peer)

        self._edit(edit)
        return removed[0]

    def reload(self) -> bool:
        """Re-read the file now if it changed; returns whether the trusted set changed.

        Raises:
            TrustStoreError: the file became malformed.
        """
        if self._path is None:
            return False
        with self._lock:
            before = self._snapshot
            snapshot, signature = _read_file(self._path)
            self._install(snapshot, signature)
            return before.peers != snapshot.peers

    # -- internals ------------------------------------------------------------

    def _current(self) -> _Snapshot:
        self._refresh()
        return self._snapshot

    def _refresh(self) -> None:
        if self._path is None:
            return
        signature = _signature(self._path)
        if signature == self._signature:
            return
        with self._lock:
            if _signature(self._path) == self._signature:
                return
            try:
                snapshot, signature = _read_file(self._path)
            except TrustStoreError as exc:
                if signature != self._warned:
                    self._warned = signature
                    logger.warning("keeping the previous trust store content: %s", exc)
                return
            self._install(snapshot, signature)

    def _install(self, snapshot: _Snapshot, signature: _Signature) -> None:
        if snapshot.peers != self._snapshot.peers:
            self._version += 1
        self._snapshot = snapshot
        self._signature = signature

    def _edit(self, change: Any) -> None:
        with self._lock:
            if self._path is None:
                peers = dict(self._snapshot.peers)
                change(peers)
                self._install(_Snapshot.build(peers.values()), None)
                return
            with _file_lock(self._path):
                snapshot, _ = _read_file(self._path)
                peers = dict(snapshot.peers)
                change(peers)
                new = _Snapshot.build(peers.values())
                _write_file(self._path, new)
                self._install(new, _signature(self._path))


def _signature(path: Path) -> _Signature:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _read_file(path: Path) -> tuple[_Snapshot, _Signature]:
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise TrustStoreError(f"trust file {str(path)!r} is not a regular file")
            if info.st_mode & 0o022:
                raise TrustStoreError(
                    f"trust file {str(path)!r} is writable by group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}); anyone who can write it "
                    f"decides who we trust. Run `chmod 600 {path}`"
                )
            data = handle.read(_MAX_FILE + 1)
    except FileNotFoundError:
        return _EMPTY, None
    except OSError as exc:
        raise TrustStoreError(f"cannot read trust file {str(path)!r}: {exc}") from exc
    signature = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if len(data) > _MAX_FILE:
        raise TrustStoreError(f"trust file {str(path)!r} is larger than {_MAX_FILE} bytes")
    if not data.strip():
        return _EMPTY, signature
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrustStoreError(f"trust file {str(path)!r} is not valid JSON: {exc}") from exc
    except RecursionError:
        # json.loads recurses once per nesting level; a hostile or corrupted file
        # must be a clear error, not a crash of whoever reads it.
        raise TrustStoreError(
            f"trust file {str(path)!r} is nested too deeply to be a trust file"
        ) from None
    if not isinstance(document, dict) or not isinstance(document.get("peers"), list):
        raise TrustStoreError(f"trust file {str(path)!r} must be an object with a 'peers' list")
    version = document.get("version", _FORMAT_VERSION)
    if version != _FORMAT_VERSION:
        raise TrustStoreError(
            f"trust file {str(path)!r} has format version {version!r}; this version "
            f"of pilot-transport reads version {_FORMAT_VERSION}"
        )
    try:
        snapshot = _Snapshot.build(TrustedPeer.from_json(entry) for entry in document["peers"])
    except TrustStoreError as exc:
        raise TrustStoreError(f"trust file {str(path)!r}: {exc}") from exc
    return snapshot, signature


def _write_file(path: Path, snapshot: _Snapshot) -> None:
    document = {
        "version": _FORMAT_VERSION,
        "peers": [peer.to_json() for peer in sorted(snapshot.peers.values(), key=lambda p: p.name)],
    }
    data = (json.dumps(document, indent=2) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, data, mode=_FILE_MODE)
    except OSError as exc:
        raise TrustStoreError(f"cannot write trust file {str(path)!r}: {exc}") from exc


@contextlib.contextmanager
def _file_lock(path: Path) -> Generator[None]:
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), _FILE_MODE)
    except OSError as exc:
        raise TrustStoreError(f"cannot lock trust file {str(path)!r}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
