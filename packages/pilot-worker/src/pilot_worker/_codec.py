"""The payload codec hook: how requests and results map to msgpack-able values."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["IdentityCodec", "PayloadCodec"]


@runtime_checkable
class PayloadCodec(Protocol):
    """Converts between wire values and what handlers see.

    ``decode_request`` receives the msgpack-decoded request and returns the
    handler's payload; the worker then validates it against the handler's
    ``input_model`` (a failure is ``INVALID_ARGUMENT``), so a codec may build
    typed objects without validating them. A decode failure is reported to
    the caller as ``INVALID_ARGUMENT``.

    ``encode_response`` receives a result, a streamed item or a progress
    value *exactly as the handler produced it* (an ``AIMessage``, a
    ``Document``, a user's pydantic model...; the worker only checks it
    against ``output_model``, it does not convert it) and returns a
    msgpack-able value; a failure is ``INTERNAL``. Both run on the event loop
    and must not block.

    A codec may also define ``is_control(value) -> bool``: true for a value
    that is not the handler's output but a message the codec's own
    middleware sends beside it (a streaming handler's ``output_model`` is
    then not applied to that item). Optional; without it every item is
    checked.
    """

    def decode_request(self, obj: Any) -> Any: ...

    def encode_response(self, value: Any) -> Any: ...


class IdentityCodec:
    """The default codec: plain values pass through unchanged.

    A pydantic model is sent as ``model_dump(mode="json")``; when the handler
    declares an ``output_model``, the worker dumps the validated value with
    that type (JSON mode) for this codec, as it always did. Requests are not
    transformed.
    """

    def decode_request(self, obj: Any) -> Any:
        return obj

    def encode_response(self, value: Any) -> Any:
        dump = getattr(value, "model_dump", None)
        if dump is not None and callable(dump) and not isinstance(value, type):
            return dump(mode="json")
        return value
