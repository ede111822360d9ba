"""Log formatting for the worker: one line per call, plain or JSON.

Call lines go to the logger ``pilot_worker.calls`` with these extra fields:
``request_id``, ``caller`` (node id), ``caller_name``, ``handler``, ``status``
(a status code name, ``OK`` on success) and ``duration_ms``. The JSON
formatter writes every such field as a key next to ``ts``, ``level``,
``logger`` and ``msg``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal, TextIO

__all__ = ["CALL_FIELDS", "JsonFormatter", "configure_logging"]

LogFormat = Literal["plain", "json"]

CALL_FIELDS = ("request_id", "caller", "caller_name", "handler", "status", "duration_ms", "reason")

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg`` and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class _CliHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs (so a second call replaces it)."""


def configure_logging(
    fmt: LogFormat = "plain", level: str | int = "INFO", *, stream: TextIO | None = None
) -> logging.Handler:
    """Send the root logger to ``stream`` (stderr) in the given format; returns the handler.

    Meant for the CLI; a library embedding a worker configures logging itself.
    """
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
