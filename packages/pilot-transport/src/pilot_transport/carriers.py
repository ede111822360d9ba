"""The interface for carriers that other distributions add to pilot-transport.

A carrier moves unauthenticated bytes between two hosts; pilot-transport runs
TLS 1.3 with mutual authentication over every stream it opens, so a carrier
never decides trust. To add one for a new URL scheme:

1. subclass :class:`Carrier` (dial and bind) and return :class:`CarrierStream` /
   :class:`CarrierListener` objects, raising only :mod:`pilot_transport.errors`
   exceptions;
2. expose a factory ``factory(url: str, identity: Identity, options:
   TransportOptions) -> Carrier``;
3. declare it as an entry point in the group :data:`CARRIER_ENTRY_POINT_GROUP`
   whose name is the scheme, for example in ``pyproject.toml``::

       [project.entry-points."pilot_transport.carriers"]
       myscheme = "my_package.carrier:carrier_factory"

``open_transport("myscheme://...")`` then finds it. The built-in schemes
``tcp``, ``memory`` and ``pilot`` cannot be overridden. ``pilot-node`` registers
``pilotnode://`` this way.
"""

from __future__ import annotations

from pilot_transport._carrier import Carrier, CarrierListener, CarrierStream, DialTarget
from pilot_transport._transport import CARRIER_ENTRY_POINT_GROUP

__all__ = [
    "CARRIER_ENTRY_POINT_GROUP",
    "Carrier",
    "CarrierListener",
    "CarrierStream",
    "DialTarget",
]
