"""``__all__`` is honest for the node's modules; every error derives from the root."""

from __future__ import annotations

import importlib
import inspect
import types

import pilot_node.errors
import pytest

MODULES = ["pilot_node", "pilot_node.errors"]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_honest(name: str) -> None:
    module = importlib.import_module(name)
    exported = set(module.__all__)
    assert len(exported) == len(module.__all__), "duplicates in __all__"
    for attribute in exported:
        assert hasattr(module, attribute), f"{name}.__all__ lists missing {attribute!r}"
    public = {
        attribute
        for attribute, value in vars(module).items()
        if not attribute.startswith("_")
        and not isinstance(value, types.ModuleType)
        and attribute not in {"annotations"}
        and getattr(value, "__module__", name).startswith("pilot_node")
    }
    assert public <= exported, f"public but not in {name}.__all__: {sorted(public - exported)}"


def test_every_error_derives_from_the_root() -> None:
    for name in pilot_node.errors.__all__:
        value = getattr(pilot_node.errors, name)
        assert inspect.isclass(value)
        assert issubclass(value, pilot_node.errors.PilotNodeError)


def test_public_errors_are_reexported_from_the_package() -> None:
    import pilot_node

    for name in pilot_node.errors.__all__:
        assert getattr(pilot_node, name) is getattr(pilot_node.errors, name)
