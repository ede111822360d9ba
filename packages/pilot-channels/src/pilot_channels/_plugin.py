"""The ``channels`` worker plugin: serves a :class:`Broker` to peers.

``pilot-worker --plugin channels [--channels-config broker.json]
[--channels-db events.db] [--channels-durable 'orders.>,audit.*']
[--channels-policy drop_oldest] [--channels-queue 1024]``
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pilot_worker import Context, HandlerSpec, Plugin, PluginContext, PluginOption

from ._broker import Broker
from ._env import ENV_CONFIG, ENV_DB, ENV_DURABLE, ENV_POLICY, ENV_QUEUE
from ._errmap import to_rpc
from ._options import BrokerOptions, DurableTopic
from ._wire import METHOD_PUBLISH, METHOD_STATS, METHOD_SUBSCRIBE, encode_events
from .errors import ChannelConfigError, ChannelError

__all__ = ["broker_handlers", "plugin"]

_BATCH = 512


def _dict(request: Any, what: str) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise ChannelConfigError(f"{what} request must be a map")
    return request  # pyright: ignore[reportUnknownVariableType]


def broker_handlers(broker: Broker) -> list[HandlerSpec]:
    """The worker handlers that serve ``broker`` (register each on a WorkerServer).

    ``channels.subscribe`` (streaming), ``channels.publish`` and
    ``channels.stats``; the caller's authenticated node id is what the topic
    ACL checks.
    """

    async def subscribe(request: Any, ctx: Context) -> AsyncIterator[Any]:
        try:
            req = _dict(request, "subscribe")
            sub = broker.subscribe(
                req.get("pattern"),  # pyright: ignore[reportArgumentType]
                node_id=ctx.caller_node_id,
                queue_size=req.get("queue"),
                policy=req.get("policy"),
                after=req.get("after"),
                start=req.get("start") or "latest",
            )
        except ChannelError as exc:
            raise to_rpc(exc) from exc
        try:
            yield {
                "ready": {
                    "sub": sub.id,
                    "cursor": sub.cursor,
                    "head": broker.head,
                    "queue": sub.queue_size,
                    "policy": sub.policy.value,
                }
            }
            while True:
                try:
                    batch = await sub.next_batch(_BATCH)
                except ChannelError as exc:
                    raise to_rpc(exc) from exc
                yield {"ev": encode_events(batch), "dropped": sub.dropped}
        finally:
            sub.close()

    async def publish(request: Any, ctx: Context) -> Any:
        try:
            req = _dict(request, "publish")
            raw = req.get("ev")
            if not isinstance(raw, list):
                raise ChannelConfigError("publish request needs an 'ev' list")
            events: list[tuple[str, Any]] = []
            for item in raw:  # pyright: ignore[reportUnknownVariableType]
                if not isinstance(item, list) or len(item) != 2:  # pyright: ignore[reportUnknownArgumentType]
                    raise ChannelConfigError("each published event must be [topic, payload]")
                events.append((item[0], item[1]))
            offsets = await broker.publish_many(events, publisher=ctx.caller_node_id)
        except ChannelError as exc:
            raise to_rpc(exc) from exc
        return {"offsets": offsets}

    async def stats(request: Any, ctx: Context) -> Any:
        # Totals for everyone; details only of the caller's own subscriptions.
        subs = broker.subscriptions
        own = [s for s in subs if s.node_id == ctx.caller_node_id]
        return {
            "subscribers": len(subs),
            "head": broker.head,
            "log_events": broker.log.events if broker.log else 0,
            "subscriptions": [
                {
                    "sub": s.id,
                    "pattern": s.pattern.text,
                    "policy": s.policy.value,
                    "queue": s.queue_size,
                    "depth": s.depth,
                    "dropped": s.dropped,
                    "delivered": s.delivered,
                    "lagging": s.lagging,
                }
                for s in own
            ],
        }

    return [
        HandlerSpec(
            name=METHOD_SUBSCRIBE,
            fn=subscribe,
            timeout_secs=None,
            description="Subscribe to topics matching a pattern (server streaming).",
        ),
        HandlerSpec(
            name=METHOD_PUBLISH,
            fn=publish,
            timeout_secs=60.0,
            description="Publish events: [[topic, payload], ...].",
        ),
        HandlerSpec(
            name=METHOD_STATS,
            fn=stats,
            timeout_secs=10.0,
            description="Broker totals and the caller's own subscriptions' queue depths.",
        ),
    ]


def options_from_plugin(values: dict[str, str | None]) -> BrokerOptions:
    """BrokerOptions from the plugin's command-line values.

    Raises:
        ChannelConfigError: a value is invalid.
    """
    overrides: dict[str, Any] = {}
    if values.get("channels_db"):
        overrides["log_path"] = values["channels_db"]
    if values.get("channels_policy"):
        overrides["default_policy"] = values["channels_policy"]
    queue = values.get("channels_queue")
    if queue:
        try:
            overrides["default_queue"] = int(queue)
        except ValueError as exc:
            raise ChannelConfigError(f"--channels-queue must be an int, got {queue!r}") from exc
    config = values.get("channels_config")
    base = BrokerOptions.from_json_file(config) if config else BrokerOptions()
    durable = values.get("channels_durable")
    if durable:
        extra = [DurableTopic(pattern=p.strip()) for p in durable.split(",") if p.strip()]
        overrides["durable"] = [*base.durable, *extra]
    if "default_queue" in overrides and overrides["default_queue"] > base.max_queue:
        overrides["max_queue"] = overrides["default_queue"]
    fields = {name: getattr(base, name) for name in BrokerOptions.__dataclass_fields__}
    fields.update(overrides)
    return BrokerOptions.from_mapping(fields)


async def _setup(ctx: PluginContext) -> None:
    options = options_from_plugin(dict(ctx.options))
    broker = Broker(options, registry=ctx.metrics_registry)
    broker.start()
    for spec in broker_handlers(broker):
        ctx.worker.register(spec)
    ctx.worker.on_shutdown(broker.aclose)
    ctx.logger.info(
        "channels broker ready: %d durable pattern(s), log %s, default policy %s",
        len(options.durable),
        options.log_path or "in memory",
        options.default_policy.value,
    )


plugin = Plugin(
    name="channels",
    description="Pub/sub topics: a broker with wildcards, ACL, durable topics.",
    options=(
        PluginOption(
            flag="--channels-config",
            help="JSON file of broker options (acl, durable topics, limits)",
            env=ENV_CONFIG,
        ),
        PluginOption(flag="--channels-db", help="SQLite file of the durable topic log", env=ENV_DB),
        PluginOption(
            flag="--channels-durable",
            help="comma-separated patterns of durable topics",
            env=ENV_DURABLE,
        ),
        PluginOption(
            flag="--channels-policy",
            help="default slow-consumer policy: drop_oldest, block, disconnect",
            env=ENV_POLICY,
        ),
        PluginOption(
            flag="--channels-queue", help="default per-subscriber queue length", env=ENV_QUEUE
        ),
    ),
    setup=_setup,
)
