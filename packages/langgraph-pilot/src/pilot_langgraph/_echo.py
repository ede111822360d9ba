"""PilotEchoRunnable: a round trip to a peer, for smoke tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pilot_langgraph._env import DEFAULT_PORT
from pilot_langgraph._remote import PilotRemoteRunnable

if TYPE_CHECKING:
    from pilot_transport import Transport

__all__ = ["ECHO_HANDLER", "PilotEchoRunnable"]

ECHO_HANDLER = "lg.echo"
"""Name of the echo handler every ``pilot-langgraph-worker`` serves."""


class PilotEchoRunnable(PilotRemoteRunnable):
    """Send the input to ``peer`` and get it back unchanged.

    Proves the whole path (trust, transport, RPC, the LangGraph codec) with one
    call: messages, pydantic models and datetimes come back as what they were.
    The peer must be a ``pilot-langgraph-worker`` (it serves ``lg.echo``).

    Args:
        peer: One peer or several (see :class:`PilotRemoteRunnable`).
        port: Virtual port of the worker (default 5000).
        timeout_secs: Deadline of each attempt.
        transport: Explicit transport (default: the process-wide one).

    Safe to repeat; cancellation cancels the call.
    """

    def __init__(
        self,
        *,
        peer: str | Sequence[str],
        port: int = DEFAULT_PORT,
        timeout_secs: float | None = 10.0,
        transport: Transport | None = None,
    ) -> None:
        super().__init__(
            node=ECHO_HANDLER,
            peer=peer,
            port=port,
            timeout_secs=timeout_secs,
            transport=transport,
            name="PilotEcho",
        )
