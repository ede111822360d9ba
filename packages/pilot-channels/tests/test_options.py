from __future__ import annotations

import json
from pathlib import Path

import pytest
from pilot_channels import (
    AclRule,
    BrokerOptions,
    ChannelConfigError,
    DurableTopic,
    PublisherOptions,
    ReconnectPolicy,
    Retention,
    SlowConsumerPolicy,
    SubscribeOptions,
)
from pilot_channels._plugin import options_from_plugin


@pytest.mark.parametrize(
    "build",
    [
        lambda: Retention(max_events=0),
        lambda: Retention(max_age_secs=float("nan")),
        lambda: AclRule(pattern="a.>.b"),
        lambda: AclRule(pattern="a", publish="node"),
        lambda: DurableTopic(pattern=""),
        lambda: BrokerOptions(default_access="maybe"),  # type: ignore[arg-type]
        lambda: BrokerOptions(default_queue=0),
        lambda: BrokerOptions(default_queue=10, max_queue=5),
        lambda: BrokerOptions(default_policy="never"),  # type: ignore[arg-type]
        lambda: BrokerOptions(block_timeout_secs=-1),
        lambda: ReconnectPolicy(multiplier=0.5),
        lambda: ReconnectPolicy(jitter=2),
        lambda: SubscribeOptions(queue_size=0),
        lambda: SubscribeOptions(policy="sometimes"),  # type: ignore[arg-type]
        lambda: SubscribeOptions(start="middle"),  # type: ignore[arg-type]
        lambda: SubscribeOptions(resume_after=-1),
        lambda: PublisherOptions(max_batch=0),
    ],
)
def test_invalid_options_are_refused_at_construction(build) -> None:
    with pytest.raises(ChannelConfigError):
        build()


def test_backoff_grows_and_is_capped() -> None:
    policy = ReconnectPolicy(initial_backoff_secs=0.1, max_backoff_secs=1.0, jitter=0)
    assert [policy.backoff(n, 0.5) for n in (1, 2, 3, 10)] == [0.1, 0.2, 0.4, 1.0]


def test_broker_options_from_json(tmp_path: Path) -> None:
    path = tmp_path / "broker.json"
    path.write_text(
        json.dumps(
            {
                "acl": [{"pattern": "a.>", "publish": ["n1"]}],
                "durable": ["orders.>", {"pattern": "audit.*", "retention": {"max_events": 5}}],
                "default_policy": "disconnect",
            }
        )
    )
    options = BrokerOptions.from_json_file(path)
    assert options.acl[0].publish == frozenset({"n1"})
    assert options.durable[1].retention.max_events == 5
    assert options.default_policy is SlowConsumerPolicy.DISCONNECT
    with pytest.raises(ChannelConfigError, match="unknown broker option"):
        BrokerOptions.from_mapping({"nope": 1})
    path.write_text("[1]")
    with pytest.raises(ChannelConfigError):
        BrokerOptions.from_json_file(path)


def test_plugin_option_values(tmp_path: Path) -> None:
    options = options_from_plugin(
        {
            "channels_db": str(tmp_path / "x.db"),
            "channels_durable": "orders.>, audit.*",
            "channels_policy": "block",
            "channels_queue": "100000",
            "channels_config": None,
        }
    )
    assert [d.pattern for d in options.durable] == ["orders.>", "audit.*"]
    assert options.default_policy is SlowConsumerPolicy.BLOCK
    assert options.default_queue == 100000
    assert options.log_path == str(tmp_path / "x.db")
    with pytest.raises(ChannelConfigError):
        options_from_plugin({"channels_queue": "many"})
