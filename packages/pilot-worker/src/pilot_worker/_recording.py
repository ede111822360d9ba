"""What every call leaves behind: one span, one stats sample, one log line."""

from __future__ import annotations

import logging
from typing import Protocol

from opentelemetry import trace

from pilot_worker._call import IncomingCall, PeerLike
from pilot_worker._logging import CallLogWriter
from pilot_worker._registry import HandlerEntry
from pilot_worker._tracing import end_span, start_server_span

__all__ = ["CallRecorder"]

call_logger = logging.getLogger("pilot_worker.calls")

_NO_SPAN: trace.Span = trace.INVALID_SPAN
NO_SPAN = _NO_SPAN
"""Stands for no span: :meth:`CallRecorder.record` then ends none."""


class _Identified(Protocol):
    """What :meth:`CallRecorder.record` reads of a call (``IncomingCall`` has it)."""

    @property
    def peer(self) -> PeerLike: ...

    @property
    def request_id(self) -> str: ...


class CallRecorder:
    """Opens the call's OpenTelemetry span and records its outcome.

    Args:
        tracer: The worker's tracer.
        explicit_tracer: A tracer provider was given (else the global one is
            looked up at most once a second, and spans are skipped while no
            SDK is configured).
        log_calls: Write one line per call.
        call_log: Where that line goes (``None``: the ``pilot_worker.calls`` logger).
    """

    def __init__(
        self,
        tracer: trace.Tracer,
        *,
        explicit_tracer: bool,
        log_calls: bool,
        call_log: CallLogWriter | None,
    ) -> None:
        self._tracer = tracer
        self._explicit_tracer = explicit_tracer
        self._tracing_on = False
        self._tracing_recheck_at = 0.0
        self._log_calls = log_calls
        self._call_log = call_log

    def start_span(
        self, name: str, call: IncomingCall, node_id: str, now: float
    ) -> tuple[trace.Span, object | None]:
        """The call's SERVER span and the context token attaching it (or no span)."""
        if not self._explicit_tracer:
            if now >= self._tracing_recheck_at:
                # Looking the provider up reads the environment: do it once a second.
                provider = trace.get_tracer_provider()
                self._tracing_on = not isinstance(provider, trace.ProxyTracerProvider)
                self._tracing_recheck_at = now + 1.0
            if not self._tracing_on:
                # No SDK configured anywhere: skip the no-op span and its context switch.
                return _NO_SPAN, None
        return start_server_span(self._tracer, name, call.traceparent, node_id, call.request_id)

    @staticmethod
    def detach(token: object | None) -> None:
        """Detach a span's context token (a stream re-enters the span per step)."""
        if token is not None:
            from opentelemetry import context as otel_context

            otel_context.detach(token)  # pyright: ignore[reportArgumentType]

    def record(
        self,
        entry: HandlerEntry,
        call: _Identified,
        code: str,
        reason: str | None,
        message: str | None,
        duration: float,
        span: trace.Span,
        token: object | None,
    ) -> None:
        """Count the call, end its span and write its log line."""
        entry.stats.observe(code, duration)
        if span is _NO_SPAN:
            pass
        elif token is not None:
            end_span(span, token, code, message)
        else:
            _end_detached(span, code, message)
        if not self._log_calls:
            return
        peer = call.peer
        writer = self._call_log
        if writer is not None:
            writer.write(
                handler=entry.spec.name,
                status=code,
                duration_ms=duration * 1000,
                caller=peer.node_id,
                caller_name=peer.name,
                request_id=call.request_id,
                reason=reason,
            )
            return
        level = logging.INFO if code == "OK" else logging.WARNING
        if call_logger.isEnabledFor(level):
            duration_ms = round(duration * 1000, 3)
            # makeRecord + handle: one line per call without logging's stack walk.
            record = call_logger.makeRecord(
                call_logger.name,
                level,
                "",
                0,
                "%s %s %.3fms caller=%s request_id=%s%s",
                (
                    entry.spec.name,
                    code,
                    duration_ms,
                    peer.node_id,
                    call.request_id,
                    f" reason={reason}" if reason else "",
                ),
                None,
                extra={
                    "request_id": call.request_id,
                    "caller": peer.node_id,
                    "caller_name": peer.name,
                    "handler": entry.spec.name,
                    "status": code,
                    "duration_ms": duration_ms,
                    "reason": reason,
                },
            )
            call_logger.handle(record)


def _end_detached(span: trace.Span, code: str, message: str | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    if span.is_recording():
        span.set_attribute("rpc.pilot.status_code", code)
        if code != "OK":
            span.set_status(Status(StatusCode.ERROR, message or code))
    span.end()
