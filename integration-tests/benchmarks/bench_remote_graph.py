"""PilotRemoteGraph against LangGraph's RemoteGraph + ``langgraph dev``, same graph.

Both servers are child processes on loopback serving the planner/executor/
verifier graph of ``_bench_remote_graph_app.py`` with an in-memory checkpointer:

- ``pilot``: ``pilot-langgraph-worker --graph bench=...`` (tcp:// carrier,
  mutual TLS 1.3, LangGraph's serializer), driven with ``PilotRemoteGraph``.
- ``langgraph dev`` (the anchor): ``langgraph-cli[inmem]`` installed from PyPI
  into a separate virtual environment made by this benchmark (HTTP on
  loopback, no TLS; ``--n-jobs-per-worker 16 --no-reload``), driven with
  LangGraph's own ``RemoteGraph``.

Figures: runs/s of ``ainvoke`` (each run on a new thread) at concurrency 1 and
16, and time to the first streamed token (``stream_mode="messages"``, median),
then the ratios pilot / anchor. The anchor is skipped (and the script says so)
with ``--no-anchor``, in ``--quick`` mode, or when the install fails.

The machine is shared and small: absolute numbers are noisy, ratios are what
count; the load average is printed with the figures.

Usage: ``uv run python integration-tests/benchmarks/bench_remote_graph.py [--quick] [--no-anchor]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
APP = HERE / "_bench_remote_graph_app.py"
INPUT = {"task": "ship"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _runs_per_sec(
    call: Callable[[], Awaitable[Any]], *, runs: int, concurrency: int
) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(runs):
        queue.put_nowait(i)

    async def worker() -> None:
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return runs / (time.perf_counter() - started)


async def _ttft(stream: Callable[[], Any], *, runs: int) -> float:
    """Median seconds from starting a run to its first ``messages`` item."""
    times: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        first: float | None = None
        async for _item in stream():
            if first is None:
                first = time.perf_counter() - started
        assert first is not None, "the run streamed no token"
        times.append(first)
    return statistics.median(times)


async def _measure(
    invoke: Callable[[], Awaitable[Any]], stream: Callable[[], Any], *, runs: int
) -> dict[str, float]:
    for _ in range(3):  # warm-up
        await invoke()
    return {
        "c1": await _runs_per_sec(invoke, runs=runs, concurrency=1),
        "c16": await _runs_per_sec(invoke, runs=runs * 2, concurrency=16),
        "ttft_ms": 1000.0 * await _ttft(stream, runs=max(5, runs // 4)),
    }


@contextlib.contextmanager
def _pilot_worker(directory: Path) -> Iterator[None]:
    from pilot_langgraph.testing import LocalCluster

    with LocalCluster(directory) as cluster:
        cluster.add_worker("graph-worker", extra_args=["--graph", f"bench={APP}:builder"])
        cluster.start()
        yield


async def _pilot(runs: int) -> dict[str, float]:
    from pilot_langgraph import PilotRemoteGraph, aclose_default_transport

    remote = PilotRemoteGraph("bench", peer="graph-worker")

    def new_thread() -> Any:
        return {"configurable": {"thread_id": str(uuid.uuid4())}}

    async def invoke() -> Any:
        out = await remote.ainvoke(INPUT, new_thread())
        assert out["answer"] == "all three steps verified ok", out

    def stream() -> Any:
        return remote.astream(INPUT, new_thread(), stream_mode="messages")

    try:
        return await _measure(invoke, stream, runs=runs)
    finally:
        await aclose_default_transport()


def _install_anchor(directory: Path) -> Path | None:
    uv = shutil.which("uv") or os.environ.get("UV")
    venv = directory / "venv"
    try:
        if uv:
            subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
            subprocess.run(
                [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                 "langgraph-cli[inmem]"],
                check=True,
                timeout=600,
            )  # fmt: skip
        else:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", "langgraph-cli[inmem]"],
                check=True,
                timeout=600,
            )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"anchor skipped: could not install langgraph-cli[inmem] ({exc})")
        return None
    return venv / "bin" / "langgraph"


@contextlib.contextmanager
def _langgraph_dev(cli: Path, directory: Path) -> Iterator[str]:
    shutil.copy(APP, directory / "app.py")
    config = {"graphs": {"bench": "./app.py:graph"}, "dependencies": ["."]}
    (directory / "langgraph.json").write_text(json.dumps(config))
    port = _free_port()
    env = {**os.environ, "LANGSMITH_TRACING": "false", "LANGGRAPH_CLI_NO_ANALYTICS": "1"}
    log = (directory / "dev.log").open("wb")
    proc = subprocess.Popen(
        [str(cli), "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1",
         "--port", str(port), "--n-jobs-per-worker", "16", "--config", "langgraph.json"],
        cwd=directory,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"langgraph dev exited: see {directory / 'dev.log'}")
            try:
                with urllib.request.urlopen(url + "/ok", timeout=2):  # noqa: S310 - loopback
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("langgraph dev did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


async def _anchor(url: str, runs: int) -> dict[str, float]:
    from langgraph.pregel.remote import RemoteGraph

    remote = RemoteGraph("bench", url=url)

    def new_thread() -> Any:
        return {"configurable": {"thread_id": str(uuid.uuid4())}}

    async def invoke() -> Any:
        out = await remote.ainvoke(INPUT, new_thread())
        assert out["answer"] == "all three steps verified ok", out

    def stream() -> Any:
        return remote.astream(INPUT, new_thread(), stream_mode="messages")

    return await _measure(invoke, stream, runs=runs)


def _row(name: str, figures: dict[str, float]) -> str:
    return (
        f"{name:<22} runs/s c=1 {figures['c1']:8.1f}   runs/s c=16 {figures['c16']:8.1f}   "
        f"first token {figures['ttft_ms']:7.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few runs, no anchor (for CI)")
    parser.add_argument("--no-anchor", action="store_true", help="skip langgraph dev")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure")
    args = parser.parse_args(argv)
    runs = args.runs or (10 if args.quick else 100)
    print(f"load average: {os.getloadavg()}  runs: {runs}")
    with tempfile.TemporaryDirectory(prefix="bench-remote-graph-") as tmp:
        root = Path(tmp)
        with _pilot_worker(root / "pilot"):
            pilot = asyncio.run(_pilot(runs))
        print(_row("PilotRemoteGraph", pilot))
        if args.quick or args.no_anchor:
            print("anchor skipped: RemoteGraph + langgraph dev runs only in the full mode")
            return 0
        anchor_dir = root / "anchor"
        anchor_dir.mkdir()
        cli = _install_anchor(anchor_dir)
        if cli is None:
            return 0
        with _langgraph_dev(cli, anchor_dir) as url:
            anchor = asyncio.run(_anchor(url, runs))
        print(_row("RemoteGraph+lg dev", anchor))
        print(
            f"ratios pilot / anchor: c=1 {pilot['c1'] / anchor['c1']:.1f}x   "
            f"c=16 {pilot['c16'] / anchor['c16']:.1f}x   "
            f"first token {anchor['ttft_ms'] / pilot['ttft_ms']:.1f}x sooner"
        )
        print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
