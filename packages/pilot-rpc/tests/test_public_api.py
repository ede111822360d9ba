"""The public surface: ``__all__`` is honest and the error tree holds together."""

from __future__ import annotations

import inspect

import pilot_rpc
from pilot_rpc import errors


def test_all_names_exist_and_are_sorted() -> None:
    for name in pilot_rpc.__all__:
        assert hasattr(pilot_rpc, name), name
    assert sorted(pilot_rpc.__all__) == pilot_rpc.__all__


def test_every_public_object_is_in_all() -> None:
    public = {
        name
        for name, value in vars(pilot_rpc).items()
        if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
    }
    assert public <= set(pilot_rpc.__all__)


def test_errors_all_is_honest() -> None:
    for name in errors.__all__:
        assert hasattr(errors, name)
        assert getattr(pilot_rpc, name) is getattr(errors, name)


def test_one_subclass_per_status_code() -> None:
    for code in errors.StatusCode:
        if code is errors.StatusCode.OK:
            continue
        err = errors.RpcError.from_code(code, "m", {"k": 1})
        assert err.code is code
        assert type(err) is not errors.RpcError
        assert err.message == "m"
        assert err.details == {"k": 1}


def test_stdlib_bases() -> None:
    assert issubclass(errors.DeadlineExceeded, TimeoutError)
    assert issubclass(errors.Unavailable, ConnectionError)
    assert not errors.Unavailable("x").retry_safe


def test_unknown_code_maps_to_unknown() -> None:
    err = errors.RpcError.from_code(99, "odd")
    assert isinstance(err, errors.Unknown)
    assert err.details == {"code": 99}


def test_root_class_may_carry_any_code() -> None:
    err = errors.RpcError("x", code=errors.StatusCode.NOT_FOUND)
    assert err.code is errors.StatusCode.NOT_FOUND


def test_testing_all_is_honest() -> None:
    import pilot_rpc.testing as testing

    for name in testing.__all__:
        assert hasattr(testing, name), name
