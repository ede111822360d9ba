"""The shared idempotency journal (needs the ``pilot-worker[journal]`` extra).

::

    from pilot_worker.journal import IdempotencyJournal

    journal = IdempotencyJournal("sqlite:////var/lib/pilot/journal.db")
    worker = WorkerServer(transport, config, idempotency_store=journal)
    worker.on_shutdown(journal.aclose)

``pilot-worker --idempotency-store URL`` does the same. See the package
README ("Idempotency across a pool of workers") for the semantics, the lease
and what a crash can and cannot repeat.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("sqlalchemy") is None:  # pragma: no cover - depends on the install
    raise ModuleNotFoundError(
        "pilot_worker.journal needs SQLAlchemy: pip install 'pilot-worker[journal]' "
        "(or 'pilot-worker[journal-postgres]' for PostgreSQL)",
        name="sqlalchemy",
    )

from pilot_worker._journal import IdempotencyJournal
from pilot_worker.errors import JournalError

__all__ = ["IdempotencyJournal", "JournalError"]
