"""pilot-rpc: multiplexed, streaming, cancellable RPC over pilot-transport.

Call a named method on a peer and get a reply, or a stream of replies::

    server = RpcServer()

    @server.unary("echo")
    async def echo(request, ctx):
        return request

    async with server.serve_in_background(await transport.listen(5000)):
        async with RpcClient(other_transport) as client:
            assert await client.call("server", 5000, "echo", {"hi": 1}) == {"hi": 1}
"""

from pilot_rpc._client import BidiStream, RequestStream, ResponseStream, RpcClient
from pilot_rpc._context import CallContext
from pilot_rpc._options import ClientOptions, RetryPolicy, ServerOptions
from pilot_rpc._runtime import (
    PilotClient,
    aclose_default_clients,
    configure_default_client,
    default_client,
)
from pilot_rpc._server import RpcServer
from pilot_rpc._types import MethodKind, StreamLike, TransportLike
from pilot_rpc.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    ErrorInfo,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    RpcError,
    StatusCode,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AlreadyExists",
    "BidiStream",
    "CallContext",
    "Cancelled",
    "ClientOptions",
    "DataLoss",
    "DeadlineExceeded",
    "ErrorInfo",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "MethodKind",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PilotClient",
    "RequestStream",
    "ResourceExhausted",
    "ResponseStream",
    "RetryPolicy",
    "RpcClient",
    "RpcError",
    "RpcServer",
    "ServerOptions",
    "StatusCode",
    "StreamLike",
    "TransportLike",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "aclose_default_clients",
    "configure_default_client",
    "default_client",
]
