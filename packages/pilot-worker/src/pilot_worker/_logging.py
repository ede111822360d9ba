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

    Lines are written in batches: at most ``flush_interval`` seconds (0.1)
    after the first pending line, or at once past 512 pending lines, and on
    :meth:`flush` (the CLI flushes on exit). A write system call per call
    would otherwise be the single largest cost of a call. A process killed
    with SIGKILL may lose the last ``flush_interval`` of call lines.
    """

    def __init__(
        self,
        stream: TextIO,
        fmt: LogFormat = "plain",
        *,
        handler: logging.Handler | None = None,
        flush_interval: float = 0.1,
    ) -> None:
        self._stream = stream
        self._interval = flush_interval
        self._json = fmt == "json"
        self._handler = handler
        self._logger = logging.getLogger(_CALLS_LOGGER)
        self._pending: list[str] = []
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        self._millis = -1
        self._time_text = ""
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
        millis_total = int(now * 1000)
        if millis_total == self._millis:  # several calls finish within a millisecond
            return self._time_text
        self._millis = millis_total
        second, millis = divmod(millis_total, 1000)
        if second != self._second:
            self._second = second
            if self._json:
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        self._time_text = (
            f"{self._stamp}.{millis:03d}Z" if self._json else f"{self._stamp},{millis:03d}"
        )
        return self._time_text

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
        ok = status == "OK"
        if not self._logger.isEnabledFor(logging.INFO if ok else logging.WARNING):
            return
        levelname = "INFO" if ok else "WARNING"
        if self._json:
            enc = self._encoded
            h = enc(handler)
            line = (
                f'{{"ts":"{self._time()}","level":"{levelname}","logger":"{_CALLS_LOGGER}",'
                f'"msg":"{h[1:-1]} {status}","request_id":{encode_basestring(request_id)},'
                f'"caller":{enc(caller)},'
                f'"caller_name":{enc(caller_name) if caller_name is not None else "null"},'
                f'"handler":{h},"status":"{status}","duration_ms":{duration_ms:.3f},'
                f'"reason":{enc(reason) if reason else "null"}}}\n'
            )
        else:
            line = (
                f"{self._time()} {levelname} {_CALLS_LOGGER}: {handler} {status} "
                f"{duration_ms:.3f}ms caller={caller} request_id={request_id}"
                + (f" reason={reason}" if reason else "")
                + "\n"
            )
        pending = self._pending
        pending.append(line)
        if len(pending) >= 512:
            self.flush()
        elif not self._scheduled:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)
                self._scheduled = True
            except RuntimeError:  # no loop: write now
                self.flush()

    def flush(self) -> None:
        """Write every queued line now. Safe to call at any time, from the loop thread."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
