"""LangGraph's conformance suite against the saver over an in-process store."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path

from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import ProgressCallbacks
from pilot_checkpoint_sqlite import (
    CheckpointService,
    LocalStoreBackend,
    PilotCheckpointSaver,
    open_store,
)


async def test_conformance_base_and_extended(tmp_path: Path) -> None:
    counter = iter(range(1000))

    @checkpointer_test(name="PilotCheckpointSaver[local sqlite]")
    async def factory() -> AsyncGenerator[PilotCheckpointSaver, None]:
        store = await open_store(f"sqlite:///{tmp_path / f'conf-{next(counter)}.db'}")
        saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(store)))
        try:
            yield saver
        finally:
            await saver.aclose()
            await store.aclose()

    report = await validate(factory, progress=ProgressCallbacks.verbose())
    report.print_report()
    failures = {name: r.failures for name, r in report.results.items() if r.failures}
    assert report.passed_all(), failures
    assert all(r.detected for r in report.results.values()), report.to_dict()
