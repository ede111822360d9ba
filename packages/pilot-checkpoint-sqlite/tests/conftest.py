"""Fixtures: every store test runs on SQLite and, when a server is given, on PostgreSQL.

``PILOT_TEST_POSTGRES_URL`` (exported by ``scripts/_postgres.sh`` in CI) adds a
``postgres`` parameter, marked ``postgres``; each such test gets its own
PostgreSQL schema, dropped afterwards.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pilot_checkpoint_sqlite import (
    CheckpointService,
    CheckpointStore,
    LocalStoreBackend,
    PilotCheckpointSaver,
    StoreOptions,
    open_store,
)
from pilot_checkpoint_sqlite.testing import scratch_postgres_schema

POSTGRES_ENV = "PILOT_TEST_POSTGRES_URL"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_kind" in metafunc.fixturenames:
        params = [pytest.param("sqlite", id="sqlite")]
        if os.environ.get(POSTGRES_ENV):
            params.append(pytest.param("postgres", id="postgres", marks=pytest.mark.postgres))
        metafunc.parametrize("db_kind", params)


@pytest.fixture
def db_url(db_kind: str, tmp_path: Path) -> Iterator[str]:
    if db_kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with scratch_postgres_schema(os.environ[POSTGRES_ENV], prefix="t") as url:
        yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[CheckpointStore]:
    opened = await open_store(db_url, StoreOptions())
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
async def saver(store: CheckpointStore) -> AsyncIterator[PilotCheckpointSaver]:
    made = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(store)))
    try:
        yield made
    finally:
        await made.aclose()
