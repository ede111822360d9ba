"""Who am I: an Ed25519 key pair in a 0600 key file, a node id and a fingerprint.

Key file format: the private key as unencrypted PKCS#8 PEM
(``-----BEGIN PRIVATE KEY-----``), the format ``openssl genpkey -algorithm ed25519``
writes. The file must not be readable or writable by group or others; like
``ssh``, :meth:`Identity.load` refuses it otherwise.

Derived names, all from the 32-byte raw public key:

- ``node_id``: the first 16 bytes of ``sha256(public_key)`` in lower-case
  base32 without padding (26 characters). Stable for the life of the key; used
  in ACLs and logs.
- ``fingerprint``: ``SHA256:`` + unpadded base64 of ``sha256(public_key)``, the
  shape ``ssh-keygen -l`` prints, for humans to compare out of band.
- ``public_key_text``: standard base64 of the raw public key (44 characters),
  the form ``pilot-transport trust add`` takes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from functools import cached_property
from pathlib import Path
from typing import Self

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilot_transport._files import atomic_write
from pilot_transport.errors import IdentityError, InsecureKeyFileError

__all__ = [
    "Identity",
    "decode_public_key",
    "encode_public_key",
    "fingerprint_of",
    "node_id_of",
]

PUBLIC_KEY_SIZE = 32
_KEY_FILE_MODE = 0o600
_MAX_KEY_FILE = 16 * 1024


def node_id_of(public_key: bytes) -> str:
    """The stable node id of a raw Ed25519 public key (26 lower-case base32 chars)."""
    digest = hashlib.sha256(public_key).digest()[:16]
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def fingerprint_of(public_key: bytes) -> str:
    """``SHA256:<base64>`` of a raw public key, for humans to compare."""
    digest = hashlib.sha256(public_key).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def encode_public_key(public_key: bytes) -> str:
    """The copy-pasteable text form of a raw public key (standard base64)."""
    return base64.b64encode(public_key).decode("ascii")


def decode_public_key(text: str | bytes) -> bytes:
    """Parse a raw Ed25519 public key from base64 (standard or url-safe) or hex text.

    Raw 32-byte ``bytes`` are returned unchanged.

    Raises:
        ValueError: not a 32-byte key in one of those forms.
    """
    if isinstance(text, bytes):
        if len(text) != PUBLIC_KEY_SIZE:
            raise ValueError(f"a raw Ed25519 public key is 32 bytes, got {len(text)}")
        return text
    cleaned = text.strip()
    if cleaned.lower().startswith("ed25519:"):
        cleaned = cleaned[len("ed25519:") :]
    if len(cleaned) == 2 * PUBLIC_KEY_SIZE:
        try:
            return bytes.fromhex(cleaned)
        except ValueError:
            pass
    try:
        padded = cleaned + "=" * (-len(cleaned) % 4)
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a base64 or hex Ed25519 public key: {cleaned[:60]!r}") from exc
    if len(raw) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this text decodes to {len(raw)}")
    return raw


class Identity:
    """An Ed25519 key pair: who this node is.

    Create one with :meth:`generate`, :meth:`load` or :meth:`load_or_create`.
    Instances are immutable and safe to share between tasks and threads.
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Self:
        """A fresh random identity (not saved anywhere)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Self:
        """An identity from a raw 32-byte Ed25519 private key (seed).

        Raises:
            IdentityError: ``raw`` is not 32 bytes.
        """
        try:
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        except ValueError as exc:
            raise IdentityError(f"not a raw Ed25519 private key: {exc}") from exc

    @classmethod
    def from_pem(cls, pem: bytes) -> Self:
        """An identity from a PKCS#8 PEM private key.

        Raises:
            IdentityError: not an unencrypted Ed25519 PKCS#8 PEM key.
        """
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise IdentityError(f"not an unencrypted PKCS#8 PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"expected an Ed25519 key, got {type(key).__name__}")
        return cls(key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Load the identity stored at ``path``.

        Safe to repeat. Refuses a key file readable or writable by group or
        others, as ``ssh`` does: fix it with ``chmod 600 PATH``.

        Raises:
            IdentityError: the file is missing, unreadable or not an Ed25519 key.
            InsecureKeyFileError: the file's permissions let others read or write it.
        """
        file = Path(path).expanduser()
        try:
            # Symlinks are followed (secret mounts use them); the mode checked is the target's.
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise IdentityError(
                f"identity key file {str(file)!r} does not exist "
                "(create one with `pilot-transport identity create`)"
            ) from exc
        except OSError as exc:
            raise IdentityError(f"cannot open identity key file {str(file)!r}: {exc}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise IdentityError(f"identity key file {str(file)!r} is not a regular file")
            loose = info.st_mode & 0o077
            if loose:
                raise InsecureKeyFileError(
                    f"identity key file {str(file)!r} has mode {stat.S_IMODE(info.st_mode):04o}: "
                    "it must not be accessible by group or others; run `chmod 600 "
                    f"{file}`"
                )
            if info.st_size > _MAX_KEY_FILE:
                raise IdentityError(f"identity key file {str(file)!r} is too large to be a key")
            with os.fdopen(os.dup(fd), "rb") as handle:
                pem = handle.read(_MAX_KEY_FILE + 1)
        except OSError as exc:
            raise IdentityError(f"cannot read identity key file {str(file)!r}: {exc}") from exc
        finally:
            os.close(fd)
        try:
            return cls.from_pem(pem)
        except IdentityError as exc:
            raise IdentityError(f"identity key file {str(file)!r}: {exc}") from exc

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Self:
        """Load ``path``, or generate and save a new identity there if it does not exist.

        Safe to repeat: the second call loads what the first one saved. Two
        processes racing to create the same file both end up with one of the
        two keys on disk; use :meth:`generate` + :meth:`save` once at setup time
        if that matters.

        Raises:
            IdentityError, InsecureKeyFileError: as :meth:`load` and :meth:`save`.
        """
        file = Path(path).expanduser()
        if file.exists() or file.is_symlink():
            return cls.load(file)
        identity = cls.generate()
        identity.save(file)
        return identity

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key to ``path`` atomically with mode 0600.

        The parent directory is created (mode 0700) if needed. An existing file
        is replaced. Safe to repeat.

        Raises:
            IdentityError: the file cannot be written.
        """
        file = Path(path).expanduser()
        try:
            file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(file, self.private_key_pem(), mode=_KEY_FILE_MODE)
        except OSError as exc:
            raise IdentityError(f"cannot write identity key file {str(file)!r}: {exc}") from exc

    def private_key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (the key file's content). Keep it secret."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The ``cryptography`` private key object."""
        return self._private_key

    @property
    def public_key(self) -> bytes:
        """The 32-byte raw Ed25519 public key."""
        return self._public_key

    @cached_property
    def public_key_text(self) -> str:
        """The public key in the base64 form ``pilot-transport trust add`` takes."""
        return encode_public_key(self._public_key)

    @cached_property
    def node_id(self) -> str:
        """Stable id derived from the public key (26 lower-case base32 chars)."""
        return node_id_of(self._public_key)

    @cached_property
    def fingerprint(self) -> str:
        """``SHA256:<base64>`` of the public key, for humans to compare out of band."""
        return fingerprint_of(self._public_key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return self._public_key == other._public_key

    def __hash__(self) -> int:
        return hash(self._public_key)

    def __repr__(self) -> str:
        return f"Identity(node_id={self.node_id!r}, fingerprint={self.fingerprint!r})"
