from __future__ import annotations

import importlib
import types

import pilot_channels
from pilot_channels import errors


def test_all_is_honest() -> None:
    names = set(pilot_channels.__all__)
    assert len(names) == len(pilot_channels.__all__)
    for name in names:
        assert hasattr(pilot_channels, name), name
    public = {
        n
        for n, v in vars(pilot_channels).items()
        if not n.startswith("_") and n != "annotations" and not isinstance(v, types.ModuleType)
    }
    assert public - names == set()


def test_error_tree_has_one_root() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.ChannelError)
    assert issubclass(errors.ChannelTimeoutError, TimeoutError)
    assert issubclass(errors.ChannelNetworkError, ConnectionError)
    assert issubclass(errors.ChannelPermissionError, PermissionError)


def test_plugin_entry_point_object() -> None:
    module = importlib.import_module("pilot_channels._plugin")
    plugin = module.plugin
    assert plugin.name == "channels"
    assert {o.flag for o in plugin.options} >= {"--channels-db", "--channels-config"}
