"""The saver: sync use without a loop, threads, retries, timeouts, allowlist, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from pilot_checkpoint_sqlite import (
    CheckpointService,
    CheckpointStore,
    LocalStoreBackend,
    PilotCheckpointSaver,
    SaverOptions,
)
from pilot_checkpoint_sqlite.errors import (
    CheckpointConfigError,
    CheckpointStoreError,
    CheckpointUsageError,
    StoreClosedError,
    StoreTimeoutError,
    StoreUnavailableError,
)

WAIT = 30.0


def _config(thread_id: str, checkpoint_id: str | None = None) -> RunnableConfig:
    configurable: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": ""}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


def _checkpoint(values: dict[str, Any]) -> Checkpoint:
    cp = empty_checkpoint()
    cp["channel_values"] = dict(values)
    cp["channel_versions"] = {k: 1 for k in values}
    return cp


@pytest.fixture
def sync_store(tmp_path: Path) -> Iterator[CheckpointStore]:
    store = CheckpointStore.open(f"sqlite:///{tmp_path / 'sync.db'}")
    try:
        yield store
    finally:
        store.close()


def test_sync_methods_work_from_plain_sync_code(sync_store: CheckpointStore) -> None:
    saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(sync_store)))
    with saver:
        thread = str(uuid.uuid4())
        first = saver.put(
            _config(thread), _checkpoint({"a": 1}), {"source": "input", "step": -1}, {"a": 1}
        )
        saver.put_writes(first, [("a", 2)], "task")
        second = saver.put(first, _checkpoint({"a": 2}), {"source": "loop", "step": 0}, {"a": 2})
        tup = saver.get_tuple(_config(thread))
        assert tup is not None
        assert tup.config == second
        assert tup.parent_config == first
        assert saver.get(first) is not None
        assert [t.config for t in saver.list(_config(thread))] == [second, first]
        assert [t.config for t in saver.list(None, limit=1)] == [second]
        older = saver.get_tuple(first)
        assert older is not None
        assert older.pending_writes == [("task", "a", 2)]
        saver.copy_thread(thread, thread + "-copy")
        assert len(list(saver.list(_config(thread + "-copy")))) == 2
        saver.prune([thread], strategy="keep_latest")
        assert [t.config for t in saver.list(_config(thread))] == [second]
        saver.delete_for_runs([])
        saver.delete_thread(thread)
        assert saver.get_tuple(_config(thread)) is None
        assert saver.get_delta_channel_history(config=second, channels=[]) == {}


def test_sync_methods_work_from_many_threads_at_once(sync_store: CheckpointStore) -> None:
    saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(sync_store)))

    def _work(i: int) -> int:
        config = saver.put(
            _config(f"t{i}"), _checkpoint({"i": i}), {"source": "loop", "step": 0}, {"i": 1}
        )
        saver.put_writes(config, [("i", i)], f"task{i}")
        tup = saver.get_tuple(config)
        assert tup is not None
        return tup.checkpoint["channel_values"]["i"]

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            assert sorted(pool.map(_work, range(40))) == list(range(40))
    finally:
        saver.close()


async def test_sync_methods_work_while_an_event_loop_runs_in_this_thread(
    sync_store: CheckpointStore,
) -> None:
    saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(sync_store)))
    try:
        config = saver.put(_config("t"), _checkpoint({"x": 1}), {}, {"x": 1})
        tup = await saver.aget_tuple(config)
        assert tup is not None
        assert tup.checkpoint["channel_values"] == {"x": 1}
    finally:
        await saver.aclose()


def test_async_methods_work_from_successive_event_loops(sync_store: CheckpointStore) -> None:
    saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(sync_store)))
    try:
        config = asyncio.run(saver.aput(_config("t"), _checkpoint({"x": 1}), {}, {"x": 1}))
        tup = asyncio.run(saver.aget_tuple(config))
        assert tup is not None
        assert tup.checkpoint["channel_values"] == {"x": 1}
    finally:
        saver.close()


class _Flaky:
    """Fails ``failures`` times with ``error`` before delegating; records idempotency keys."""

    def __init__(self, inner: LocalStoreBackend, failures: int, error: Exception) -> None:
        self.inner = inner
        self.failures = failures
        self.error = error
        self.keys: list[str | None] = []

    async def call(
        self, method: str, payload: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Any:
        self.keys.append(idempotency_key)
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        return await self.inner.call(method, payload, idempotency_key=idempotency_key)

    async def aclose(self) -> None:
        return None


def test_the_saver_does_not_retry_on_its_own(sync_store: CheckpointStore) -> None:
    # Retries happen once, in the RPC client's policy (remote savers); a backend's
    # failure reaches the caller after exactly one attempt.
    flaky = _Flaky(
        LocalStoreBackend(CheckpointService(sync_store)), 1, StoreUnavailableError("down")
    )
    with PilotCheckpointSaver(backend=flaky) as saver:
        with pytest.raises(StoreUnavailableError):
            saver.get_tuple(_config("t"))
        assert len(flaky.keys) == 1
        assert saver.get_tuple(_config("t")) is None


def test_non_transient_failures_are_not_retried(sync_store: CheckpointStore) -> None:
    flaky = _Flaky(
        LocalStoreBackend(CheckpointService(sync_store)), 1, CheckpointStoreError("broken")
    )
    with PilotCheckpointSaver(backend=flaky) as saver:
        with pytest.raises(CheckpointStoreError, match="broken"):
            saver.get_tuple(_config("t"))
        assert len(flaky.keys) == 1


class _Hanging:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    async def call(
        self, method: str, payload: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Any:
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()

    async def aclose(self) -> None:
        return None


def test_a_store_that_never_answers_times_out(sync_store: CheckpointStore) -> None:
    hanging = _Hanging()
    options = SaverOptions(timeout=0.05)
    with PilotCheckpointSaver(backend=hanging, options=options) as saver:
        with pytest.raises(StoreTimeoutError):
            saver.get_tuple(_config("t"))
        assert hanging.cancelled.wait(WAIT)


async def test_cancelling_an_async_call_cancels_the_request() -> None:
    hanging = _Hanging()
    saver = PilotCheckpointSaver(backend=hanging)
    try:
        task = asyncio.create_task(saver.aget_tuple(_config("t")))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(hanging.cancelled.wait, WAIT)
    finally:
        await saver.aclose()


@dataclasses.dataclass
class Thing:
    x: int


def test_the_serializer_allowlist_is_respected_and_with_allowlist_works(
    sync_store: CheckpointStore,
) -> None:
    strict = JsonPlusSerializer(allowed_msgpack_modules=None)
    saver = PilotCheckpointSaver(
        backend=LocalStoreBackend(CheckpointService(sync_store)), serde=strict
    )
    with saver:
        config = saver.put(_config("t"), _checkpoint({"thing": Thing(1)}), {}, {"thing": 1})
        blocked = saver.get_tuple(config)
        assert blocked is not None
        assert blocked.checkpoint["channel_values"]["thing"] == {"x": 1}
        clone = saver.with_allowlist([(Thing.__module__, "Thing")])
        assert isinstance(clone, PilotCheckpointSaver)
        assert clone is not saver
        allowed = clone.get_tuple(config)
        assert allowed is not None
        assert allowed.checkpoint["channel_values"]["thing"] == Thing(1)
        # The original keeps its own allowlist.
        again = saver.get_tuple(config)
        assert again is not None
        assert again.checkpoint["channel_values"]["thing"] == {"x": 1}


def test_next_versions_increase(sync_store: CheckpointStore) -> None:
    with PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(sync_store))) as saver:
        version: str | None = None
        seen: list[str] = []
        for _ in range(20):
            version = saver.get_next_version(version, None)
            seen.append(version)
        assert seen == sorted(seen)
        assert seen[0].startswith("0" * 31 + "1.")
        assert saver.get_next_version(7, None).startswith("0" * 31 + "8.")  # pyright: ignore[reportArgumentType]


def test_usage_errors(sync_store: CheckpointStore) -> None:
    with PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(sync_store))) as saver:
        with pytest.raises(CheckpointUsageError, match="thread_id"):
            saver.get_tuple({"configurable": {}})
        with pytest.raises(CheckpointUsageError):
            saver.get_tuple({})  # pyright: ignore[reportArgumentType]
        with pytest.raises(CheckpointUsageError, match="checkpoint_id"):
            saver.put_writes(_config("t"), [("a", 1)], "task")
        with pytest.raises(CheckpointUsageError, match="strategy"):
            saver.prune(["t"], strategy="all")


def test_construction_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PILOT_CHECKPOINT_PEER", raising=False)
    with pytest.raises(CheckpointConfigError, match="peer"):
        PilotCheckpointSaver()
    with pytest.raises(CheckpointConfigError, match="port"):
        PilotCheckpointSaver(peer="store", port=70000)
    monkeypatch.setenv("PILOT_CHECKPOINT_PORT", "abc")
    with pytest.raises(CheckpointConfigError):
        PilotCheckpointSaver(peer="store")
    monkeypatch.setenv("PILOT_CHECKPOINT_PORT", "7001")
    monkeypatch.setenv("PILOT_CHECKPOINT_PEER", "state-worker")
    saver = PilotCheckpointSaver()
    assert (saver.peer, saver.port) == ("state-worker", 7001)
    saver.close()
    with pytest.raises(CheckpointConfigError):
        SaverOptions(timeout=0)
    with pytest.raises(CheckpointConfigError):
        SaverOptions(retry=3)  # pyright: ignore[reportArgumentType]


def test_a_named_identity_that_does_not_exist_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("PILOT_IDENTITY", str(tmp_path / "me.kye"))
    monkeypatch.delenv("PILOT_TRUST", raising=False)
    with (
        PilotCheckpointSaver(peer="state-worker", identity=tmp_path / "me.kye") as saver,
        pytest.raises(CheckpointConfigError, match=r"me\.kye"),
    ):
        saver.get_tuple(_config("t"))
    assert not (tmp_path / "me.kye").exists()


def test_a_saver_with_no_trust_file_says_the_file_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path))
    for name in ("PILOT_IDENTITY", "PILOT_TRUST", "PILOT_TRANSPORT", "PILOT_TRANSPORT_URL"):
        monkeypatch.delenv(name, raising=False)
    with (
        PilotCheckpointSaver(peer="state-worker", identity=None, trust=None) as saver,
        pytest.raises(CheckpointConfigError, match="does not exist"),
    ):
        saver.get_tuple(_config("t"))


def test_close_is_idempotent_and_final(sync_store: CheckpointStore) -> None:
    saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(sync_store)))
    saver.put(_config("t"), _checkpoint({}), {}, {})
    saver.close()
    saver.close()
    with pytest.raises(StoreClosedError):
        saver.get_tuple(_config("t"))


@pytest.mark.parametrize("peers", [["store"], ["store", "standby"]], ids=["one-peer", "tier"])
async def test_a_remote_store_that_never_answers_times_out(
    tmp_path: Path, peers: list[str]
) -> None:
    # The remote saver sets no timer of its own: the RPC deadline alone must end
    # the request with StoreTimeoutError, on one peer and over a tier.
    from pilot_checkpoint_sqlite import _wire
    from pilot_transport import open_transport
    from pilot_transport.testing import create_test_peers
    from pilot_worker import HandlerSpec, WorkerConfig, WorkerServer

    made = create_test_peers(tmp_path, ["graph", *peers])
    hub = f"memory://saver-timeout-{uuid.uuid4().hex}"
    entered: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        for name in peers:
            transport = await stack.enter_async_context(
                open_transport(hub, identity=made[name].identity, trust=made[name].trust)
            )
            worker = WorkerServer(transport, WorkerConfig(port=5000))

            async def hang(request: Any, ctx: Any, name: str = name) -> Any:
                entered.append(name)
                await asyncio.Event().wait()

            worker.register(
                HandlerSpec(name=_wire.handler_name(_wire.GET_TUPLE), fn=hang, timeout_secs=None)
            )
            await worker.start()
            stack.push_async_callback(worker.aclose)
        client = await stack.enter_async_context(
            open_transport(hub, identity=made["graph"].identity, trust=made["graph"].trust)
        )
        saver = PilotCheckpointSaver(
            peer=peers if len(peers) > 1 else peers[0],
            port=5000,
            transport=client,
            options=SaverOptions(timeout=0.5),
        )
        stack.push_async_callback(saver.aclose)
        async with asyncio.timeout(WAIT):  # a failure bound only
            with pytest.raises(StoreTimeoutError):
                await saver.aget_tuple(_config("t"))
        assert entered
        assert set(entered) <= set(peers)
