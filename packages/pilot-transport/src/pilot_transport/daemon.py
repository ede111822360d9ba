"""The local Pilot daemon's socket, for its built-in services (event stream, info).

Most code reaches peers through :func:`pilot_transport.open_transport` with a
``pilot:///path/to/pilot.sock`` URL and never needs this module. It is for
clients of the daemon's own services that are not TLS streams between our
peers, such as the daemon's event stream on port 1002 (pilot-channels'
``PilotChannel.from_daemon``) or ``pilot-transport info``.

Raises ``ImportError`` in an installation without the ``pilot://`` carrier.
"""

from __future__ import annotations

from pilot_transport._carriers.pilot import (
    DEFAULT_SOCKET_PATH,
    PilotCarrier,
    PilotCarrierOptions,
    PilotStream,
)

__all__ = ["DEFAULT_SOCKET_PATH", "PilotCarrier", "PilotCarrierOptions", "PilotStream"]
