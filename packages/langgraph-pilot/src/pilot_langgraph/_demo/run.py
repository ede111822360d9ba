"""``pilot-langgraph demo``: a real distributed LangGraph run on loopback.

1. Start four worker processes on ``tcp://127.0.0.1`` with their own identities
   (worker-a, worker-b, worker-c serve the graph's nodes; state-worker stores
   checkpoints), all trusting each other and this process.
2. Run planner -> executor -> verifier (after a fan-out research step over the
   three workers) with every node on a different worker and checkpoints on
   state-worker, printing which worker process ran each step.
3. Start a second run in its own process, SIGKILL it mid-way, resume the same
   thread_id from state-worker in a new process.
4. Compare its final state with a purely local, in-process run of the graph.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pilot_langgraph import _env
from pilot_langgraph._demo.child import to_jsonable
from pilot_langgraph._demo.procs import WorkerProcess, start_worker, stop_all, wait_ready

__all__ = ["run_demo"]

WORKERS = ("worker-a", "worker-b", "worker-c")
STATE_WORKER = "state-worker"
CLIENT = "demo-client"
GOAL = "explain how the pieces fit"
# The crash run is killed once this many steps have been reported.
KILL_AFTER_UPDATES = 5


def _say(text: str = "") -> None:
    print(text, flush=True)


def _describe_update(node: str, values: dict[str, Any]) -> str:
    if node == "research":
        parts = [
            f"{label} <- {(values.get(label) or {}).get('by', '?')}"
            for label in ("broad", "deep", "recent")
        ]
        return "fan-out: " + ", ".join(parts)
    trace = values.get("trace") or ["?"]
    where = str(trace[0]).split(" on ", 1)[-1]
    if node == "planner":
        detail = f"plan: {len(values.get('plan', []))} steps"
    elif node == "executor":
        detail = (values.get("results") or [""])[0]
    elif node == "verifier":
        detail = (values.get("verdicts") or [""])[0] + (" (done)" if values.get("done") else "")
    else:
        detail = ""
    return f"{where:<28} {detail}"


def _print_update(prefix: str, node: str, values: dict[str, Any]) -> None:
    _say(f"{prefix}{node:<9} {_describe_update(node, values)}")


def _setup(workdir: Path) -> tuple[list[WorkerProcess], dict[str, str]]:
    from pilot_langgraph._trust import PeerSpec, ensure_trust

    names = [*WORKERS, STATE_WORKER, CLIENT]
    # identities first, so every worker starts already trusting the others
    ensure_trust(
        *[
            PeerSpec(name=n, identity=workdir / f"{n}.key", trust=workdir / f"{n}.trust.json")
            for n in names
        ]
    )
    workers = [
        start_worker(
            name,
            workdir=workdir,
            handlers=["pilot_langgraph._demo.handlers"],
            env={_env.PILOT_DEMO_WORKER: name},
        )
        for name in WORKERS
    ]
    workers.append(
        start_worker(
            STATE_WORKER,
            workdir=workdir,
            plugins=["checkpoint-sqlite"],
            extra_args=["--checkpoint-db", f"sqlite:///{workdir / 'checkpoints.db'}"],
            env={_env.PILOT_DEMO_WORKER: STATE_WORKER},
        )
    )
    wait_ready(workers, timeout=60.0)
    # now that the ports are known, tell everyone where everyone is
    endpoints = {w.name: w.endpoint for w in workers}
    ensure_trust(
        *[
            PeerSpec(
                name=n,
                identity=workdir / f"{n}.key",
                trust=workdir / f"{n}.trust.json",
                endpoint=endpoints.get(n),
            )
            for n in names
        ]
    )
    client_env = {
        _env.PILOT_IDENTITY: str(workdir / f"{CLIENT}.key"),
        _env.PILOT_TRUST: str(workdir / f"{CLIENT}.trust.json"),
        _env.PILOT_TRANSPORT: "tcp://127.0.0.1:0",
    }
    return workers, client_env


async def _distributed_run(thread_id: str) -> dict[str, Any]:
    from pilot_langgraph import PilotCheckpointSaver
    from pilot_langgraph._demo.handlers import build_graph

    saver = PilotCheckpointSaver(peer=STATE_WORKER)
    try:
        app = build_graph(remote=True).compile(checkpointer=saver)
        config: Any = {"configurable": {"thread_id": thread_id}}
        async for update in app.astream({"goal": GOAL}, config, stream_mode="updates"):
            for node, values in update.items():
                _print_update("    ", node, to_jsonable(values))
        state = await app.aget_state(config)
        count = len([c async for c in saver.alist(config)])
        _say(f"    -> {count} checkpoints of thread {thread_id!r} stored on {STATE_WORKER}")
        return dict(state.values)
    finally:
        saver.close()


async def _child(
    mode: str,
    thread_id: str,
    env: dict[str, str],
    *,
    kill_after: int | None,
    limit_secs: float,
) -> tuple[dict[str, Any] | None, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pilot_langgraph._demo.child",
        mode,
        thread_id,
        "--goal",
        GOAL,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None
    final: dict[str, Any] | None = None
    updates = 0
    try:
        async with asyncio.timeout(limit_secs):
            while line := await proc.stdout.readline():
                record = json.loads(line)
                event = record.get("event")
                if event == "start":
                    _say(f"    process pid {record['pid']} started thread {thread_id!r}")
                elif event == "resume":
                    _say(
                        f"    process pid {record['pid']} loaded thread {thread_id!r} from "
                        f"{STATE_WORKER}: next step {record['next']}"
                    )
                elif event == "update":
                    updates += 1
                    _print_update(f"    [{proc.pid}] ", record["node"], record["values"])
                    if kill_after is not None and updates >= kill_after:
                        proc.send_signal(signal.SIGKILL)
                        _say(f"    SIGKILL -> pid {proc.pid} (mid-run, after {updates} steps)")
                        break
                elif event == "final":
                    final = record["state"]
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return final, code


async def _local_run() -> dict[str, Any]:
    from pilot_langgraph._demo.handlers import build_graph

    app = build_graph(remote=False).compile()
    return dict(await app.ainvoke({"goal": GOAL}))


async def _demo(client_env: dict[str, str], limit_secs: float) -> int:
    from pilot_langgraph._demo.handlers import comparable
    from pilot_langgraph._runtime import aclose_default_transport

    _say(f"[2/4] distributed run: each node on its own worker, checkpoints on {STATE_WORKER}")
    try:
        await _distributed_run("demo-run-1")
    finally:
        await aclose_default_transport()

    _say()
    _say("[3/4] crash and recovery: a run in its own process, killed with SIGKILL mid-way")
    thread = "demo-run-2"
    _, code = await _child(
        "run", thread, client_env, kill_after=KILL_AFTER_UPDATES, limit_secs=limit_secs
    )
    _say(f"    killed process exit status: {code} (signal {-code if code < 0 else 0})")
    _say(f"    a new process resumes thread {thread!r} from {STATE_WORKER}:")
    resumed, code = await _child(
        "resume", thread, client_env, kill_after=None, limit_secs=limit_secs
    )
    if code != 0 or resumed is None:
        _say(f"    resume process failed with exit status {code}")
        return 1

    _say()
    _say("[4/4] same final state as a purely local run of the graph?")
    local = to_jsonable(await _local_run())
    mine, theirs = comparable(resumed), comparable(local)
    _say("    killed + resumed (remote): " + json.dumps(mine, sort_keys=True))
    _say("    local, in-process:         " + json.dumps(theirs, sort_keys=True))
    same = json.dumps(mine, sort_keys=True) == json.dumps(theirs, sort_keys=True)
    verdict = "IDENTICAL" if same else "DIFFERENT"
    _say(f"    -> {verdict} (compared without the record of which worker ran each step)")
    for label, trace in (("remote", resumed.get("trace", [])), ("local", local.get("trace", []))):
        _say(f"    {label} trace: " + "; ".join(str(t).split(" (pid")[0] for t in trace))
    return 0 if same else 1


def run_demo(*, keep: bool = False, timeout: float = 60.0) -> int:
    """Run the whole demo; returns the exit code (0: final states identical)."""
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="pilot-langgraph-demo-"))
    workers: list[WorkerProcess] = []
    saved_env = {
        k: os.environ.get(k) for k in (_env.PILOT_IDENTITY, _env.PILOT_TRUST, _env.PILOT_TRANSPORT)
    }
    try:
        _say(f"pilot-langgraph demo (this process: pid {os.getpid()}, files in {workdir})")
        _say("[1/4] starting workers on tcp:// loopback, each with its own identity")
        workers, client_env = _setup(workdir)
        for w in workers:
            role = "checkpoint store" if w.name == STATE_WORKER else "graph nodes"
            _say(f"    {w.name:<13} pid {w.pid:<7} tcp {w.endpoint:<21} {role}")
        _say("    every worker and this process trust each other (keys + trust files in the dir)")
        _say()
        os.environ.update(client_env)
        code = asyncio.run(_demo(client_env, timeout))
        return code
    except Exception as exc:
        _say(f"demo failed: {type(exc).__name__}: {exc}")
        for w in workers:
            _say(f"--- log of {w.name} (pid {w.pid}):\n{w.log_tail()}")
        return 1
    finally:
        stop_all([w.proc for w in workers])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if workers:
            _say(
                f"stopped {len(workers)} workers",
            )
        if keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        _say(f"done in {time.monotonic() - started:.1f} s")
