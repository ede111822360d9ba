"""Two real worker processes sharing one idempotency journal (SQLite, and PostgreSQL).

(a) kill -9 of a worker after a recorded step: the retry on the other worker
    replays the step (its side effect ran once) and the caller gets the result;
(b) a completed call retried on the other worker is replayed, not re-run;
(c) two concurrent duplicates, one per worker, run the handler once.

Side effects are lines appended to a file by the handler, so the test counts
what really ran in which process. Every test runs on a SQLite journal file
and, when ``PILOT_TEST_POSTGRES_URL`` is set (``scripts/_postgres.sh`` in CI),
on a fresh PostgreSQL schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import textwrap
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pilot_checkpoint_sqlite.testing import scratch_postgres_schema
from pilot_rpc import RpcClient, RpcError
from pilot_transport import open_transport
from pilot_transport.testing import TestPeers, create_test_peers
from pilot_worker.testing import WorkerProcess, run_worker_process

HANDLERS = """
import asyncio
import json
import os
from pathlib import Path

from pilot_worker import Context, pilot_handler

EFFECTS = Path(os.environ["JOURNAL_TEST_EFFECTS"])


def log(kind, **fields):
    with EFFECTS.open("a", encoding="utf-8") as sink:
        sink.write(json.dumps({"kind": kind, "pid": os.getpid(), **fields}) + "\\n")


@pilot_handler("charge", idempotent=True, timeout_secs=None)
async def charge(req, ctx: Context):
    log("run", id=req["id"])

    def side_effect():
        log("charge", id=req["id"])
        return {"charged": req["amount"], "by": os.getpid()}

    receipt = await ctx.step("charge", side_effect)
    log("step-recorded", id=req["id"])
    if req.get("stall_in") == os.getpid():
        await asyncio.Event().wait()  # this worker stalls here until it is killed
    if req.get("work"):
        await asyncio.sleep(req["work"])  # the handler's own work: keeps twins overlapping
    return {"receipt": receipt, "served_by": os.getpid()}
"""

WAIT = 60.0
POSTGRES_ENV = "PILOT_TEST_POSTGRES_URL"


@dataclass
class Pool:
    tmp: Path
    peers: TestPeers
    journal: str
    effects: Path

    def args(self, name: str) -> list[str]:
        return [
            "--transport",
            "tcp://127.0.0.1:0",
            "--identity",
            str(self.peers[name].identity_path),
            "--trust",
            str(self.peers[name].trust_path),
            "--handlers",
            "journal_handlers",
            "--idempotency-store",
            self.journal,
            "--idempotency-lease",
            "1",
            "--no-call-log",
        ]

    def lines(self, kind: str, call_id: str) -> list[dict[str, Any]]:
        if not self.effects.exists():
            return []
        found: list[dict[str, Any]] = []
        for line in self.effects.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by kill -9
                record = json.loads(line)
                if record["kind"] == kind and record["id"] == call_id:
                    found.append(record)
        return found


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgres",
            marks=[
                pytest.mark.postgres,
                pytest.mark.skipif(
                    not os.environ.get(POSTGRES_ENV), reason=f"needs ${POSTGRES_ENV}"
                ),
            ],
        ),
    ]
)
def journal_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The journal the workers share: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'journal.db'}"
        return
    with scratch_postgres_schema(os.environ[POSTGRES_ENV], prefix="journal") as url:
        yield url


@pytest.fixture
def pool(tmp_path: Path, journal_url: str) -> Pool:
    (tmp_path / "journal_handlers.py").write_text(textwrap.dedent(HANDLERS))
    peers = create_test_peers(tmp_path / "peers", ["client", "w1", "w2"])
    return Pool(
        tmp=tmp_path,
        peers=peers,
        journal=journal_url,
        effects=tmp_path / "effects.jsonl",
    )


@contextlib.asynccontextmanager
async def worker(pool: Pool, name: str) -> AsyncGenerator[WorkerProcess]:
    env = {**os.environ, "JOURNAL_TEST_EFFECTS": str(pool.effects)}
    async with run_worker_process(
        pool.args(name), ready_file=pool.tmp / f"{name}.ready", cwd=pool.tmp, env=env
    ) as proc:
        pool.peers.set_endpoint(name, proc.info["endpoint"])
        yield proc


@contextlib.asynccontextmanager
async def client_of(pool: Pool) -> AsyncGenerator[RpcClient]:
    peer = pool.peers["client"]
    async with open_transport(
        "tcp://127.0.0.1:0", identity=peer.identity_path, trust=peer.trust_path
    ) as transport:
        client = RpcClient(transport)
        try:
            yield client
        finally:
            await client.aclose()


async def charge(client: RpcClient, peer: str, request: dict[str, Any], key: str) -> Any:
    return await client.call(peer, 5000, "charge", request, idempotency_key=key, timeout=WAIT)


async def wait_for(condition: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.02)


async def test_kill_9_after_a_recorded_step_replays_it_on_the_other_worker(pool: Pool) -> None:
    async with worker(pool, "w2") as w2, client_of(pool) as client:
        for round_no in range(3):
            call_id = f"a{round_no}"
            async with worker(pool, "w1") as w1:
                request = {"id": call_id, "amount": 10, "stall_in": w1.pid}
                first = asyncio.create_task(charge(client, "w1", request, call_id))
                await wait_for(lambda: pool.lines("step-recorded", call_id))  # noqa: B023
                w1.send_signal(signal.SIGKILL)
                assert await w1.wait() == -signal.SIGKILL
                with pytest.raises(RpcError):
                    await first
            # The caller retries on the other worker: it waits out w1's lease,
            # takes the call over and replays the recorded step.
            result = await charge(client, "w2", request, call_id)
            assert result == {
                "receipt": {"charged": 10, "by": w1.pid},
                "served_by": w2.pid,
            }
            assert len(pool.lines("charge", call_id)) == 1
            assert [r["pid"] for r in pool.lines("run", call_id)] == [w1.pid, w2.pid]
        await w2.wait_for_log("took over call charge")


async def test_a_completed_call_is_replayed_by_the_other_worker(pool: Pool) -> None:
    async with (
        worker(pool, "w1") as w1,
        worker(pool, "w2") as w2,
        client_of(pool) as client,
    ):
        for round_no in range(10):
            call_id = f"b{round_no}"
            request = {"id": call_id, "amount": round_no}
            first, second = ("w1", "w2") if round_no % 2 == 0 else ("w2", "w1")
            done = await charge(client, first, request, call_id)
            again = await charge(client, second, request, call_id)
            assert again == done
            assert done["served_by"] == (w1.pid if first == "w1" else w2.pid)
            assert len(pool.lines("run", call_id)) == 1
            assert len(pool.lines("charge", call_id)) == 1


async def test_concurrent_duplicates_on_two_workers_run_once(pool: Pool) -> None:
    async with (
        worker(pool, "w1"),
        worker(pool, "w2"),
        client_of(pool) as client,
    ):
        for round_no in range(10):
            call_id = f"c{round_no}"
            request = {"id": call_id, "amount": 1, "work": 0.3}
            results = await asyncio.gather(
                charge(client, "w1", request, call_id),
                charge(client, "w2", request, call_id),
            )
            assert results[0] == results[1]
            assert len(pool.lines("run", call_id)) == 1
            assert len(pool.lines("charge", call_id)) == 1
