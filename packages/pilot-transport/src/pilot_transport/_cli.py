"""The ``pilot-transport`` command: identities, trust (the address book) and ``info``.

Exit status: 0 on success; 1 when the operation failed (the network, the
daemon or the file system); 2 on bad usage or bad input (a malformed URL or
key, a key file readable by others, a missing or malformed file). Errors are
one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from pilot_transport import config
from pilot_transport._identity import Identity
from pilot_transport._transport import check_url
from pilot_transport._trust import TrustedPeer, TrustStore
from pilot_transport.config import CONFIG_DIR_ENV, IDENTITY_ENV, TRANSPORT_URL_ENV, TRUST_ENV
from pilot_transport.errors import TransportError, TransportURLError, TransportUsageError

__all__ = ["main"]


def default_config_dir() -> Path:
    """``$PILOT_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/pilot``, else ``~/.config/pilot``."""
    return config.config_dir()


def _identity_where(args: argparse.Namespace) -> config.ConfigPath:
    return config.identity_path(args.identity, directory=args.config_dir)


def _trust_where(args: argparse.Namespace) -> config.ConfigPath:
    return config.trust_path(args.trust, directory=args.config_dir)


def _identity_path(args: argparse.Namespace) -> Path:
    return _identity_where(args).path


def _trust_path(args: argparse.Namespace) -> Path:
    return _trust_where(args).path


def _open_trust(args: argparse.Namespace) -> TrustStore:
    # A named file that does not exist is an error (a typo must not look like an empty store).
    return config.open_trust(args.trust, directory=args.config_dir)


def _print_identity(identity: Identity, path: Path, out: TextIO, *, as_json: bool) -> None:
    if as_json:
        document = {
            "path": str(path),
            "node_id": identity.node_id,
            "fingerprint": identity.fingerprint,
            "public_key": identity.public_key_text,
        }
        print(json.dumps(document, indent=2), file=out)
        return
    print(f"key file:    {path}", file=out)
    print(f"node id:     {identity.node_id}", file=out)
    print(f"fingerprint: {identity.fingerprint}", file=out)
    print(f"public key:  {identity.public_key_text}", file=out)
    print("", file=out)
    print("To let another node trust this one, run there:", file=out)
    print(f"  pilot-transport trust add NAME {identity.public_key_text}", file=out)


def _identity_create(args: argparse.Namespace, out: TextIO) -> int:
    path = _identity_path(args)
    if (path.exists() or path.is_symlink()) and not args.force:
        print(
            f"error: {path} already exists; `identity show` prints it, --force replaces it "
            "(peers that trust the old key will refuse the new one)",
            file=sys.stderr,
        )
        return 1
    identity = Identity.generate()
    identity.save(path)
    _print_identity(identity, path, out, as_json=args.json)
    return 0


def _identity_show(args: argparse.Namespace, out: TextIO) -> int:
    path = _identity_path(args)
    identity = config.load_identity(args.identity, directory=args.config_dir, create_default=False)
    _print_identity(identity, path, out, as_json=args.json)
    return 0


def _trust_add(args: argparse.Namespace, out: TextIO) -> int:
    store = TrustStore.open(_trust_path(args))
    peer = TrustedPeer(
        args.name, args.public_key, endpoint=args.endpoint, address=args.address, port=args.port
    )
    store.add(peer, replace=args.replace)
    print(f"trusted {peer.name} ({peer.fingerprint}, node id {peer.node_id})", file=out)
    return 0


def _trust_set(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_trust(args)
    current = store.get(args.name)
    if current is None:
        print(f"error: no trusted peer is named {args.name!r}", file=sys.stderr)
        return 1
    endpoint = current.endpoint if args.endpoint is None else (args.endpoint or None)
    address = current.address if args.address is None else (args.address or None)
    store.add(
        TrustedPeer(
            current.name, current.public_key, endpoint=endpoint, address=address, port=current.port
        ),
        replace=True,
    )
    print(f"updated {current.name}: endpoint={endpoint} address={address}", file=out)
    return 0


def _trust_remove(args: argparse.Namespace, out: TextIO) -> int:
    removed = _open_trust(args).remove(args.name)
    print(f"removed {removed.name} ({removed.fingerprint})", file=out)
    return 0


def _trust_list(args: argparse.Namespace, out: TextIO) -> int:
    peers = _open_trust(args).list()
    if args.json:
        print(json.dumps([peer.to_json() | {"node_id": peer.node_id} for peer in peers]), file=out)
        return 0
    if not peers:
        print(f"no trusted peers in {_trust_path(args)}", file=out)
        return 0
    rows = [("NAME", "NODE ID", "FINGERPRINT", "ENDPOINT", "ADDRESS")]
    rows += [(p.name, p.node_id, p.fingerprint, p.endpoint or "-", p.address or "-") for p in peers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line.rstrip(), file=out)
    return 0


def _info(args: argparse.Namespace, out: TextIO) -> int:
    url = config.transport_url(args.transport)
    check_url(url)
    facts: dict[str, Any] = {"transport": url}
    identity_path = _identity_path(args)
    trust_path = _trust_path(args)
    try:
        identity = config.load_identity(
            args.identity, directory=args.config_dir, create_default=False
        )
    except TransportError as exc:
        facts["identity"] = {"path": str(identity_path), "error": str(exc)}
    else:
        facts["identity"] = {
            "path": str(identity_path),
            "node_id": identity.node_id,
            "fingerprint": identity.fingerprint,
            "public_key": identity.public_key_text,
        }
    try:
        facts["trust"] = {"path": str(trust_path), "peers": len(_open_trust(args))}
    except TransportError as exc:
        facts["trust"] = {"path": str(trust_path), "error": str(exc)}
    if url.startswith("pilot:"):
        facts["daemon"] = asyncio.run(_daemon_info(url))
    elif url.startswith("tcp:"):
        facts["carrier"] = {
            "scheme": "tcp",
            "note": "the listener starts with the first listen(); this URL is where it binds",
        }
    if args.json:
        print(json.dumps(facts, indent=2, default=str), file=out)
    else:
        _print_tree(facts, out)
    return 0


async def _daemon_info(url: str) -> dict[str, Any]:
    from urllib.parse import unquote, urlsplit

    path = unquote(urlsplit(url).path)
    try:
        from pilot_transport.daemon import PilotCarrier
    except ImportError as exc:
        raise TransportURLError("the pilot:// carrier is not available") from exc
    carrier = PilotCarrier(socket_path=path)
    try:
        return dict(await carrier.info())
    finally:
        await carrier.aclose()


def _print_tree(value: Any, out: TextIO, indent: int = 0) -> None:
    pad = "  " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                print(f"{pad}{key}:", file=out)
                _print_tree(item, out, indent + 1)
            else:
                print(f"{pad}{key}: {item}", file=out)
    elif isinstance(value, list):
        for item in value:
            print(f"{pad}- {item}", file=out)
    else:
        print(f"{pad}{value}", file=out)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="pilot-transport",
        description="Manage this node's identity and the peers it trusts.",
    )
    parser.add_argument(
        "--config-dir",
        help=f"directory of the default files (${CONFIG_DIR_ENV}, default ~/.config/pilot)",
    )
    parser.add_argument(
        "--identity", help=f"identity key file (${IDENTITY_ENV}, default CONFIG_DIR/identity.key)"
    )
    parser.add_argument(
        "--trust", help=f"trust store file (${TRUST_ENV}, default CONFIG_DIR/trust.json)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    identity = commands.add_parser("identity", help="create or show this node's identity")
    identity_commands = identity.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = identity_commands.add_parser("create", help="generate a new key file (mode 0600)")
    create.add_argument("--force", action="store_true", help="replace an existing key file")
    create.add_argument("--json", action="store_true", help="machine-readable output")
    create.set_defaults(handler=_identity_create)
    show = identity_commands.add_parser("show", help="print node id, fingerprint and public key")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=_identity_show)

    trust = commands.add_parser("trust", help="edit the trusted peers (the address book)")
    trust_commands = trust.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = trust_commands.add_parser("add", help="trust a peer's public key under a name")
    add.add_argument("name", help="local name for the peer (used to connect to it)")
    add.add_argument("public_key", help="its public key (base64, as `identity show` prints)")
    add.add_argument("--endpoint", help="HOST:PORT of its tcp:// listener")
    add.add_argument("--address", help="its Pilot address, N:XXXX.XXXX.XXXX")
    add.add_argument(
        "--port",
        type=int,
        help="the Pilot port it serves on behind --address (when several trusted "
        "processes share one address, that is one host's daemon)",
    )
    add.add_argument("--replace", action="store_true", help="overwrite an entry of that name")
    add.set_defaults(handler=_trust_add)
    set_ = trust_commands.add_parser("set", help="change a peer's endpoint or address")
    set_.add_argument("name")
    set_.add_argument("--endpoint", help="HOST:PORT ('' to clear)")
    set_.add_argument("--address", help="Pilot address ('' to clear)")
    set_.set_defaults(handler=_trust_set)
    remove = trust_commands.add_parser("remove", help="stop trusting a peer")
    remove.add_argument("name")
    remove.set_defaults(handler=_trust_remove)
    list_ = trust_commands.add_parser("list", help="list trusted peers")
    list_.add_argument("--json", action="store_true", help="machine-readable output")
    list_.set_defaults(handler=_trust_list)

    info = commands.add_parser("info", help="identity, trust and carrier facts (daemon info)")
    info.add_argument("--transport", help=f"transport URL (${TRANSPORT_URL_ENV})")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(handler=_info)
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args, out or sys.stdout))
    except TransportUsageError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TransportError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
