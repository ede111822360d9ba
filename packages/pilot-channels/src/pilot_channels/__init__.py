"""pilot-channels: many-to-many pub/sub topics between pilot workers and agents.

A broker runs as the ``channels`` plugin of any pilot worker; clients subscribe
with :class:`PilotChannel` and publish with :class:`PilotPublisher` (or
:func:`publish_once`)::

    async with PilotChannel(transport, "agents.>", peer="broker") as channel:
        async for event in channel:
            print(event.topic, event.payload, event.publisher)

See the package README for the pattern syntax, delivery guarantees,
slow-consumer policies, durable topics, Pilot daemon interop and metrics.
"""

from __future__ import annotations

from pilot_channels._broker import Broker, Subscription
from pilot_channels._client import DEFAULT_PORT, PilotChannel, PilotPublisher, publish_once
from pilot_channels._event import Event
from pilot_channels._options import (
    AclRule,
    BrokerOptions,
    DurableTopic,
    PublisherOptions,
    ReconnectPolicy,
    Retention,
    SlowConsumerPolicy,
    SubscribeOptions,
)
from pilot_channels._plugin import broker_handlers, plugin
from pilot_channels._topics import TopicPattern, compile_pattern, validate_topic
from pilot_channels.errors import (
    BrokerProtocolError,
    BrokerUnavailableError,
    ChannelClosedError,
    ChannelConfigError,
    ChannelError,
    ChannelNetworkError,
    ChannelPermissionError,
    ChannelTimeoutError,
    ChannelUsageError,
    DurableLogError,
    InvalidPatternError,
    InvalidTopicError,
    PayloadTooLargeError,
    SlowConsumerError,
    SubscriptionLimitError,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PORT",
    "AclRule",
    "Broker",
    "BrokerOptions",
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
    "DurableTopic",
    "Event",
    "InvalidPatternError",
    "InvalidTopicError",
    "PayloadTooLargeError",
    "PilotChannel",
    "PilotPublisher",
    "PublisherOptions",
    "ReconnectPolicy",
    "Retention",
    "SlowConsumerError",
    "SlowConsumerPolicy",
    "SubscribeOptions",
    "Subscription",
    "SubscriptionLimitError",
    "TopicPattern",
    "__version__",
    "broker_handlers",
    "compile_pattern",
    "plugin",
    "publish_once",
    "validate_topic",
]
