"""The public surface: ``__all__`` is honest and the contract names exist."""

from __future__ import annotations

import importlib

import pilot_worker
import pytest

CONTRACT_NAMES = [
    "pilot_handler",
    "Context",
    "WorkerServer",
    "WorkerConfig",
    "HandlerSpec",
    "Plugin",
    "PluginOption",
    "PluginContext",
    "PayloadCodec",
]


def test_all_names_resolve_and_are_unique() -> None:
    assert len(set(pilot_worker.__all__)) == len(pilot_worker.__all__)
    for name in pilot_worker.__all__:
        assert hasattr(pilot_worker, name), name


def test_all_lists_every_public_attribute() -> None:
    public = {
        name
        for name, value in vars(pilot_worker).items()
        if not name.startswith("_")
        and name != "annotations"
        and not isinstance(value, type(pilot_worker))
    }
    assert public <= set(pilot_worker.__all__)


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_contract_names_exported(name: str) -> None:
    assert name in pilot_worker.__all__


@pytest.mark.parametrize(
    "module", ["pilot_worker.errors", "pilot_worker.cli", "pilot_worker.testing"]
)
def test_public_modules_all_honest(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"
