"""The public surface: ``__all__`` is honest, the error tree holds, the plugin is published."""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys

import pilot_checkpoint_sqlite
from pilot_checkpoint_sqlite import errors


def test_all_names_exist_and_every_public_name_is_listed() -> None:
    exported = set(pilot_checkpoint_sqlite.__all__)
    assert len(exported) == len(pilot_checkpoint_sqlite.__all__)
    for name in exported:
        assert hasattr(pilot_checkpoint_sqlite, name), name
    public = {
        name
        for name, value in vars(pilot_checkpoint_sqlite).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == exported


def test_a_process_that_only_runs_the_saver_loads_no_store_side_code() -> None:
    # SQLAlchemy and pilot-worker are for the store worker; a graph process with
    # the saver must not import them (start-up time, and objects its garbage
    # collector scans on every full collection).
    probe = (
        "import sys\n"
        "from pilot_checkpoint_sqlite import PilotCheckpointSaver, SaverOptions\n"
        "PilotCheckpointSaver(\n"
        "    peer='store', transport='tcp://127.0.0.1:0', options=SaverOptions()\n"
        ")\n"
        "print(sorted(m for m in ('sqlalchemy', 'pilot_worker') if m in sys.modules))\n"
        "from pilot_checkpoint_sqlite import CheckpointStore\n"
        "print(CheckpointStore.__module__, 'sqlalchemy' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    ).stdout.splitlines()
    assert out == ["[]", "pilot_checkpoint_sqlite._store True"]


def test_errors_module_lists_every_error_and_has_one_root() -> None:
    classes = {
        name: value
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, Exception)
    }
    assert set(errors.__all__) == set(classes)
    for name, cls in classes.items():
        assert issubclass(cls, errors.CheckpointError), name
        assert name in (errors.__doc__ or ""), f"{name} missing from the tree in the docstring"
    assert issubclass(errors.CheckpointUsageError, ValueError)
    assert issubclass(errors.StoreUnavailableError, ConnectionError)
    assert issubclass(errors.StoreTimeoutError, TimeoutError)
    assert issubclass(errors.CheckpointAccessDenied, PermissionError)


def test_the_worker_plugin_is_published_under_its_entry_point() -> None:
    from pilot_worker import Plugin

    (entry,) = importlib.metadata.entry_points(
        group="pilot_worker.plugins", name="checkpoint-sqlite"
    )
    plugin = entry.load()
    assert isinstance(plugin, Plugin)
    assert plugin.name == "checkpoint-sqlite"
    flags = {opt.flag: opt for opt in plugin.options}
    assert flags["--checkpoint-db"].env == "PILOT_CHECKPOINT_DB"
