"""OpenTelemetry server spans (API only; an SDK is wired by the CLI or the embedder)."""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["end_span", "start_server_span"]

_propagator = TraceContextTextMapPropagator()


def start_server_span(
    tracer: trace.Tracer,
    handler: str,
    traceparent: str | None,
    caller: str,
    request_id: str,
) -> tuple[trace.Span, object]:
    """Start a SERVER span continuing ``traceparent``; make it current.

    Returns the span and the context token to pass to :func:`end_span`.
    """
    parent = _propagator.extract({"traceparent": traceparent}) if traceparent else None
    span = tracer.start_span(
        handler,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "rpc.system": "pilot",
            "rpc.method": handler,
            "pilot.caller.node_id": caller,
            "pilot.request_id": request_id,
        },
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    return span, token


def end_span(span: trace.Span, token: object, code: str, message: str | None) -> None:
    """Record the call's status code on ``span``, end it and detach it."""
    try:
        if span.is_recording():
            span.set_attribute("rpc.pilot.status_code", code)
            if code != "OK":
                span.set_status(Status(StatusCode.ERROR, message or code))
        span.end()
    finally:
        otel_context.detach(token)  # pyright: ignore[reportArgumentType] -- token from attach()
