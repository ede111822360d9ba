"""``__all__`` is honest: everything listed exists, everything public is listed."""

from __future__ import annotations

import importlib
import inspect
import types

import pilot_transport.errors
import pytest

MODULES = [
    "pilot_transport",
    "pilot_transport.carriers",
    "pilot_transport.config",
    "pilot_transport.daemon",
    "pilot_transport.errors",
    "pilot_transport.testing",
]


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
        and getattr(value, "__module__", name).startswith("pilot_transport")
    }
    assert public <= exported, f"public but not in {name}.__all__: {sorted(public - exported)}"


def test_every_error_derives_from_the_root_and_is_in_the_docstring_tree() -> None:
    tree = pilot_transport.errors.__doc__ or ""
    for attribute in pilot_transport.errors.__all__:
        error = getattr(pilot_transport.errors, attribute)
        assert inspect.isclass(error)
        assert issubclass(error, pilot_transport.errors.TransportError)
        assert attribute in tree, f"{attribute} is missing from the errors docstring tree"


def test_public_classes_are_documented() -> None:
    import pilot_transport

    for attribute in pilot_transport.__all__:
        value = getattr(pilot_transport, attribute)
        assert inspect.getdoc(value), f"{attribute} has no docstring"
