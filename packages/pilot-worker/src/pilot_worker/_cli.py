"""The ``pilot-worker`` command line, reusable by other worker commands.

``main(argv, codec=..., prog=...)`` is the whole command; a distribution that
needs its own codec (``pilot-langgraph-worker``) calls it instead of copying it.
``build_parser()`` returns the parser (with the options of the given plugins),
and ``run(args, ...)`` runs an already-parsed command line.

Exit codes: 0 after a clean stop (every in-flight call finished), 1 if the
drain had to cut calls or the worker failed while serving, 2 for usage and
configuration errors (missing module, duplicate handler name, unreadable key
file, unknown plugin, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pilot_worker._codec import PayloadCodec
from pilot_worker._config import WorkerConfig
from pilot_worker._env import (
    ENV_DEFAULT_POLICY,
    ENV_DRAIN_TIMEOUT,
    ENV_HANDLERS,
    ENV_IDEMPOTENCY_STORE,
    ENV_IDENTITY,
    ENV_LOG_FORMAT,
    ENV_LOG_LEVEL,
    ENV_METRICS_HOST,
    ENV_METRICS_PORT,
    ENV_OTEL_ENDPOINT,
    ENV_OTEL_SERVICE_NAME,
    ENV_PLUGINS,
    ENV_PORT,
    ENV_READY_FILE,
    ENV_TRANSPORT,
    ENV_TRUST,
    PLUGIN_ENTRY_POINT_GROUP,
)
from pilot_worker._logging import CallLogWriter, configure_logging
from pilot_worker._modules import collect_specs, import_handler_module
from pilot_worker._plugins import Plugin, PluginContext, discover_plugins, load_plugin
from pilot_worker._version import __version__
from pilot_worker.errors import JournalError, PluginError, WorkerConfigError, WorkerError

__all__ = ["EXIT_CONFIG", "EXIT_CUT", "EXIT_OK", "READY_FILE_KEYS", "build_parser", "main", "run"]

EXIT_OK = 0
EXIT_CUT = 1
EXIT_CONFIG = 2

logger = logging.getLogger("pilot_worker.cli")

READY_FILE_KEYS = ("node_id", "endpoint", "port", "pid", "metrics_port", "carrier", "handlers")
"""Every key of the ``--ready-file`` JSON object, in the order ``--help`` lists them."""

_DESCRIPTION = """\
Serve plain Python functions (@pilot_handler) to trusted peers over an
encrypted, mutually authenticated pilot-transport link.

Handlers come from --handlers modules (a dotted module name importable from
the current directory, or a path to a .py file) and from --plugin names
(installed distributions publishing a pilot_worker.Plugin in the entry-point
group "pilot_worker.plugins"; see --list-plugins).
"""

_EPILOG = """\
examples:
  %(prog)s --handlers my_handlers      # keys in ~/.config/pilot (first run creates one)
  %(prog)s --identity worker.key --trust trust.json --handlers my_handlers
  %(prog)s --transport tcp://0.0.0.0:7001 --identity /etc/pilot/worker.key \\
      --trust /etc/pilot/trust.json --handlers app.handlers --metrics-port 9100 \\
      --log-format json --drain-timeout 30
  %(prog)s --plugin checkpoint-sqlite --checkpoint-db sqlite:///state.db ...

exit status: 0 clean stop, 1 the drain cut calls (or serving failed),
             2 usage or configuration error.
"""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_list(name: str) -> list[str]:
    value = _env(name)
    return [part.strip() for part in value.split(",") if part.strip()] if value else []


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value < 2**16:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _plugin_dest(plugin: Plugin, key: str) -> str:
    return f"plugin__{plugin.name.replace('-', '_')}__{key}"


def build_parser(
    prog: str = "pilot-worker",
    description: str | None = None,
    *,
    plugins: Sequence[Plugin] = (),
) -> argparse.ArgumentParser:
    """Return the ``pilot-worker`` parser, with the options of ``plugins``.

    Raises:
        PluginError: Two plugins (or a plugin and the worker) declare the same flag.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or _DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    net = parser.add_argument_group("transport and identity")
    net.add_argument(
        "--transport",
        metavar="URL",
        default=None,
        help="carrier URL; the TCP listen address is set here: tcp://HOST:PORT (port 0 = any "
        f"free port), pilot:///path/pilot.sock, memory://HUB (env {ENV_TRANSPORT}; default "
        "tcp://127.0.0.1:0)",
    )
    net.add_argument(
        "--identity",
        metavar="PATH",
        default=None,
        help=f"this worker's key file, mode 0600; must exist (env {ENV_IDENTITY}; default "
        "CONFIG_DIR/identity.key, created on first run)",
    )
    net.add_argument(
        "--trust",
        metavar="PATH",
        default=None,
        help="trust store file listing the peers allowed to connect; must exist (env "
        f"{ENV_TRUST}; default CONFIG_DIR/trust.json). CONFIG_DIR: $PILOT_CONFIG_DIR, "
        "else $XDG_CONFIG_HOME/pilot, else ~/.config/pilot",
    )
    net.add_argument(
        "--port",
        type=_port,
        metavar="PORT",
        default=_port(_env(ENV_PORT, "5000") or "5000"),
        help="virtual port to serve on: the port callers name next to the peer, not a TCP "
        f"port (the TCP listen address is --transport tcp://HOST:PORT) (env {ENV_PORT}; "
        "default 5000)",
    )

    handlers = parser.add_argument_group("handlers")
    handlers.add_argument(
        "--handlers",
        metavar="MODULE",
        action="append",
        default=None,
        help="module whose @pilot_handler functions are served: dotted name or .py path; "
        f"repeatable (env {ENV_HANDLERS}, comma-separated)",
    )
    handlers.add_argument(
        "--plugin",
        metavar="NAME",
        action="append",
        default=None,
        help="installed plugin to load (or module:attribute); repeatable; its own options "
        f"are listed below once named (env {ENV_PLUGINS}, comma-separated)",
    )
    handlers.add_argument(
        "--list-plugins",
        action="store_true",
        help=f"list installed plugins (entry-point group {PLUGIN_ENTRY_POINT_GROUP}) and exit",
    )
    handlers.add_argument(
        "--reload",
        action="store_true",
        help="development: re-import --handlers modules when their files change "
        "(a broken edit keeps the old handlers and logs why)",
    )

    policy = parser.add_argument_group("access and limits")
    policy.add_argument(
        "--default-policy",
        choices=("open", "closed"),
        default=_env(ENV_DEFAULT_POLICY, "open"),
        help="ACL of handlers without allow=[...]: open = every peer in the trust store, "
        f"closed = nobody (env {ENV_DEFAULT_POLICY}; default open)",
    )
    policy.add_argument(
        "--introspection-allow",
        metavar="NODE_ID",
        action="append",
        default=None,
        help="node id allowed to call _health and _handlers; repeatable "
        "(default: follow --default-policy)",
    )
    policy.add_argument(
        "--overflow",
        choices=("reject", "queue"),
        default="reject",
        help="what a call does when its handler is at max_concurrent: reject at once with "
        "RESOURCE_EXHAUSTED, or queue until a slot frees or its deadline passes "
        "(default reject; a handler's own overflow= wins)",
    )
    policy.add_argument(
        "--max-queued",
        type=_positive_int,
        metavar="N",
        default=64,
        help="with --overflow queue: most calls waiting per handler (default 64)",
    )
    policy.add_argument(
        "--max-connections-per-peer",
        type=_positive_int,
        metavar="N",
        default=None,
        help="most connections one authenticated peer may hold at once, so one peer cannot "
        "take every slot (default: pilot-rpc's own per-peer cap, when it has one)",
    )
    policy.add_argument(
        "--sync-threads",
        type=_positive_int,
        metavar="N",
        default=16,
        help="threads running sync handlers at once (default 16)",
    )

    journal = parser.add_argument_group("idempotency journal (needs pilot-worker[journal])")
    journal.add_argument(
        "--idempotency-store",
        metavar="URL",
        default=_env(ENV_IDEMPOTENCY_STORE),
        help="share the results of idempotent handlers with a pool of workers: "
        "sqlite:///path/journal.db (workers of one host) or postgresql://user@host/db "
        f"(env {ENV_IDEMPOTENCY_STORE}; default: an in-memory cache per process)",
    )
    journal.add_argument(
        "--idempotency-lease",
        type=_positive_float,
        metavar="SECS",
        default=10.0,
        help="how long a running call stays owned without a heartbeat before another worker "
        "may take it over (default 10)",
    )
    journal.add_argument(
        "--idempotency-retention",
        type=_positive_float,
        metavar="SECS",
        default=86400.0,
        help="finished calls older than this are deleted from the journal (default 86400)",
    )

    ops = parser.add_argument_group("operations")
    metrics_port = _env(ENV_METRICS_PORT)
    ops.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        default=_port(metrics_port) if metrics_port else None,
        help="serve /metrics, /healthz and /readyz over HTTP on this port (0 = any free port; "
        f"env {ENV_METRICS_PORT}; default off)",
    )
    ops.add_argument(
        "--metrics-host",
        metavar="HOST",
        default=_env(ENV_METRICS_HOST, "127.0.0.1"),
        help=f"address the HTTP endpoint binds (env {ENV_METRICS_HOST}; default 127.0.0.1)",
    )
    ops.add_argument(
        "--log-format",
        choices=("plain", "json"),
        default=_env(ENV_LOG_FORMAT, "plain"),
        help=f"log line format (env {ENV_LOG_FORMAT}; default plain)",
    )
    ops.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        metavar="LEVEL",
        default=(_env(ENV_LOG_LEVEL, "INFO") or "INFO").upper(),
        help=f"DEBUG, INFO, WARNING or ERROR (env {ENV_LOG_LEVEL}; default INFO)",
    )
    ops.add_argument(
        "--no-call-log",
        action="store_true",
        help="do not log one line per call",
    )
    ops.add_argument(
        "--drain-timeout",
        type=_positive_float,
        metavar="SECS",
        default=_positive_float(_env(ENV_DRAIN_TIMEOUT, "10") or "10"),
        help="on SIGTERM/SIGINT, seconds to let in-flight calls finish before cutting them "
        f"(env {ENV_DRAIN_TIMEOUT}; default 10)",
    )
    ops.add_argument(
        "--ready-file",
        metavar="PATH",
        default=_env(ENV_READY_FILE),
        help="once serving, write one JSON line here (removed on exit; "
        f"env {ENV_READY_FILE}) with the keys {', '.join(READY_FILE_KEYS)}: the worker's "
        "node id, the carrier's bound endpoint (tcp: HOST:PORT), the virtual port, the "
        "process id, the bound ops HTTP port (or null), the carrier name, and the sorted "
        "names of the handlers served",
    )
    ops.add_argument(
        "--include-tracebacks",
        action="store_true",
        help="development: send handler tracebacks to callers in error details",
    )
    ops.add_argument(
        "--otel-endpoint",
        metavar="URL",
        default=None,
        help="export OpenTelemetry spans over OTLP/HTTP to URL (or 'console'); also enabled by "
        f"{ENV_OTEL_ENDPOINT}; needs the 'otel' extra",
    )
    ops.add_argument(
        "--otel-service-name",
        metavar="NAME",
        default=_env(ENV_OTEL_SERVICE_NAME),
        help=f"service.name of exported spans (env {ENV_OTEL_SERVICE_NAME}; default {prog})",
    )

    flags: set[str] = set()
    for action in parser._actions:
        flags.update(action.option_strings)
    for plugin in plugins:
        group = parser.add_argument_group(f"plugin {plugin.name}", plugin.description or None)
        for option in plugin.options:
            if option.flag in flags:
                raise PluginError(
                    f"plugin {plugin.name!r}: option {option.flag} is already used by "
                    "the worker or another plugin"
                )
            flags.add(option.flag)
            extra = []
            if option.env:
                extra.append(f"env {option.env}")
            if option.default is not None:
                extra.append(f"default {option.default}")
            if option.required:
                extra.append("required")
            group.add_argument(
                option.flag,
                dest=_plugin_dest(plugin, option.key),
                metavar="VALUE",
                default=None,
                help=option.help + (f" ({'; '.join(extra)})" if extra else ""),
            )
    return parser


def _plugin_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, plugin: Plugin
) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for option in plugin.options:
        value = getattr(args, _plugin_dest(plugin, option.key), None)
        if value is None and option.env:
            value = _env(option.env)
        if value is None:
            value = option.default
        if value is None and option.required:
            where = f" or set {option.env}" if option.env else ""
            parser.error(f"plugin {plugin.name!r} needs {option.flag}{where}")
        values[option.key] = value
    return values


def _list_plugins(out: Any) -> int:
    found = discover_plugins()
    if not found:
        print(f"no plugins installed (entry-point group {PLUGIN_ENTRY_POINT_GROUP})", file=out)
        return EXIT_OK
    for name in sorted(found):
        item = found[name]
        if isinstance(item, PluginError):
            print(f"{name}  (broken: {item})", file=out)
            continue
        print(f"{name}  {item.description}".rstrip(), file=out)
        for option in item.options:
            bits = [option.help]
            if option.env:
                bits.append(f"env {option.env}")
            if option.default is not None:
                bits.append(f"default {option.default}")
            if option.required:
                bits.append("required")
            print(f"    {option.flag} VALUE  {'; '.join(bits)}", file=out)
    return EXIT_OK


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def main(
    argv: Sequence[str] | None = None,
    *,
    codec: PayloadCodec | None = None,
    prog: str = "pilot-worker",
    description: str | None = None,
    plugins: Sequence[Plugin] = (),
    setup: Callable[[PluginContext], Any] | None = None,
) -> int:
    """Run the worker command line and return its exit code.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).
        codec: Payload codec for every handler (default: identity).
        prog: Program name in help and errors.
        description: Replaces the help text's description.
        plugins: Plugins always loaded (their options are always on the
            command line), in addition to ``--plugin`` ones.
        setup: Called like a plugin's setup, after plugins, before serving.

    Returns:
        0 clean stop, 1 calls were cut or serving failed, 2 usage/config error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=None)
    pre.add_argument("--list-plugins", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.list_plugins:
        return _list_plugins(sys.stdout)
    names: list[str] = known.plugin or _env_list(ENV_PLUGINS)
    loaded: list[Plugin] = list(plugins)
    for name in names:
        try:
            loaded.append(load_plugin(name))
        except PluginError as exc:
            return _fail(prog, str(exc))
    try:
        parser = build_parser(prog, description, plugins=loaded)
    except PluginError as exc:
        return _fail(prog, str(exc))
    args = parser.parse_args(argv)
    if not args.handlers:
        args.handlers = _env_list(ENV_HANDLERS)
    plugin_options = {p.name: _plugin_options(parser, args, p) for p in loaded}
    log_handler = configure_logging(args.log_format, args.log_level)
    # Quiet libraries that log per request at INFO.
    logging.getLogger("watchfiles").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return asyncio.run(
            run(
                args,
                codec=codec,
                plugins=loaded,
                plugin_options=plugin_options,
                setup=setup,
                prog=prog,
                call_log=CallLogWriter(log_handler.stream, args.log_format, handler=log_handler),
            )
        )
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return EXIT_CUT


def _otel_setup(args: argparse.Namespace, prog: str) -> Callable[[], None] | None:
    endpoint = args.otel_endpoint or _env(ENV_OTEL_ENDPOINT)
    if not endpoint:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
            SpanExporter,
        )
    except ImportError as exc:
        raise WorkerError(
            "OpenTelemetry export needs the SDK: pip install 'pilot-worker[otel]'"
        ) from exc
    service = args.otel_service_name or prog
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if endpoint == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    else:
        try:
            otlp = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        except ImportError as exc:
            raise WorkerError(
                "OTLP export needs the exporter: pip install 'pilot-worker[otel]'"
            ) from exc
        exporter: SpanExporter
        if args.otel_endpoint:
            url = args.otel_endpoint.rstrip("/")
            if not url.endswith("/v1/traces"):
                url += "/v1/traces"
            exporter = otlp.OTLPSpanExporter(endpoint=url)
        else:
            exporter = otlp.OTLPSpanExporter()  # reads the standard OTEL_* variables
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider.shutdown


def _open_keys(identity_path: str | None, trust_path: str | None) -> tuple[Any, Any]:
    """Load the identity and open the trust store by ``pilot_transport.config``'s rule.

    Named files (flag or environment) must exist; with nothing named the
    config directory's ``identity.key`` is created on first run (logged with
    its path). The log says when nobody can connect yet, and why.

    Raises:
        pilot_transport.errors.TransportError: A file is missing or unusable (the message says why).
    """
    from pilot_transport import config

    identity = config.load_identity(identity_path)
    where = config.trust_path(trust_path)
    trust = config.open_trust(trust_path)
    if not (where.path.exists() or where.path.is_symlink()):
        logger.warning(
            "trust file %s does not exist: nobody can connect to this worker until a peer is "
            "added (`pilot-transport --trust %s trust add NAME KEY`)",
            where.path,
            where.path,
        )
    elif len(trust) == 0:
        logger.warning(
            "trust store %s lists no peers: nobody can connect to this worker", where.path
        )
    return identity, trust


def _remove_file(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _write_ready_file(path: str, info: Mapping[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(info)) + "\n", encoding="utf-8")
    os.replace(tmp, target)


async def run(
    args: argparse.Namespace,
    *,
    codec: PayloadCodec | None = None,
    plugins: Sequence[Plugin] = (),
    plugin_options: Mapping[str, Mapping[str, str | None]] | None = None,
    setup: Callable[[PluginContext], Any] | None = None,
    prog: str = "pilot-worker",
    call_log: CallLogWriter | None = None,
) -> int:
    """Run a worker from parsed arguments until SIGTERM/SIGINT; returns the exit code.

    ``call_log`` receives the one-line-per-call log (default: the
    ``pilot_worker.calls`` logger).
    """
    # Imported here so `--help` and `--list-plugins` stay fast.
    from pilot_transport import open_transport
    from pilot_transport.errors import TransportError

    from pilot_worker._reload import Reloader
    from pilot_worker._server import WorkerServer

    try:
        otel_shutdown = _otel_setup(args, prog)
    except WorkerError as exc:
        return _fail(prog, str(exc))
    try:
        identity, trust = _open_keys(args.identity, args.trust)
    except TransportError as exc:
        return _fail(prog, str(exc))
    try:
        config = WorkerConfig(
            port=args.port,
            default_policy=args.default_policy,
            introspection_allow=args.introspection_allow,
            overflow=args.overflow,
            max_queued_per_handler=args.max_queued,
            sync_threads=args.sync_threads,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            drain_timeout_secs=args.drain_timeout,
            log_calls=not args.no_call_log,
            include_tracebacks=args.include_tracebacks,
            max_connections_per_peer=args.max_connections_per_peer,
        )
        modules = [import_handler_module(ref) for ref in args.handlers]
        for ref, module in zip(args.handlers, modules, strict=True):
            if not collect_specs(module):
                where = getattr(module, "__file__", None) or module.__name__
                raise WorkerConfigError(
                    f"handlers module {ref!r} ({where}) defines no handlers: decorate the "
                    "functions to serve with @pilot_handler(...)"
                )
    except WorkerError as exc:
        return _fail(prog, str(exc))
    journal: Any = None
    if getattr(args, "idempotency_store", None):
        try:
            journal = _open_journal(args)
        except WorkerError as exc:
            return _fail(prog, str(exc))
    try:
        transport = await open_transport(args.transport, identity=identity, trust=trust)
    except TransportError as exc:
        return _fail(prog, f"cannot open transport {args.transport or '(default)'}: {exc}")
    exit_code = EXIT_OK
    ready_file: str | None = args.ready_file
    try:
        worker = WorkerServer(
            transport, config, codec=codec, call_log=call_log, idempotency_store=journal
        )
        if journal is not None:
            worker.on_shutdown(journal.aclose)
            logger.info("idempotency journal: %s (lease %.1f s)", journal.url, journal.lease_secs)
        try:
            for module in modules:
                worker.include_module(module)
            for plugin in plugins:
                context = PluginContext(
                    worker=worker,
                    options=dict((plugin_options or {}).get(plugin.name, {})),
                    transport=transport,
                    logger=logging.getLogger(f"pilot_worker.plugins.{plugin.name}"),
                    metrics_registry=worker.metrics_registry,
                )
                try:
                    result = plugin.setup(context)
                    if inspect.isawaitable(result):
                        await result
                except WorkerError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"plugin {plugin.name!r} setup failed: {type(exc).__name__}: {exc}"
                    ) from exc
            if setup is not None:
                result = setup(
                    PluginContext(
                        worker=worker,
                        options={},
                        transport=transport,
                        logger=logging.getLogger(f"pilot_worker.{prog}"),
                        metrics_registry=worker.metrics_registry,
                    )
                )
                if inspect.isawaitable(result):
                    await result
        except WorkerError as exc:
            await worker.aclose()
            return _fail(prog, str(exc))
        served = [name for name, spec in worker.handlers.items() if not spec.builtin]
        if not served:
            logger.warning("no handlers registered: only _health and _handlers are served")
        # Everything imported and built so far lives as long as the process:
        # keep the cyclic GC from rescanning it on every collection.
        gc.collect()
        gc.freeze()
        try:
            await worker.start()
        except (TransportError, OSError) as exc:
            await worker.aclose()
            return _fail(prog, f"cannot start serving: {exc}")
        exit_code = await _serve_until_signal(worker, modules, args, ready_file, Reloader)
    finally:
        if call_log is not None:
            call_log.flush()
        if ready_file:
            _remove_file(ready_file)
        await transport.aclose()
        if otel_shutdown is not None:
            otel_shutdown()
    return exit_code


def _open_journal(args: argparse.Namespace) -> Any:
    """The journal for ``--idempotency-store``; a clear error if the extra is missing."""
    try:
        from pilot_worker.journal import IdempotencyJournal
    except ModuleNotFoundError as exc:
        if exc.name != "sqlalchemy":
            raise
        raise JournalError(
            "--idempotency-store needs SQLAlchemy: pip install 'pilot-worker[journal]' "
            "(or 'pilot-worker[journal-postgres]' for PostgreSQL)"
        ) from exc
    return IdempotencyJournal(
        args.idempotency_store,
        lease_secs=args.idempotency_lease,
        retention_secs=args.idempotency_retention,
    )


async def _serve_until_signal(
    worker: Any,
    modules: list[Any],
    args: argparse.Namespace,
    ready_file: str | None,
    reloader_cls: Any,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen: list[int] = []
    main_task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            logger.info(
                "received %s: draining (up to %.1fs)",
                signal.Signals(signum).name,
                args.drain_timeout,
            )
            stop.set()
        elif main_task is not None:
            logger.warning("second signal: cutting in-flight calls now")
            main_task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    reload_stop = asyncio.Event()
    reload_task: asyncio.Task[None] | None = None
    try:
        info = await worker.describe_endpoint()
        info["handlers"] = sorted(n for n, s in worker.handlers.items() if not s.builtin)
        info = {key: info.get(key) for key in READY_FILE_KEYS}
        if ready_file:
            _write_ready_file(ready_file, info)
        logger.info(
            "serving node_id=%s endpoint=%s port=%s metrics_port=%s handlers=%s",
            info["node_id"],
            info["endpoint"],
            info["port"],
            info["metrics_port"],
            ",".join(info["handlers"]) or "-",
        )
        if args.reload and modules:
            reload_task = asyncio.create_task(
                reloader_cls(worker, modules).run(reload_stop), name="pilot-worker-reload"
            )
        closed = asyncio.create_task(worker.wait_closed())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            stopped.cancel()
        if worker.state != "serving":
            logger.error("the worker stopped serving unexpectedly")
            await worker.aclose()
            return EXIT_CUT
        reload_stop.set()
        cut = await worker.drain(args.drain_timeout)
        await worker.aclose()
        return EXIT_CUT if cut else EXIT_OK
    except asyncio.CancelledError:
        # Second signal: cancel everything still running.
        if main_task is not None:
            main_task.uncancel()
        await worker.drain(0)
        await worker.aclose()
        return EXIT_CUT
    finally:
        reload_stop.set()
        if reload_task is not None:
            reload_task.cancel()
            await asyncio.gather(reload_task, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


if __name__ == "__main__":  # python -m pilot_worker._cli (python -m pilot_worker is the same)
    sys.exit(main())
