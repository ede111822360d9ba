"""Test helpers for code built on pilot-transport.

- :func:`create_test_peers`: identities and trust stores where every peer trusts
  every other.
- :func:`check_stream_conformance`: the behaviour every stream pair must show
  (run against every carrier and against ``SecureStream``).
"""

from pilot_transport.testing._conformance import ByteStream, check_stream_conformance
from pilot_transport.testing._daemon_double import PilotDaemonDouble, PilotNetworkDouble
from pilot_transport.testing._peers import TestPeer, TestPeers, create_test_peers

__all__ = [
    "ByteStream",
    "PilotDaemonDouble",
    "PilotNetworkDouble",
    "TestPeer",
    "TestPeers",
    "check_stream_conformance",
    "create_test_peers",
]
