"""LangGraph's conformance suite against the saver over an in-process store."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import ProgressCallbacks
from pilot_checkpoint_sqlite import (
    CheckpointService,
    LocalStoreBackend,
    PilotCheckpointSaver,
    open_store,
)


async def test_conformance_base_and_extended(db_url: str) -> None:
    @checkpointer_test(name="PilotCheckpointSaver[in-process store]")
    async def factory() -> AsyncGenerator[PilotCheckpointSaver, None]:
        store = await open_store(db_url)
        saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(store)))
        try:
            yield saver
        finally:
            await saver.aclose()
            await store.aclose()

    report = await validate(factory, progress=ProgressCallbacks.quiet())
    failures = {name: r.failures for name, r in report.results.items() if r.failures}
    assert report.passed_all(), failures
    assert all(r.detected for r in report.results.values()), report.to_dict()
    assert report.conformance_level() == "FULL"
