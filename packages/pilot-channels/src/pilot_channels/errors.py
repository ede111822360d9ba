"""Errors raised by pilot-channels.

Every exception this package raises derives from :class:`ChannelError`. Errors
of the layers below (``pilot_rpc``, ``pilot_transport``, ``sqlite3``) are
translated at the boundary and chained with ``from``.

*Usage* errors (you called the API wrong; retrying will not help) are kept apart
from *network/broker* errors (the broker, the daemon or the network failed; a
retry may help, and a subscribing :class:`~pilot_channels.PilotChannel` retries
them by itself)::

    ChannelError
    ├── ChannelUsageError
    │   ├── InvalidTopicError (ValueError)       a topic name breaks the syntax
    │   ├── InvalidPatternError (ValueError)     a subscription pattern breaks the syntax
    │   ├── PayloadTooLargeError (ValueError)    payload above the configured limit
    │   ├── ChannelClosedError                   used after aclose()
    │   └── ChannelConfigError (ValueError)      invalid options or broker configuration
    │       └── SubscriptionLimitError           the broker's or this peer's subscription cap
    ├── ChannelPermissionError (PermissionError) the topic ACL refuses this node
    ├── ChannelTimeoutError (TimeoutError)       recv(timeout=...) or publish timed out
    ├── ChannelNetworkError (ConnectionError)
    │   ├── BrokerUnavailableError               cannot reach the broker (or daemon)
    │   ├── SlowConsumerError                    the broker disconnected a slow subscriber
    │   └── BrokerProtocolError                  the broker (or daemon) broke the protocol
    └── DurableLogError                          the durable log cannot be opened or written
"""

from __future__ import annotations

__all__ = [
    "BrokerProtocolError",
    "BrokerUnavailableError",
    "ChannelClosedError",
    "ChannelConfigError",
    "ChannelError",
    "ChannelNetworkError",
    "ChannelPermissionError",
    "ChannelTimeoutError",
    "ChannelUsageError",
    "DurableLogError",
    "InvalidPatternError",
    "InvalidTopicError",
    "PayloadTooLargeError",
    "SlowConsumerError",
    "SubscriptionLimitError",
]


class ChannelError(Exception):
    """Root of every error raised by pilot-channels."""


class ChannelUsageError(ChannelError):
    """The API was called or configured wrongly; retrying will not help."""


class InvalidTopicError(ChannelUsageError, ValueError):
    """A topic name breaks the topic syntax; the message names the bad part."""


class InvalidPatternError(ChannelUsageError, ValueError):
    """A subscription pattern breaks the pattern syntax; the message names the bad part."""


class PayloadTooLargeError(ChannelUsageError, ValueError):
    """A payload is larger than the broker's (or client's) configured limit."""


class ChannelClosedError(ChannelUsageError):
    """The channel or publisher was used after ``aclose()``."""


class ChannelConfigError(ChannelUsageError, ValueError):
    """Options or a broker configuration are invalid; the message names the field."""


class SubscriptionLimitError(ChannelConfigError):
    """A subscription was refused because a cap is reached.

    Either this node already holds ``BrokerOptions.max_subscriptions_per_peer``
    subscriptions (256 by default) or the broker holds ``max_subscriptions``
    (10,000). Close a subscription before opening another; a subscribing
    channel does not retry this error by itself.
    """


class ChannelPermissionError(ChannelError, PermissionError):
    """The broker's topic ACL does not let this node publish or subscribe."""


class ChannelTimeoutError(ChannelError, TimeoutError):
    """A wait with a timeout (``recv``, ``publish``) ran out of time."""


class ChannelNetworkError(ChannelError, ConnectionError):
    """The broker, the daemon or the network failed; a retry may succeed."""


class BrokerUnavailableError(ChannelNetworkError):
    """The broker (or the Pilot daemon) cannot be reached or went away."""


class SlowConsumerError(ChannelNetworkError):
    """The broker disconnected this subscriber because its queue stayed full."""


class BrokerProtocolError(ChannelNetworkError):
    """The broker or daemon sent something this client cannot understand."""


class DurableLogError(ChannelError):
    """The durable topic log cannot be opened, read or written."""
