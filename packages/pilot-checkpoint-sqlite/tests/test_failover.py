"""Failover over the store workers of a tier: ``PilotCheckpointSaver(peer=[...])``.

The RPC client is replaced by a scripted one (each attempt's outcome per
peer); the real-process test with PostgreSQL and kill -9 is
``integration-tests/tests/test_checkpoint_store_tier.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
from pilot_checkpoint_sqlite import PilotCheckpointSaver, SaverOptions, _wire
from pilot_checkpoint_sqlite._remote import RemoteBackend
from pilot_checkpoint_sqlite.errors import (
    CheckpointConfigError,
    CheckpointStoreError,
    StoreUnavailableError,
)
from pilot_rpc import ClientOptions, Internal, PilotClient, RetryPolicy, RpcError, Unavailable

Outcome = Callable[[str], Any]


class _ScriptedRpc:
    """Stands in for ``RpcClient``: records every attempt, answers from ``behaviour``."""

    def __init__(self, behaviour: dict[str, Outcome], retry: RetryPolicy) -> None:
        self.behaviour = behaviour
        self.options = ClientOptions(retry=retry)
        self.attempts: list[tuple[str, str | None, int]] = []

    async def call(self, peer: str, port: int, method: str, request: Any = None, **kw: Any) -> Any:
        retry = kw["retry"]
        assert isinstance(retry, RetryPolicy)
        assert retry.max_attempts == 1, "each failover attempt must be a single RPC attempt"
        assert kw["idempotent"] is True
        self.attempts.append((peer, kw["idempotency_key"], port))
        return self.behaviour[peer](method)


class _ScriptedClient:
    def __init__(self, rpc: _ScriptedRpc) -> None:
        self._rpc = rpc

    async def rpc(self) -> _ScriptedRpc:
        return self._rpc


def _down(method: str) -> Any:
    raise Unavailable("connection lost")


def _up(method: str) -> Any:
    return {"ok": method}


def _backend(
    behaviour: dict[str, Outcome],
    peers: list[str],
    retry: RetryPolicy | None = None,
) -> tuple[RemoteBackend, _ScriptedRpc]:
    rpc = _ScriptedRpc(behaviour, RetryPolicy(max_attempts=3, initial_backoff=0.001))
    backend = RemoteBackend(
        cast(PilotClient, _ScriptedClient(rpc)),
        peer=peers,
        port=5000,
        options=SaverOptions(retry=retry),
    )
    return backend, rpc


async def test_a_failed_peer_hands_the_request_to_the_next_one_and_the_tier_sticks() -> None:
    backend, rpc = _backend({"a": _down, "b": _up}, ["a", "b"])
    reply = await backend.call("put", {}, idempotency_key="k1")
    assert reply == {"ok": _wire.handler_name("put")}
    assert [p for p, _, _ in rpc.attempts] == ["a", "b"]
    # The same idempotency key on both attempts: the store makes the repeat a no-op.
    assert {k for _, k, _ in rpc.attempts} == {"k1"}
    assert backend.current_peer == "b"
    rpc.attempts.clear()
    await backend.call("get_tuple", {}, idempotency_key="k2")
    assert [p for p, _, _ in rpc.attempts] == ["b"], "the last good peer is used first"


async def test_the_attempt_budget_is_the_policy_spread_over_peers() -> None:
    backend, rpc = _backend({"a": _down, "b": _down, "c": _down}, ["a", "b", "c"])
    with pytest.raises(StoreUnavailableError):
        await backend.call("put", {}, idempotency_key="k")
    # max_attempts=3 (the client's policy): three attempts in all, one per peer.
    assert [p for p, _, _ in rpc.attempts] == ["a", "b", "c"]


async def test_the_saver_policy_overrides_the_clients() -> None:
    backend, rpc = _backend(
        {"a": _down, "b": _down},
        ["a", "b"],
        retry=RetryPolicy(max_attempts=5, initial_backoff=0.001, jitter=0),
    )
    with pytest.raises(StoreUnavailableError):
        await backend.call("put", {})
    # Round and round, a backoff before each peer already tried by this request.
    assert [p for p, _, _ in rpc.attempts] == ["a", "b", "a", "b", "a"]


async def test_an_error_from_the_store_itself_is_not_failed_over() -> None:
    def broken(method: str) -> Any:
        raise Internal("handler failed")

    backend, rpc = _backend({"a": broken, "b": _up}, ["a", "b"])
    with pytest.raises(CheckpointStoreError) as caught:
        await backend.call("put", {})
    assert isinstance(caught.value.__cause__, RpcError)
    assert [p for p, _, _ in rpc.attempts] == ["a"]
    assert backend.current_peer == "a"


async def test_a_single_peer_keeps_the_clients_own_retries() -> None:
    calls: list[dict[str, Any]] = []

    class _Rpc:
        options = ClientOptions()

        async def call(
            self, peer: str, port: int, method: str, request: Any = None, **kw: Any
        ) -> Any:
            calls.append({"peer": peer, **kw})
            return None

    class _Client:
        async def rpc(self) -> _Rpc:
            return _Rpc()

    policy = RetryPolicy(max_attempts=7)
    backend = RemoteBackend(
        cast(PilotClient, _Client()), peer="only", port=5000, options=SaverOptions(retry=policy)
    )
    await backend.call("put", {})
    assert calls[0]["peer"] == "only"
    assert calls[0]["retry"] is policy


def test_the_saver_takes_a_list_of_peers_and_the_environment_a_comma_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saver = PilotCheckpointSaver(peer=["store-a", "store-b"])
    try:
        assert saver.peers == ("store-a", "store-b")
        assert saver.peer == "store-a"
    finally:
        saver.close()
    monkeypatch.setenv("PILOT_CHECKPOINT_PEER", "store-a, store-b")
    saver = PilotCheckpointSaver()
    try:
        assert saver.peers == ("store-a", "store-b")
    finally:
        saver.close()


@pytest.mark.parametrize("peer", [[], ["a", "a"], ["a", ""]])
def test_a_bad_peer_list_is_refused(peer: list[str]) -> None:
    with pytest.raises(CheckpointConfigError):
        PilotCheckpointSaver(peer=peer)
