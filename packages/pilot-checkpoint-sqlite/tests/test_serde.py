"""Checkpoint reads never import or call what stored data names (allowlist decoding)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import ormsgpack
import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from pilot_checkpoint_sqlite import (
    AllowlistSerializer,
    CheckpointService,
    CheckpointStore,
    LocalStoreBackend,
    PilotCheckpointSaver,
)
from pilot_checkpoint_sqlite.errors import CheckpointConfigError, CheckpointTypeRefusedError
from pilot_checkpoint_sqlite.testing import local_saver
from pydantic import BaseModel

# LangGraph's msgpack extension codes (langgraph.checkpoint.serde.jsonplus).
EXT_CONSTRUCTOR_SINGLE_ARG = 0
EXT_CONSTRUCTOR_POS_ARGS = 1
EXT_METHOD_SINGLE_ARG = 3
EXT_PYDANTIC_V2 = 5


def _ext(code: int, *fields: Any) -> ormsgpack.Ext:
    return ormsgpack.Ext(code, ormsgpack.packb(fields))


def _config(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


def _checkpoint(values: dict[str, Any]) -> Checkpoint:
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = values
    checkpoint["channel_versions"] = dict.fromkeys(values, "1")
    return checkpoint


class Color(enum.Enum):
    RED = "red"


class Address(BaseModel):
    city: str


@dataclasses.dataclass
class Visit:
    at: str


class Person(BaseModel):
    name: str
    address: Address
    visits: list[Visit]
    favourite: Annotated[Color | None, "doc"] = None


class Unregistered(BaseModel):
    x: int


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LocalStoreBackend]:
    store = CheckpointStore.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        yield LocalStoreBackend(CheckpointService(store))
    finally:
        store.close()


def _tamper(db: Path, channel: str, data: bytes, kind: str = "msgpack") -> None:
    """Replace a channel blob straight in the store's SQLite file, as an attacker would."""
    with sqlite3.connect(db) as conn:
        changed = conn.execute(
            "UPDATE pilot_checkpoint_blobs SET type = ?, blob = ? WHERE channel = ?",
            (kind, data, channel),
        ).rowcount
    assert changed == 1


ATTACKS = {
    "os.system": (
        lambda marker: ormsgpack.packb(
            _ext(EXT_CONSTRUCTOR_SINGLE_ARG, "os", "system", f"touch {marker}")
        ),
        "os.system",
    ),
    "os.mkdir": (
        lambda marker: ormsgpack.packb(_ext(EXT_CONSTRUCTOR_SINGLE_ARG, "os", "mkdir", marker)),
        "os.mkdir",
    ),
    "positional": (
        lambda marker: ormsgpack.packb(
            {"nested": [_ext(EXT_CONSTRUCTOR_POS_ARGS, "os", "makedirs", [marker])]}
        ),
        "os.makedirs",
    ),
    "method": (
        lambda marker: ormsgpack.packb(
            _ext(EXT_METHOD_SINGLE_ARG, "os", "mkdir", marker, "__call__")
        ),
        "os.mkdir.__call__",
    ),
    "pydantic": (
        lambda marker: ormsgpack.packb(
            _ext(EXT_PYDANTIC_V2, "subprocess", "Popen", {"args": ["mkdir", marker]}, None)
        ),
        "subprocess.Popen",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_tampered_checkpoint_runs_nothing_and_names_the_refused_type(
    tmp_path: Path, attack: str
) -> None:
    db = tmp_path / "store.db"
    marker = str(tmp_path / "pwned")
    build, refused_name = ATTACKS[attack]
    with local_saver(f"sqlite:///{db}") as saver:
        config = saver.put(_config("t"), _checkpoint({"messages": "hello"}), {}, {"messages": "1"})
        _tamper(db, "messages", build(marker))
        with pytest.raises(CheckpointTypeRefusedError) as caught:
            saver.get_tuple(config)
        assert refused_name in caught.value.refused
        assert refused_name in str(caught.value)
        assert "allowed_types=" in str(caught.value)
        with pytest.raises(CheckpointTypeRefusedError):
            list(saver.list(_config("t")))
    assert not Path(marker).exists()


def test_the_same_payload_does_run_under_langgraphs_permissive_default(
    tmp_path: Path, backend: LocalStoreBackend
) -> None:
    # Proves the payloads above are live: LangGraph's default serializer
    # (allowed_msgpack_modules=True) imports and calls what the data names.
    marker = tmp_path / "pwned"
    strict = PilotCheckpointSaver(backend=backend)
    config = strict.put(_config("t"), _checkpoint({"messages": "hello"}), {}, {"messages": "1"})
    _tamper(tmp_path / "store.db", "messages", ATTACKS["os.mkdir"][0](str(marker)))
    with pytest.raises(CheckpointTypeRefusedError):
        strict.get_tuple(config)
    assert not marker.exists()
    permissive = PilotCheckpointSaver(
        backend=backend, serde=JsonPlusSerializer(allowed_msgpack_modules=True)
    )
    permissive.get_tuple(config)
    assert marker.is_dir()


def test_pickle_blobs_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    with local_saver(f"sqlite:///{db}") as saver:
        config = saver.put(_config("t"), _checkpoint({"messages": "hello"}), {}, {"messages": "1"})
        _tamper(db, "messages", b"\x80\x04K\x01.", kind="pickle")
        with pytest.raises(CheckpointTypeRefusedError, match="pickle") as caught:
            saver.get_tuple(config)
    assert caught.value.refused == ("pickle",)


def test_tampered_pending_writes_and_metadata_are_refused_too(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    marker = tmp_path / "pwned"
    evil = ATTACKS["os.mkdir"][0](str(marker))
    with local_saver(f"sqlite:///{db}") as saver:
        config = saver.put(_config("t"), _checkpoint({}), {}, {})
        saver.put_writes(config, [("messages", "hi")], "task-1")
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE pilot_checkpoint_writes SET value = ?", (evil,))
        with pytest.raises(CheckpointTypeRefusedError):
            saver.get_tuple(config)
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM pilot_checkpoint_writes")
            conn.execute("UPDATE pilot_checkpoints SET metadata_blob = ?", (evil,))
        with pytest.raises(CheckpointTypeRefusedError):
            saver.get_tuple(config)
    assert not marker.exists()


def test_langchain_and_standard_types_round_trip_by_default(tmp_path: Path) -> None:
    values: dict[str, Any] = {
        "messages": [
            HumanMessage(content="hi", id="1"),
            AIMessage(content="hello", id="2", tool_calls=[]),
            ToolMessage(content="42", tool_call_id="c1", id="3"),
        ],
        "doc": Document(page_content="text", metadata={"k": 1}),
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "id": uuid.UUID(int=7),
        "tags": {"a", "b"},
    }
    with local_saver(f"sqlite:///{tmp_path / 'store.db'}") as saver:
        config = saver.put(
            _config("t"), _checkpoint(values), {"source": "input"}, dict.fromkeys(values, "1")
        )
        got = saver.get_tuple(config)
    assert got is not None
    assert got.checkpoint["channel_values"] == values
    assert isinstance(got.checkpoint["channel_values"]["messages"][1], AIMessage)


def test_registered_state_types_round_trip_with_everything_they_reach(
    backend: LocalStoreBackend,
) -> None:
    person = Person(
        name="ada", address=Address(city="London"), visits=[Visit(at="x")], favourite=Color.RED
    )
    saver = PilotCheckpointSaver(backend=backend)
    config = saver.put(_config("t"), _checkpoint({"person": person}), {}, {"person": "1"})
    with pytest.raises(CheckpointTypeRefusedError, match=r"Person"):
        saver.get_tuple(config)
    registered = PilotCheckpointSaver(backend=backend, allowed_types=[Person])
    got = registered.get_tuple(config)
    assert got is not None
    assert got.checkpoint["channel_values"]["person"] == person
    by_name = PilotCheckpointSaver(
        backend=backend, allowed_types=[(Unregistered.__module__, "Unregistered")]
    )
    config2 = saver.put(_config("u"), _checkpoint({"u": Unregistered(x=1)}), {}, {"u": "1"})
    got2 = by_name.get_tuple(config2)
    assert got2 is not None
    assert got2.checkpoint["channel_values"]["u"] == Unregistered(x=1)


def test_with_allowlist_keeps_refusing_loudly(tmp_path: Path) -> None:
    with local_saver(f"sqlite:///{tmp_path / 'store.db'}") as saver:
        config = saver.put(_config("t"), _checkpoint({"v": Visit(at="y")}), {}, {"v": "1"})
        clone = saver.with_allowlist([(Visit.__module__, "Visit")])
        assert isinstance(clone.serde, AllowlistSerializer)
        got = clone.get_tuple(config)
        assert got is not None
        assert got.checkpoint["channel_values"]["v"] == Visit(at="y")
        config2 = saver.put(_config("u"), _checkpoint({"c": Color.RED}), {}, {"c": "1"})
        with pytest.raises(CheckpointTypeRefusedError, match="Color"):
            clone.get_tuple(config2)


def test_allowed_types_with_a_custom_serializer(backend: LocalStoreBackend) -> None:
    saver = PilotCheckpointSaver(backend=backend)
    custom = PilotCheckpointSaver(
        backend=backend,
        serde=JsonPlusSerializer(allowed_msgpack_modules=None),
        allowed_types=[Visit],
    )
    config = saver.put(_config("t"), _checkpoint({"v": Visit(at="y")}), {}, {"v": "1"})
    got = custom.get_tuple(config)
    assert got is not None
    assert got.checkpoint["channel_values"]["v"] == Visit(at="y")

    class Plain:
        def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
            return ("bytes", b"")

        def loads_typed(self, data: tuple[str, bytes]) -> Any:
            return None

    with pytest.raises(CheckpointConfigError, match="allowed_types"):
        PilotCheckpointSaver(backend=backend, serde=Plain(), allowed_types=[Visit])
    with pytest.raises(CheckpointConfigError, match="allowed_types"):
        PilotCheckpointSaver(backend=backend, allowed_types=["os.system"])  # pyright: ignore[reportArgumentType]


def test_a_registered_type_registers_what_its_annotations_reach() -> None:
    from pilot_checkpoint_sqlite._serde import expand_allowed_types

    mod = __name__
    assert expand_allowed_types([Person]) >= {
        (mod, "Person"),
        (mod, "Address"),
        (mod, "Visit"),
        (mod, "Color"),
    }
    assert (mod, "Unregistered") not in expand_allowed_types([Person])
    assert expand_allowed_types([("a.b", "C")]) == {("a.b", "C")}
