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
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pilot_langgraph import _env
from pilot_langgraph._demo.child import to_jsonable
from pilot_langgraph._procs import WorkerProcess, start_worker, stop_all, wait_ready

__all__ = ["run_demo"]

WORKERS = ("worker-a", "worker-b", "worker-c")
STATE_WORKER = "state-worker"
CLIENT = "demo-client"
GOAL = "explain how the pieces fit"
# The crash run is killed once this many steps have been reported.
KILL_AFTER_UPDATES = 5


_clock = {"start": time.monotonic()}


def _say(text: str = "") -> None:
    print(text, flush=True)


def _phase(text: str) -> None:
    _say(f"{text}  [t+{time.monotonic() - _clock['start']:.1f}s]")


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


def _names() -> list[str]:
    return [*WORKERS, STATE_WORKER, CLIENT]


def _pair_everyone(workdir: Path, endpoints: dict[str, str]) -> None:
    from pilot_langgraph._trust import PeerSpec, ensure_trust

    ensure_trust(
        *[
            PeerSpec(
                name=n,
                identity=workdir / f"{n}.key",
                trust=workdir / f"{n}.trust.json",
                endpoint=endpoints.get(n),
            )
            for n in _names()
        ]
    )


def _start_workers(workdir: Path) -> list[WorkerProcess]:
    # identities and trust first, so every worker starts already trusting the others
    _pair_everyone(workdir, {})
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
    return workers


def _client_env(workdir: Path) -> dict[str, str]:
    return {
        _env.PILOT_IDENTITY: str(workdir / f"{CLIENT}.key"),
        _env.PILOT_TRUST: str(workdir / f"{CLIENT}.trust.json"),
        _env.PILOT_TRANSPORT_URL: "tcp://127.0.0.1:0",
    }


async def _distributed_run(thread_id: str) -> dict[str, Any]:
    from pilot_langgraph import PilotCheckpointSaver
    from pilot_langgraph._demo.graph import build_graph

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


class _Child:
    """A graph run in its own process, reporting JSON lines (see ``child.py``)."""

    def __init__(self, proc: asyncio.subprocess.Process, thread_id: str) -> None:
        self.proc = proc
        self.thread_id = thread_id
        self.final: dict[str, Any] | None = None
        self.updates = 0

    @classmethod
    async def spawn(
        cls, mode: str, thread_id: str, env: dict[str, str], *, wait_for_go: bool
    ) -> _Child:
        argv = [sys.executable, "-m", "pilot_langgraph._demo.child", mode, thread_id]
        argv += ["--goal", GOAL] + (["--wait-for-go"] if wait_for_go else [])
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.PIPE,
            env={**os.environ, **env},
        )
        return cls(proc, thread_id)

    async def _next(self) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        return json.loads(line) if line else None

    async def wait_ready(self) -> None:
        record = await self._next()
        if record is None or record.get("event") != "ready":
            raise RuntimeError(f"demo run process {self.proc.pid} did not start: {record!r}")

    async def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()

    async def follow(self, *, kill_after: int | None) -> int:
        """Print the steps as they come; SIGKILL the process after ``kill_after`` steps."""
        while (record := await self._next()) is not None:
            event = record.get("event")
            if event == "start":
                _say(f"    process pid {record['pid']} started thread {self.thread_id!r}")
            elif event == "resume":
                _say(
                    f"    process pid {record['pid']} loaded thread {self.thread_id!r} from "
                    f"{STATE_WORKER}: next step {record['next']}"
                )
            elif event == "update":
                self.updates += 1
                _print_update(f"    [{self.proc.pid}] ", record["node"], record["values"])
                if kill_after is not None and self.updates >= kill_after:
                    self.proc.send_signal(signal.SIGKILL)
                    _say(
                        f"    SIGKILL -> pid {self.proc.pid} (mid-run, after {self.updates} steps)"
                    )
                    break
            elif event == "final":
                self.final = record["state"]
        return await self.proc.wait()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


async def _local_run() -> dict[str, Any]:
    from pilot_langgraph._demo.graph import build_graph

    app = build_graph(remote=False).compile()
    return dict(await app.ainvoke({"goal": GOAL}))


async def _main(workdir: Path, workers: list[WorkerProcess], deadline: float) -> int:
    from pilot_langgraph._runtime import aclose_default_transport

    env = _client_env(workdir)
    crash_thread = "demo-run-2"
    # Both graph processes load their code while the workers boot; each waits
    # for a "go" before touching the network. The resuming one never sees the
    # killed one: all it gets is the thread id. The spawns run as tasks of their
    # own so that a --timeout landing mid-spawn still leaves a process handle to
    # stop (a cancelled spawn would orphan a started process).
    spawns = [
        asyncio.ensure_future(_Child.spawn(mode, crash_thread, env, wait_for_go=True))
        for mode in ("run", "resume")
    ]
    try:
        await asyncio.wait(spawns)
        crasher, resumer = (task.result() for task in spawns)
        workers[:] = _start_workers(workdir)
        # Load the graph code while the workers boot, on a thread of its own: an import
        # cannot be cancelled, and --timeout must not wait for one.
        threading.Thread(
            target=importlib.import_module,
            args=("pilot_langgraph._demo.graph",),
            name="demo-preload",
            daemon=True,
        ).start()

        # The waiting thread cannot be cancelled: give it only what is left of --timeout.
        left = max(0.1, deadline - time.monotonic())
        await asyncio.to_thread(wait_ready, workers, timeout=left)
        # now that the ports are known, tell everyone where everyone is
        _pair_everyone(workdir, {w.name: w.endpoint for w in workers})
        for w in workers:
            role = "checkpoint store" if w.name == STATE_WORKER else "graph nodes"
            _say(f"    {w.name:<13} pid {w.pid:<7} tcp {w.endpoint:<21} {role}")
        _say("    every worker and this process trust each other (keys + trust files in the dir)")
        _say()

        os.environ.update(env)
        _phase(f"[2/4] distributed run: each node on its own worker, checkpoints on {STATE_WORKER}")
        try:
            await _distributed_run("demo-run-1")
        finally:
            await aclose_default_transport()

        _say()
        _phase("[3/4] crash and recovery: a run in its own process, killed with SIGKILL mid-way")
        await crasher.wait_ready()
        await crasher.go()
        code = await crasher.follow(kill_after=KILL_AFTER_UPDATES)
        _say(f"    killed process exit status: {code} (signal {-code if code < 0 else 0})")
        _say(
            f"    another process (pid {resumer.proc.pid}, idle until now) resumes thread "
            f"{crash_thread!r} from {STATE_WORKER}:"
        )
        await resumer.wait_ready()
        await resumer.go()
        code = await resumer.follow(kill_after=None)
        if code != 0 or resumer.final is None:
            _say(f"    resume process failed with exit status {code}")
            return 1

        _say()
        _phase("[4/4] same final state as a purely local run of the graph?")
        return _compare(resumer.final, to_jsonable(await _local_run()))
    finally:
        await asyncio.wait(spawns)
        for task in spawns:
            if not task.cancelled() and task.exception() is None:
                await task.result().stop()


def _short(value: Any, width: int = 44) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


def _compare(resumed: dict[str, Any], local: dict[str, Any]) -> int:
    from pilot_langgraph._demo.graph import comparable

    mine, theirs = comparable(resumed), comparable(local)
    _say(f"    {'key':<9} {'killed + resumed, remote':<46} {'local, in-process':<46}")
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        mark = "==" if a == b else "!="
        _say(f"    {key:<9} {_short(a):<46} {_short(b):<46} {mark}")
    same = mine == theirs
    verdict = "IDENTICAL" if same else "DIFFERENT"
    _say(
        f"    -> final states {verdict} on all {len(mine)} keys (left out: the trace of which "
        "worker ran each step, different by design)"
    )
    for label, trace in (("remote", resumed.get("trace", [])), ("local", local.get("trace", []))):
        _say(
            f"    {label + ' trace:':<14}" + "; ".join(" ".join(str(t).split()[:3]) for t in trace)
        )
    return 0 if same else 1


def run_demo(*, keep: bool = False, timeout: float = 120.0) -> int:
    """Run the whole demo; returns the exit code (0: final states identical)."""
    started = _clock["start"] = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="pilot-langgraph-demo-"))
    workers: list[WorkerProcess] = []
    saved_env = {
        k: os.environ.get(k)
        for k in (_env.PILOT_IDENTITY, _env.PILOT_TRUST, _env.PILOT_TRANSPORT_URL)
    }
    code = 1
    try:
        _say(f"pilot-langgraph demo (this process: pid {os.getpid()}, files in {workdir})")
        _phase("[1/4] starting workers on tcp:// loopback, each with its own identity")
        deadline = started + timeout
        code = asyncio.run(asyncio.wait_for(_main(workdir, workers, deadline), timeout))
    except TimeoutError:
        _say(
            f"demo failed: it did not finish within --timeout {timeout:g} s "
            "(a cold start takes 10-30 s; raise --timeout on a slow or loaded machine)"
        )
        for w in workers:
            _say(f"--- log of {w.name} (pid {w.pid}):\n{w.log_tail()}")
        code = 1
    except Exception as exc:
        _say(f"demo failed: {type(exc).__name__}: {exc}")
        for w in workers:
            _say(f"--- log of {w.name} (pid {w.pid}):\n{w.log_tail()}")
        code = 1
    finally:
        stop_all([w.proc for w in workers])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if workers:
            _say(f"stopped {len(workers)} workers (pids {', '.join(str(w.pid) for w in workers)})")
        if keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        _say(f"done in {time.monotonic() - started:.1f} s")
    return code
