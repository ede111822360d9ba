"""LangGraph's conformance suite against a store worker in another process over tcp://.

The saver reaches a real ``pilot-worker --plugin checkpoint-sqlite`` process
through TLS on loopback; the store is a SQLite file and, when
``PILOT_TEST_POSTGRES_URL`` is set (CI), a PostgreSQL database.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import ProgressCallbacks
from pilot_checkpoint_sqlite import PilotCheckpointSaver
from pilot_checkpoint_sqlite.testing import scratch_postgres_schema, start_store_worker
from pilot_transport.testing import create_test_peers

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
    with scratch_postgres_schema(os.environ[POSTGRES_ENV], prefix="it") as url:
        yield url


async def test_conformance_over_a_real_store_worker(tmp_path: Path, db_url: str) -> None:
    peers = create_test_peers(tmp_path / "peers", ["graph", "store"])
    worker = start_store_worker(
        identity=peers["store"].identity_path,
        trust=peers["store"].trust_path,
        db_url=db_url,
        log_dir=tmp_path,
    )
    try:
        peers.set_endpoint("store", worker.endpoint)

        @checkpointer_test(name="PilotCheckpointSaver[worker over tcp://]")
        async def factory() -> AsyncGenerator[PilotCheckpointSaver, None]:
            saver = PilotCheckpointSaver(
                peer="store",
                port=worker.port,
                transport="tcp://127.0.0.1:0",
                identity=peers["graph"].identity_path,
                trust=peers["graph"].trust_path,
            )
            try:
                yield saver
            finally:
                await saver.aclose()

        report = await validate(factory, progress=ProgressCallbacks.quiet())
        failures = {name: r.failures for name, r in report.results.items() if r.failures}
        assert report.passed_all(), failures
        assert report.conformance_level() == "FULL"
        assert all(r.detected for r in report.results.values()), report.to_dict()
    finally:
        code = worker.stop()
    assert code == 0, worker.log()
