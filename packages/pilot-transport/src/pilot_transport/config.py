"""Where a node's configuration comes from: environment variables, config directory, key files.

Every package of langgraph-pilot (the worker, the checkpoint saver, the remote
nodes, the channels clients, the command lines) finds its transport URL,
identity and trust store here, with the same rules:

* **Environment variables** (ours; the Pilot daemon's own variables are listed
  in the README and never read here):

  ===================== ==========================================================
  ``PILOT_TRANSPORT_URL`` carrier URL: ``tcp://HOST:PORT``, ``pilot:///path.sock``,
                          ``memory://HUB`` (default ``tcp://127.0.0.1:0``)
  ``PILOT_IDENTITY``      path of this node's identity key file
  ``PILOT_TRUST``         path of this node's trust store file
  ``PILOT_CONFIG_DIR``    directory of the default ``identity.key`` and ``trust.json``
  ===================== ==========================================================

  ``PILOT_TRANSPORT`` belongs to the Pilot daemon (``udp``, ``compat``,
  ``auto``). A value holding a URL (``://``) is still accepted as ours, with a
  ``DeprecationWarning``; any other value is ignored (logged at debug level).

* **Config directory**: ``$PILOT_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/pilot``,
  else ``~/.config/pilot``.

* **One rule for files**: a path the user *named* (an argument or an
  environment variable) that does not exist is an error naming the path
  (:class:`~pilot_transport.errors.IdentityNotFoundError`,
  :class:`~pilot_transport.errors.TrustFileNotFoundError`); nothing is created
  in its place, so ``PILOT_IDENTITY=me.kye`` (a typo) fails instead of minting
  a new key. When nothing was named, the default ``identity.key`` in the config
  directory is created on first use (mode 0600) and a warning on the
  ``pilot_transport.config`` logger says where; a missing default trust file
  is an empty store, and errors about unknown peers say that the file is
  missing.

Example::

    from pilot_transport import config, open_transport

    cfg = config.resolve()                 # reads the environment once
    identity, trust = cfg.load()           # may create the default key (logged)
    transport = await open_transport(cfg.url, identity=identity, trust=trust)
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pilot_transport import _identity, _trust
from pilot_transport import errors as _errors

__all__ = [
    "CONFIG_DIR_ENV",
    "DEFAULT_TRANSPORT_URL",
    "IDENTITY_ENV",
    "IDENTITY_FILE",
    "LEGACY_TRANSPORT_ENV",
    "TRANSPORT_URL_ENV",
    "TRUST_ENV",
    "TRUST_FILE",
    "XDG_CONFIG_HOME_ENV",
    "ClientConfig",
    "ConfigPath",
    "PathSource",
    "config_dir",
    "identity_path",
    "load_identity",
    "open_trust",
    "resolve",
    "transport_url",
    "trust_path",
]

logger = logging.getLogger("pilot_transport.config")

TRANSPORT_URL_ENV = "PILOT_TRANSPORT_URL"
"""Our carrier URL (``tcp://...``, ``pilot:///...``, ``memory://...``)."""

LEGACY_TRANSPORT_ENV = "PILOT_TRANSPORT"
"""The Pilot daemon's carrier mode (``udp``/``compat``/``auto``). We read it only
when it holds a URL, with a ``DeprecationWarning`` (it used to be our name)."""

IDENTITY_ENV = "PILOT_IDENTITY"
"""Path of this node's identity key file."""

TRUST_ENV = "PILOT_TRUST"
"""Path of this node's trust store file."""

CONFIG_DIR_ENV = "PILOT_CONFIG_DIR"
"""Directory holding the default ``identity.key`` and ``trust.json``."""

XDG_CONFIG_HOME_ENV = "XDG_CONFIG_HOME"
"""Standard variable: with no ``PILOT_CONFIG_DIR`` the files live in ``$XDG_CONFIG_HOME/pilot``."""

DEFAULT_TRANSPORT_URL = "tcp://127.0.0.1:0"
"""The embedded carrier on loopback with a free port: safe, needs no daemon."""

IDENTITY_FILE = "identity.key"
"""Name of the default identity key file in the config directory."""

TRUST_FILE = "trust.json"
"""Name of the default trust store file in the config directory."""

PathSource = Literal["argument", "environment", "default"]
"""Where a path came from: named by the caller, named by a variable, or the default."""

PathLike = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class ConfigPath:
    """A configuration file path and where it came from.

    Attributes:
        path: The file (``~`` expanded).
        source: ``"argument"``, ``"environment"`` or ``"default"``.
        variable: The environment variable it came from, if any.
    """

    path: Path
    source: PathSource
    variable: str | None = None

    @property
    def named(self) -> bool:
        """Whether the user named this path (so a missing file is an error)."""
        return self.source != "default"

    def describe(self) -> str:
        """``'/x/identity.key' (from $PILOT_IDENTITY)`` and the like, for messages."""
        if self.source == "environment":
            return f"{str(self.path)!r} (from ${self.variable})"
        if self.source == "argument":
            return repr(str(self.path))
        return f"{str(self.path)!r} (the default)"


def config_dir(explicit: PathLike | None = None) -> Path:
    """The config directory: ``explicit``, ``$PILOT_CONFIG_DIR``, ``$XDG_CONFIG_HOME/pilot``,
    else ``~/.config/pilot``. Pure: nothing is created."""
    if explicit:
        return Path(explicit).expanduser()
    configured = os.environ.get(CONFIG_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get(XDG_CONFIG_HOME_ENV)
    return (Path(xdg).expanduser() if xdg else Path.home() / ".config") / "pilot"


def _path(
    given: PathLike | None, variable: str, file_name: str, directory: PathLike | None
) -> ConfigPath:
    if given is not None and str(given):
        return ConfigPath(Path(given).expanduser(), "argument")
    from_env = os.environ.get(variable)
    if from_env:
        return ConfigPath(Path(from_env).expanduser(), "environment", variable)
    return ConfigPath(config_dir(directory) / file_name, "default")


def identity_path(path: PathLike | None = None, *, directory: PathLike | None = None) -> ConfigPath:
    """Which identity key file to use: ``path``, ``$PILOT_IDENTITY``, else the config dir's."""
    return _path(path, IDENTITY_ENV, IDENTITY_FILE, directory)


def trust_path(path: PathLike | None = None, *, directory: PathLike | None = None) -> ConfigPath:
    """Which trust store file to use: ``path``, ``$PILOT_TRUST``, else the config dir's."""
    return _path(path, TRUST_ENV, TRUST_FILE, directory)


def transport_url(url: str | None = None) -> str:
    """Our carrier URL: ``url``, ``$PILOT_TRANSPORT_URL``, a URL in ``$PILOT_TRANSPORT``
    (deprecated), else :data:`DEFAULT_TRANSPORT_URL`.

    ``$PILOT_TRANSPORT`` without ``://`` (``udp``, ``compat``, ``auto``) is the Pilot
    daemon's setting and is ignored here. Safe to repeat; reads the environment.
    """
    if url:
        return url
    ours = os.environ.get(TRANSPORT_URL_ENV)
    if ours:
        return ours
    legacy = os.environ.get(LEGACY_TRANSPORT_ENV)
    if legacy:
        if "://" in legacy:
            message = (
                f"${LEGACY_TRANSPORT_ENV} is the Pilot daemon's variable; set "
                f"${TRANSPORT_URL_ENV}={legacy} instead (the old name is read only while "
                "it holds a URL)"
            )
            logger.warning(message)
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            return legacy
        logger.debug(
            "ignoring $%s=%r: it is the Pilot daemon's setting, not a carrier URL",
            LEGACY_TRANSPORT_ENV,
            legacy,
        )
    return DEFAULT_TRANSPORT_URL


def load_identity(
    path: PathLike | None = None,
    *,
    directory: PathLike | None = None,
    create_default: bool = True,
) -> _identity.Identity:
    """Load this node's identity by the one rule of this module.

    A named file (``path`` or ``$PILOT_IDENTITY``) must exist. The default file
    (in :func:`config_dir`) is created when missing if ``create_default``, with
    a warning on the ``pilot_transport.config`` logger giving its path and
    node id. Safe to repeat.

    Raises:
        IdentityNotFoundError: the named file (or, without ``create_default``,
            the default file) does not exist; the message names it.
        IdentityError, InsecureKeyFileError: the file is unusable.
    """
    where = identity_path(path, directory=directory)
    return _load_identity(where, create_default=create_default)


def _load_identity(where: ConfigPath, *, create_default: bool) -> _identity.Identity:
    file = where.path
    if file.exists() or file.is_symlink():
        return _identity.Identity.load(file)
    if where.named or not create_default:
        hint = (
            "check the path for a typo, or create it with "
            f"`pilot-transport --identity {file} identity create`"
        )
        raise _errors.IdentityNotFoundError(
            f"identity key file {where.describe()} does not exist; {hint}", path=str(file)
        )
    identity = _identity.Identity.generate()
    identity.save(file)
    logger.warning(
        "created a new identity at %s (node id %s, fingerprint %s); peers must trust it: "
        "`pilot-transport identity show` prints the command for them",
        file,
        identity.node_id,
        identity.fingerprint,
    )
    return identity


def open_trust(
    path: PathLike | None = None, *, directory: PathLike | None = None
) -> _trust.TrustStore:
    """Open this node's trust store by the one rule of this module.

    A named file (``path`` or ``$PILOT_TRUST``) must exist. The default file
    may be missing: that is an empty store (nothing trusted yet), and a debug
    line says so; the file is created by the first ``pilot-transport trust add``.
    Safe to repeat.

    Raises:
        TrustFileNotFoundError: the named file does not exist; the message names it.
        TrustStoreError: the file is malformed or writable by others.
    """
    return _open_trust(trust_path(path, directory=directory))


def _open_trust(where: ConfigPath) -> _trust.TrustStore:
    file = where.path
    if not (file.exists() or file.is_symlink()):
        if where.named:
            raise _errors.TrustFileNotFoundError(
                f"trust file {where.describe()} does not exist; check the path for a typo, "
                f"or add a peer to create it: `pilot-transport --trust {file} trust add NAME KEY`",
                path=str(file),
            )
        logger.debug("no trust file at %s yet: no peer is trusted", file)
    return _trust.TrustStore.open(file)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A resolved configuration: carrier URL, identity file, trust file.

    Equal configurations name the same files and URL, so this is the key under
    which one shared client (and its one transport) is kept per process.

    Attributes:
        url: The carrier URL.
        identity: The identity key file and where it came from.
        trust: The trust store file and where it came from.
    """

    url: str
    identity: ConfigPath
    trust: ConfigPath

    def key(self) -> tuple[str, str, str]:
        """``(url, identity path, trust path)``: what makes two configurations the same."""
        return (self.url, str(self.identity.path), str(self.trust.path))

    def load(self, *, create_default: bool = True) -> tuple[_identity.Identity, _trust.TrustStore]:
        """Load the identity and open the trust store (see :func:`load_identity`).

        Raises:
            IdentityNotFoundError, TrustFileNotFoundError: a named file is missing.
            IdentityError, TrustStoreError: a file is unusable.
        """
        return self.load_identity(create_default=create_default), self.open_trust()

    def load_identity(self, *, create_default: bool = True) -> _identity.Identity:
        """The identity alone, by the rule of :func:`load_identity`."""
        return _load_identity(self.identity, create_default=create_default)

    def open_trust(self) -> _trust.TrustStore:
        """The trust store alone, by the rule of :func:`open_trust`."""
        return _open_trust(self.trust)


def resolve(
    url: str | None = None,
    identity: PathLike | None = None,
    trust: PathLike | None = None,
    *,
    directory: PathLike | None = None,
) -> ClientConfig:
    """Resolve URL and file paths from the arguments, then the environment, then defaults.

    Pure apart from reading the environment: no file is read or created.
    """
    return ClientConfig(
        url=transport_url(url),
        identity=identity_path(identity, directory=directory),
        trust=trust_path(trust, directory=directory),
    )
