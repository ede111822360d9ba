"""The node's long-term Ed25519 identity and its file (JSON, mode 0600)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import IdentityError

__all__ = ["NodeIdentity", "verify_signature"]

_FORMAT = "pilot-node-identity/1"


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """A node's Ed25519 signing key: it names the node to the registry and signs its calls."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh random identity."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> NodeIdentity:
        """Load the identity at ``path``, or create it (mode 0600) when the file does not exist.

        Raises:
            IdentityError: the file exists but is malformed, or readable by others.
        """
        target = Path(path)
        if target.exists():
            return cls.load(target)
        identity = cls.generate()
        identity.save(target)
        return identity

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeIdentity:
        """Load an identity file written by :meth:`save`.

        Raises:
            IdentityError: missing, unreadable, malformed, or group/other-accessible.
        """
        target = Path(path)
        try:
            mode = target.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise IdentityError(
                    f"identity file {target} is accessible by other users (mode {mode & 0o777:o}); "
                    "chmod 600 it"
                )
            doc = json.loads(target.read_text())
        except OSError as exc:
            raise IdentityError(f"cannot read identity file {target}: {exc}") from exc
        except ValueError as exc:
            raise IdentityError(f"identity file {target} is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:  # pyright: ignore[reportUnknownMemberType]
            raise IdentityError(f"identity file {target} is not a {_FORMAT} file")
        seed_text = doc.get("ed25519_seed")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        try:
            seed = base64.b64decode(str(seed_text), validate=True)  # pyright: ignore[reportUnknownArgumentType]
        except (binascii.Error, ValueError) as exc:
            raise IdentityError(f"identity file {target}: bad ed25519_seed") from exc
        if len(seed) != 32:
            raise IdentityError(f"identity file {target}: ed25519_seed must be 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the identity to ``path`` with mode 0600 (atomically: temp file then rename).

        Raises:
            IdentityError: the file cannot be written.
        """
        target = Path(path)
        seed = self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        doc = {
            "format": _FORMAT,
            "ed25519_seed": base64.b64encode(seed).decode(),
            "public_key": self.public_key_b64,
        }
        tmp = target.with_name(target.name + ".tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh)
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
        except OSError as exc:
            raise IdentityError(f"cannot write identity file {target}: {exc}") from exc

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_key_b64(self) -> str:
        """The public key in standard base64, as the registry stores it."""
        return base64.b64encode(self.public_key).decode()

    @property
    def fingerprint(self) -> str:
        """``sha256:`` and the hex SHA-256 of the raw public key."""
        return "sha256:" + hashlib.sha256(self.public_key).hexdigest()

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self.private_key.sign(message)

    def sign_b64(self, challenge: str) -> str:
        """The base64 signature of a registry challenge string."""
        return base64.b64encode(self.sign(challenge.encode())).decode()


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
