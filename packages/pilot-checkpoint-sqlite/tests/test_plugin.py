"""The worker plugin: handlers registered on a worker, scoping by caller, error mapping."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pilot_checkpoint_sqlite import _wire
from pilot_checkpoint_sqlite._plugin import error_to_rpc, plugin, store_options_from
from pilot_checkpoint_sqlite._remote import error_from_rpc
from pilot_checkpoint_sqlite.errors import (
    CheckpointAccessDenied,
    CheckpointConfigError,
    CheckpointError,
    CheckpointProtocolError,
    CheckpointStoreError,
    CheckpointUsageError,
    StoreClosedError,
    StoreOverloadedError,
    StoreSchemaError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from pilot_rpc import RpcError
from pilot_worker import PluginContext, WorkerServer


@pytest.mark.parametrize(
    "error",
    [
        CheckpointUsageError("bad"),
        CheckpointConfigError("bad config"),
        CheckpointProtocolError("malformed"),
        CheckpointAccessDenied("no"),
        StoreUnavailableError("down"),
        StoreTimeoutError("slow"),
        StoreOverloadedError("full"),
        StoreSchemaError("newer"),
        StoreClosedError("closed"),
        CheckpointStoreError("broken"),
    ],
)
def test_store_errors_survive_the_trip_through_rpc_status(error: CheckpointError) -> None:
    status = error_to_rpc(error)
    assert isinstance(status, RpcError)
    back = error_from_rpc(status, "put")
    assert type(back) is type(error)
    assert str(error) in str(back)


def test_plugin_options_parse_into_store_options() -> None:
    url, options = store_options_from(
        {
            "checkpoint_db": "sqlite:///x.db",
            "checkpoint_shared": "true",
            "checkpoint_max_age": "3600",
            "checkpoint_max_per_thread": "10",
            "checkpoint_retention_interval": "60",
            "checkpoint_sqlite_sync": "normal",
        }
    )
    assert url == "sqlite:///x.db"
    assert options.shared
    assert options.sqlite_synchronous == "NORMAL"
    assert options.retention.max_age_secs == 3600
    assert options.retention.max_checkpoints_per_thread == 10
    assert options.retention.interval_secs == 60
    default_url, defaults = store_options_from({})
    assert default_url.startswith("sqlite:///")
    assert not defaults.shared
    assert not defaults.retention.enabled
    with pytest.raises(CheckpointConfigError):
        store_options_from({"checkpoint_shared": "maybe"})
    with pytest.raises(CheckpointConfigError):
        store_options_from({"checkpoint_max_age": "soon"})


async def test_setup_registers_scoped_handlers_and_closes_the_store(tmp_path: Path) -> None:
    shutdown: list[Any] = []

    class _Worker(WorkerServer):
        def on_shutdown(self, fn: Any) -> None:
            shutdown.append(fn)

    worker = _Worker()
    ctx = PluginContext(
        worker=worker, options={"checkpoint_db": f"sqlite:///{tmp_path / 'plugin.db'}"}
    )
    await plugin.setup(ctx)  # pyright: ignore[reportGeneralTypeIssues]
    names = {f"checkpoint.{m}" for m in _wire.METHODS}
    assert names <= set(worker.handlers)

    def call(method: str, payload: Any, caller: str) -> Any:
        spec = worker.handlers[_wire.handler_name(method)]
        return spec.fn(payload, SimpleNamespace(caller_node_id=caller))

    thread = str(uuid.uuid4())
    put = {
        "thread_id": thread,
        "checkpoint_ns": "",
        "checkpoint_id": "1",
        "parent_checkpoint_id": None,
        "run_id": None,
        "checkpoint": ["msgpack", b"\x80"],
        "metadata": ["msgpack", b"\x80"],
        "metadata_json": "{}",
        "channel_versions": {},
        "blobs": [],
    }
    assert await call("put", put, "alice") is None
    get = {"thread_id": thread, "checkpoint_ns": "", "checkpoint_id": None}
    row = await call("get_tuple", get, "alice")
    assert row["checkpoint"] == ["msgpack", b"\x80"]
    assert await call("get_tuple", get, "bob") is None
    with pytest.raises(RpcError) as info:
        await call("get_tuple", {"thread_id": 3}, "alice")
    assert info.value.info.domain == "pilot-checkpoint-sqlite"
    assert info.value.info.reason == "CHECKPOINT_PROTOCOL_ERROR"
    assert info.value.info.metadata == {"error": "CheckpointProtocolError"}
    (close,) = shutdown
    await close()


def test_errors_travel_as_error_info_and_are_read_back_exactly() -> None:
    from pilot_checkpoint_sqlite import errors
    from pilot_checkpoint_sqlite._plugin import error_to_rpc
    from pilot_checkpoint_sqlite._remote import error_from_rpc
    from pilot_rpc import ResourceExhausted

    for cls in (errors.StoreOverloadedError, errors.StoreSchemaError, errors.CheckpointUsageError):
        sent = error_to_rpc(cls("boom"))
        assert sent.details == {}
        assert sent.info.metadata == {"error": cls.__name__}
        assert type(error_from_rpc(sent, "put")) is cls
    # A 0.1 store named the class in details["kind"]: still understood.
    old = ResourceExhausted("busy", details={"kind": "StoreOverloadedError"})
    assert type(error_from_rpc(old, "put")) is errors.StoreOverloadedError
