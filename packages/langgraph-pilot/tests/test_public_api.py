"""The public surface: ``__all__`` lists exactly the public names, and they import."""

from __future__ import annotations

import importlib

import pilot_langgraph
from pilot_langgraph import errors


def test_all_is_sorted_unique_and_resolvable() -> None:
    names = pilot_langgraph.__all__
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(pilot_langgraph, name) is not None, name


def test_every_public_module_attribute_is_in_all() -> None:
    public = {
        n
        for n, v in vars(pilot_langgraph).items()
        if not n.startswith("_") and not isinstance(v, type(importlib))
    }
    public -= {"annotations", "TYPE_CHECKING", "Any"}
    assert public <= set(pilot_langgraph.__all__), public - set(pilot_langgraph.__all__)


def test_errors_all_is_honest() -> None:
    declared = set(errors.__all__)
    classes = {
        n
        for n, v in vars(errors).items()
        if isinstance(v, type) and issubclass(v, Exception) and not n.startswith("_")
    }
    assert declared == classes


def test_one_error_root() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.PilotLangGraphError)


def test_reexports_are_the_lower_layers_objects() -> None:
    import pilot_worker

    assert pilot_langgraph.pilot_handler is pilot_worker.pilot_handler


def test_testing_module_all_is_honest() -> None:
    from pilot_langgraph import testing

    assert set(testing.__all__) == {"LocalCluster", "WorkerProcess"}
    for name in testing.__all__:
        assert getattr(testing, name) is not None


def test_lazy_names_cover_all_but_the_errors() -> None:
    lazy = set(pilot_langgraph._LAZY)
    eager = {n for n in pilot_langgraph.__all__ if n.startswith("Pilot") and n.endswith("Error")}
    assert lazy | eager == set(pilot_langgraph.__all__)
    assert "PilotRemoteRunnable" in dir(pilot_langgraph)
