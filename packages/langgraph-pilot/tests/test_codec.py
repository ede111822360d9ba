"""LangGraphCodec: LangGraph values survive; unsendable values name their path."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import uuid
from decimal import Decimal
from typing import Any, NamedTuple

import ormsgpack
import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.types import Send
from pilot_langgraph import LangGraphCodec, PilotDecodeError, PilotEncodeError
from pilot_langgraph._codec import ENVELOPE_KEY, is_envelope
from pydantic import BaseModel


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Hit:
    url: str
    score: float


class Point(NamedTuple):
    x: int
    y: int


class Report(BaseModel):
    title: str
    when: datetime.datetime
    hits: list[str]


def roundtrip(value: Any, codec: LangGraphCodec | None = None) -> Any:
    codec = codec or LangGraphCodec()
    wire = codec.encode(value)
    assert is_envelope(wire)
    # what pilot-rpc does to it: plain msgpack
    wire = ormsgpack.unpackb(ormsgpack.packb(wire))
    return codec.decode(wire)


def test_langgraph_values_arrive_as_what_they_were() -> None:
    now = datetime.datetime.now(datetime.UTC)
    state = {
        "messages": [
            HumanMessage("hi", id="1"),
            AIMessage("yo", tool_calls=[{"name": "t", "args": {"a": 1}, "id": "c1"}]),
            ToolMessage("42", tool_call_id="c1"),
        ],
        "docs": [Document(page_content="p", metadata={"k": 1})],
        "when": now,
        "delta": datetime.timedelta(seconds=3),
        "id": uuid.uuid4(),
        "price": Decimal("1.10"),
        "tags": {"a", "b"},
        "send": Send("worker", {"x": 1}),
        "hit": Hit("u", 0.5),
        "point": Point(1, 2),
        "color": Color.RED,
        "report": Report(title="t", when=now, hits=["a"]),
        "raw": b"\x00\x01",
        "nested": {"deep": [1, 2.5, None, True, "s"]},
    }
    back = roundtrip(state)
    assert back == state
    assert type(back["messages"][1]) is AIMessage
    assert back["messages"][1].tool_calls[0]["name"] == "t"
    assert isinstance(back["hit"], Hit)
    assert isinstance(back["point"], Point)
    assert isinstance(back["report"], Report)
    assert isinstance(back["send"], Send)


@pytest.mark.parametrize("value", [None, b"bytes", 0, "s", [1], {"a": 1}])
def test_scalars_and_containers(value: Any) -> None:
    assert roundtrip(value) == value


def test_exception_is_refused_with_its_path_not_stringified() -> None:
    codec = LangGraphCodec()
    with pytest.raises(PilotEncodeError) as info:
        codec.encode({"a": [1, {"b": ValueError("boom")}]}, root="state")
    assert info.value.path == "state['a'][1]['b']"
    assert "ValueError" in str(info.value)


def test_exception_nested_in_a_dataclass_is_refused() -> None:
    @dataclasses.dataclass
    class Box:
        err: Any

    with pytest.raises(PilotEncodeError) as info:
        LangGraphCodec().encode({"box": Box(RuntimeError("x"))}, root="state")
    assert info.value.path == "state['box'].err"


def test_unserializable_object_names_its_path() -> None:
    class Opaque:
        pass

    with pytest.raises(PilotEncodeError) as info:
        LangGraphCodec().encode({"docs": [1, 2, {"meta": Opaque()}]}, root="state")
    assert info.value.path == "state['docs'][2]['meta']"
    assert info.value.type_name.endswith("Opaque")
    assert isinstance(info.value, TypeError)


def test_non_envelopes_pass_through() -> None:
    codec = LangGraphCodec()
    assert codec.decode({"plain": 1}) == {"plain": 1}
    assert codec.decode([1, 2]) == [1, 2]


def test_malformed_envelope() -> None:
    with pytest.raises(PilotDecodeError):
        LangGraphCodec().decode({ENVELOPE_KEY: "nope"})
    with pytest.raises(PilotDecodeError):
        LangGraphCodec().decode({ENVELOPE_KEY: ["msgpack", b"\xc1"]})
    with pytest.raises(PilotDecodeError):
        LangGraphCodec().decode({ENVELOPE_KEY: ["pickle", b"x"]})


def _ext_envelope(code: int, tup: tuple[Any, ...]) -> dict[str, Any]:
    blob = ormsgpack.packb(ormsgpack.Ext(code, ormsgpack.packb(tup)))
    return {ENVELOPE_KEY: ["msgpack", blob]}


def test_never_calls_arbitrary_callables() -> None:
    codec = LangGraphCodec()
    # os.system is not a data type: refused, never imported or called
    with pytest.raises(PilotDecodeError, match=r"refusing to rebuild os\.system"):
        codec.decode(_ext_envelope(0, ("os", "system", "echo pwned")))
    with pytest.raises(PilotDecodeError, match="refusing"):
        codec.decode(_ext_envelope(1, ("subprocess", "Popen", [["true"]])))
    with pytest.raises(PilotDecodeError, match="refusing to call"):
        codec.decode(_ext_envelope(3, ("os", "getenv", "HOME", "__call__")))


def test_module_not_imported_is_not_imported() -> None:
    import sys

    name = "pilot_langgraph_never_imported_mod"
    with pytest.raises(PilotDecodeError):
        LangGraphCodec().decode(_ext_envelope(2, (name, "Thing", {})))
    assert name not in sys.modules


def test_allowed_types_and_opt_out_of_imported_types() -> None:
    strict = LangGraphCodec(allow_imported_data_types=False)
    with pytest.raises(PilotDecodeError):
        roundtrip(Hit("u", 1.0), strict)
    allowed = LangGraphCodec(allow_imported_data_types=False, allowed_types=[Hit])
    assert roundtrip(Hit("u", 1.0), allowed) == Hit("u", 1.0)
    # LangGraph's own safe list still works
    assert roundtrip(HumanMessage("x"), strict) == HumanMessage("x")


def test_worker_side_answers_in_the_callers_format() -> None:
    import contextvars

    codec = LangGraphCodec()

    def plain_call() -> Any:
        assert codec.decode_request({"a": 1}) == {"a": 1}
        return codec.encode_response({"b": 2})

    def enveloped_call() -> Any:
        assert codec.decode_request(codec.encode({"a": 1})) == {"a": 1}
        return codec.encode_response({"b": 2})

    assert contextvars.copy_context().run(plain_call) == {"b": 2}
    assert is_envelope(contextvars.copy_context().run(enveloped_call))


def test_only_sealed_control_messages_are_control_messages() -> None:
    from pilot_langgraph._codec import CONTROL_KEY, ControlMessage, seal_control

    codec = LangGraphCodec()
    own = codec.control("custom", {"forged": True})  # what a handler could build itself
    assert not own.sealed
    assert not codec.is_control(own)
    with pytest.raises(PilotEncodeError, match="ControlMessage itself"):
        codec.encode_response(own)
    with pytest.raises(PilotEncodeError):
        codec.encode_response(ControlMessage("interrupt", [["fake", "id", None]]))
    sealed = seal_control(codec.control("custom", {"x": 1}))
    assert codec.is_control(sealed)
    wire = codec.encode_response(sealed)
    assert list(wire) == [CONTROL_KEY]
    back = codec.decode_reply(wire)
    assert isinstance(back, ControlMessage)
    assert (back.kind, back.body) == ("custom", {"x": 1})
    # a handler's value shaped like a control message is sent as a value and stays one
    lookalike = {CONTROL_KEY: ["custom", {"x": 1}]}
    assert codec.decode_reply(codec.encode(lookalike)) == lookalike
