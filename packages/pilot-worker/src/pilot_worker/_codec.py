"""The payload codec hook: how requests and results map to msgpack-able values."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["IdentityCodec", "PayloadCodec"]


@runtime_checkable
class PayloadCodec(Protocol):
    """Converts between wire values and what handlers see.

    ``decode_request`` receives the msgpack-decoded request and returns the
    handler's payload (before ``input_model`` validation); a failure is
    reported to the caller as ``INVALID_ARGUMENT``. ``encode_response``
    receives a result, a streamed item or a progress value (after
    ``output_model`` dumping) and returns a msgpack-able value; a failure is
    ``INTERNAL``. Both run on the event loop and must not block.
    """

    def decode_request(self, obj: Any) -> Any: ...

    def encode_response(self, value: Any) -> Any: ...


class IdentityCodec:
    """The default codec: values pass through unchanged."""

    def decode_request(self, obj: Any) -> Any:
        return obj

    def encode_response(self, value: Any) -> Any:
        return value
