"""Log formatting for the worker: one line per call, plain or JSON.

Call lines go to the logger ``pilot_worker.calls`` with these extra fields:
``request_id``, ``caller`` (node id), ``caller_name``, ``handler``, ``status``
(a status code name, ``OK`` on success) and ``duration_ms``. The JSON
formatter writes every such field as a key next to ``ts``, ``level``,
``logger`` and ``msg``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from json.encoder import encode_basestring
from typing import Any, Literal, TextIO

__all__ = ["CALL_FIELDS", "CallLogWriter", "JsonFormatter", "configure_logging"]

LogFormat = Literal["plain", "json"]

CALL_FIELDS = ("request_id", "caller", "caller_name", "handler", "status", "duration_ms", "reason")

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg`` and any extras."""

    _encoder = json.JSONEncoder(default=str, separators=(",", ":"), ensure_ascii=False)

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def _timestamp(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._timestamp(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key[0] != "_":
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return self._encoder.encode(out)


class _CliHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs (so a second call replaces it)."""


def configure_logging(
    fmt: LogFormat = "plain", level: str | int = "INFO", *, stream: TextIO | None = None
) -> logging.StreamHandler[TextIO]:
    """Send the root logger to ``stream`` (stderr) in the given format; returns the handler.

    Meant for the CLI, which owns its process's logging: it also stops
    ``logging`` from collecting thread and process names on every record (our
    formats do not show them, and the call log writes a record per call).
    A library embedding a worker configures logging itself.
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = _CliHandler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _CliHandler):  # replace only what an earlier call installed
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


_CALLS_LOGGER = "pilot_worker.calls"


class CallLogWriter:
    """Writes the one-line-per-call log straight to a stream, in the CLI's format.

    Same lines as the ``pilot_worker.calls`` logger would produce through
    :func:`configure_logging`'s handler (same JSON keys, same plain layout),
    without building a ``LogRecord`` per call: at thousands of calls per
    second that machinery costs more than the call itself. Lines produced
    during one event-loop iteration are written together at its end (one
    write, under the logging handler's lock so they never interleave with
    other log lines). The ``pilot_worker.calls`` logger's level still applies.
    """

    def __init__(
        self, stream: TextIO, fmt: LogFormat = "plain", *, handler: logging.Handler | None = None
    ) -> None:
        self._stream = stream
        self._json = fmt == "json"
        self._handler = handler
        self._logger = logging.getLogger(_CALLS_LOGGER)
        self._pending: list[str] = []
        self._scheduled = False
        self._second = -1
        self._stamp = ""
        self._cache: dict[str, str] = {}

    def _encoded(self, text: str) -> str:
        """JSON string literal of ``text``, cached (handler names and callers repeat)."""
        value = self._cache.get(text)
        if value is None:
            if len(self._cache) >= 4096:
                self._cache.clear()
            value = self._cache[text] = encode_basestring(text)
        return value

    def _time(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            if self._json:
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        millis = int((now - second) * 1000)
        return f"{self._stamp}.{millis:03d}Z" if self._json else f"{self._stamp},{millis:03d}"

    def write(
        self,
        *,
        handler: str,
        status: str,
        duration_ms: float,
        caller: str,
        caller_name: str | None,
        request_id: str,
        reason: str | None,
    ) -> None:
        """Queue the line of one finished call (never blocks, never raises)."""
        level = logging.INFO if status == "OK" else logging.WARNING
        if not self._logger.isEnabledFor(level):
            return
        levelname = "INFO" if level == logging.INFO else "WARNING"
        if self._json:
            enc = self._encoded
            h = enc(handler)
            c = enc(caller)
            r = encode_basestring(request_id)
            why = enc(reason) if reason else "null"
            tail = f" reason={why[1:-1]}" if reason else ""
            name = enc(caller_name) if caller_name is not None else "null"
            line = (
                f'{{"ts":"{self._time()}","level":"{levelname}","logger":"{_CALLS_LOGGER}",'
                f'"msg":"{h[1:-1]} {status} {duration_ms:.3f}ms caller={c[1:-1]} '
                f'request_id={r[1:-1]}{tail}","request_id":{r},"caller":{c},'
                f'"caller_name":{name},"handler":{h},"status":"{status}",'
                f'"duration_ms":{duration_ms!r},"reason":{why}}}\n'
            )
        else:
            line = (
                f"{self._time()} {levelname} {_CALLS_LOGGER}: {handler} {status} "
                f"{duration_ms:.3f}ms caller={caller} request_id={request_id}"
                + (f" reason={reason}" if reason else "")
                + "\n"
            )
        self._pending.append(line)
        if len(self._pending) >= 512:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:  # no loop: write now
                self.flush()

    def flush(self) -> None:
        """Write every queued line now."""
        self._scheduled = False
        if not self._pending:
            return
        data = "".join(self._pending)
        self._pending.clear()
        handler = self._handler
        if handler is not None:
            handler.acquire()
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):  # closed or broken stream: drop, like logging does
            pass
        finally:
            if handler is not None:
                handler.release()
