"""PilotRemoteRunnable against LangServe's RemoteRunnable, and remote graph nodes.

Two servers, each a child process on loopback, this process being the client:

- ``pilot``: a ``pilot-langgraph-worker`` (tcp:// carrier, mutual TLS 1.3,
  LangGraph's serializer on the wire) serving a trivial handler that returns
  its input; called with ``PilotRemoteRunnable.ainvoke``.
- ``langserve`` (the anchor): FastAPI + LangServe ``add_routes`` serving a
  trivial ``RunnableLambda`` (identity) under uvicorn with TLS (a self-signed
  certificate made for the run); called with ``langserve.RemoteRunnable.ainvoke``.

The input is the same ~220-byte dict for both. Figures: calls/s at
concurrency 1 (with p50 latency) and 64, and the ratio pilot/langserve.

Then a 3-node LangGraph graph (each node adds 1 to a counter) run once with
local nodes and once with every node a ``PilotRemoteRunnable`` on the worker:
the remote overhead per node is ``(p50 remote - p50 local) / 3``. The same
again with a callback handler attached to the run (so the remote nodes
forward their callback events): the overhead per node with forwarding on.

Last, streamed tokens: a one-node graph whose node runs a streaming chat
model (``GenericFakeChatModel``) replying with 1 or 201 words, consumed with
``stream_mode="messages"``, local and remote. The added latency per streamed
token is ``((remote 201 - local 201) - (remote 1 - local 1)) / (tokens 201 - tokens 1)``
(a reply of n words streams 2n - 1 tokens: the words and the spaces).

The machine is shared and small: absolute numbers are noisy, ratios are what
count. The full run alternates the two servers over several rounds and keeps
the median round.

Usage: ``uv run python integration-tests/benchmarks/bench_langgraph.py [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages

REQUEST: dict[str, Any] = {
    "id": 123456,
    "method": "search",
    "query": "q" * 120,
    "tags": ["alpha", "beta", "gamma"],
    "limit": 10,
    "score": 0.75,
}

HANDLERS = """
from pilot_worker import pilot_handler


@pilot_handler("identity")
async def identity(value):
    return value


@pilot_handler("inc")
async def inc(state):
    return {"count": state["count"] + 1}


@pilot_handler("chat_words")
async def chat_words(state):
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    words = int(state["messages"][-1].content)
    model = GenericFakeChatModel(messages=iter([AIMessage(" ".join(["tok"] * words))]))
    return {"messages": [await model.ainvoke(state["messages"])]}
"""


# ----------------------------------------------------------------------------- servers


def serve_langserve(port: int, cert: str, key: str) -> None:
    """Child process: LangServe serving an identity runnable over TLS."""
    import uvicorn
    from fastapi import FastAPI
    from langchain_core.runnables import RunnableLambda
    from langserve import add_routes

    app = FastAPI()
    add_routes(app, RunnableLambda(lambda value: value), path="/identity")
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        ssl_certfile=cert,
        ssl_keyfile=key,
        log_level="warning",
        access_log=False,
    )


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (valid one day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {port}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- measuring


async def measure(
    call: Callable[[], Awaitable[Any]], concurrency: int, seconds: float
) -> tuple[float, float]:
    """Run ``call`` from ``concurrency`` tasks for ``seconds``; (calls/s, p50 seconds)."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, statistics.median(latencies)


class Counter(TypedDict):
    count: int


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def three_node_graph(nodes: list[Any]) -> Any:
    from langgraph.graph import END, START, StateGraph

    graph = StateGraph(Counter)
    names = ["a", "b", "c"]
    for name, node in zip(names, nodes, strict=True):
        graph.add_node(name, node)
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_edge("b", "c")
    graph.add_edge("c", END)
    return graph.compile()


async def interleaved_p50(
    calls: dict[str, Callable[[], Awaitable[Any]]], seconds: float, slice_secs: float = 0.25
) -> dict[str, float]:
    """p50 latency of each call, measured in turns of ``slice_secs`` each.

    Every call gets the same number of turns, taken in rotation, so a burst of
    load on this shared machine falls on all of them alike.
    """
    latencies: dict[str, list[float]] = {label: [] for label in calls}
    for call in calls.values():
        for _ in range(3):
            await call()  # warm-up
    turns = max(1, round(seconds / slice_secs))
    for _ in range(turns):
        for label, call in calls.items():
            stop_at = time.perf_counter() + slice_secs
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await call()
                latencies[label].append(time.perf_counter() - t0)
    return {label: statistics.median(values) for label, values in latencies.items()}


def graph_call(app: Any, config: Any = None) -> Callable[[], Awaitable[None]]:
    async def one() -> None:
        out = await app.ainvoke({"count": 0}, config)
        assert out["count"] == 3, out

    return one


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_per_call(
    call: Callable[[], Awaitable[Any]], calls: int, worker_pid: int
) -> tuple[float, float]:
    """(client CPU, worker CPU) seconds per call: load on the machine barely moves these."""
    client0, worker0 = time.process_time(), process_cpu(worker_pid)
    for _ in range(calls):
        await call()
    client1, worker1 = time.process_time(), process_cpu(worker_pid)
    return (client1 - client0) / calls, (worker1 - worker0) / calls


async def run(args: argparse.Namespace, langserve_url: str, cert: Path, worker_pid: int) -> int:
    from langchain_core.runnables import RunnableLambda
    from langserve import RemoteRunnable
    from pilot_langgraph import PilotRemoteRunnable, aclose_default_transport

    pilot = PilotRemoteRunnable(node="identity", peer="bench-worker")
    anchor = RemoteRunnable(langserve_url, verify=str(cert))
    assert await pilot.ainvoke(REQUEST) == REQUEST
    assert await anchor.ainvoke(REQUEST) == REQUEST

    async def call_pilot() -> None:
        await pilot.ainvoke(REQUEST)

    async def call_anchor() -> None:
        await anchor.ainvoke(REQUEST)

    seconds = 1.0 if args.quick else 4.0
    rounds = 1 if args.quick else 3
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for concurrency in (1, 64):
            for label, fn in (("pilot", call_pilot), ("langserve", call_anchor)):
                await measure(fn, concurrency, 0.3)  # warm-up
                results.setdefault((label, concurrency), []).append(
                    await measure(fn, concurrency, seconds)
                )

    def med(label: str, c: int) -> tuple[float, float]:
        runs = sorted(results[(label, c)])
        return runs[len(runs) // 2]

    print()
    print("| client -> trivial remote runnable | c=1 p50 | c=1 calls/s | c=64 calls/s |")
    print("|---|---|---|---|")
    for label, title in (
        ("pilot", "PilotRemoteRunnable.ainvoke (tcp://, mutual TLS 1.3)"),
        ("langserve", "LangServe RemoteRunnable.ainvoke (HTTPS, TLS)"),
    ):
        r1, p1 = med(label, 1)
        r64, _ = med(label, 64)
        print(f"| {title} | {p1 * 1e6:,.0f} us | {r1:,.0f} | {r64:,.0f} |")
    ratio1 = med("pilot", 1)[0] / med("langserve", 1)[0]
    ratio64 = med("pilot", 64)[0] / med("langserve", 64)[0]
    print(f"| ratio pilot / langserve (goal >= 10x) | | {ratio1:.1f}x | {ratio64:.1f}x |")

    async def inc_local(state: Counter) -> Counter:
        return {"count": state["count"] + 1}

    local_app = three_node_graph([RunnableLambda(inc_local) for _ in range(3)])
    remote_app = three_node_graph(
        [PilotRemoteRunnable(node="inc", peer="bench-worker") for _ in range(3)]
    )
    gseconds = 1.0 if args.quick else 4.0
    from langchain_core.callbacks import AsyncCallbackHandler

    class Counting(AsyncCallbackHandler):
        """A callback handler that only counts chain ends (callbacks on, nothing slow)."""

        def __init__(self) -> None:
            self.ends = 0

        async def on_chain_end(self, outputs: Any, **kwargs: Any) -> None:
            self.ends += 1

    cb_config = {"callbacks": [Counting()]}
    g = await interleaved_p50(
        {
            "local": graph_call(local_app),
            "remote": graph_call(remote_app),
            "local_cb": graph_call(local_app, cb_config),
            "remote_cb": graph_call(remote_app, cb_config),
        },
        gseconds * (2 if args.quick else 4),
    )
    local_p50, remote_p50 = g["local"], g["remote"]
    local_cb_p50, remote_cb_p50 = g["local_cb"], g["remote_cb"]
    per_node = (remote_p50 - local_p50) / 3
    per_node_cb = (remote_cb_p50 - local_cb_p50) / 3
    print()
    print("| 3-node graph ainvoke | p50 |")
    print("|---|---|")
    print(f"| all nodes local | {local_p50 * 1e6:,.0f} us |")
    print(f"| all nodes PilotRemoteRunnable | {remote_p50 * 1e6:,.0f} us |")
    print(f"| remote overhead per node | {per_node * 1e6:,.0f} us |")
    print(f"| all nodes local, a callback handler attached | {local_cb_p50 * 1e6:,.0f} us |")
    print(f"| all nodes remote, a callback handler attached | {remote_cb_p50 * 1e6:,.0f} us |")
    print(f"| remote overhead per node, callbacks on | {per_node_cb * 1e6:,.0f} us |")
    print()
    # CPU per node: what a node costs in CPU on both sides, whatever else runs.
    calls = 300 if args.quick else 1500
    cpu = {
        label: await cpu_per_call(call, calls, worker_pid)
        for label, call in (
            ("local", graph_call(local_app)),
            ("remote", graph_call(remote_app)),
            ("local_cb", graph_call(local_app, cb_config)),
            ("remote_cb", graph_call(remote_app, cb_config)),
        )
    }

    def cpu_overhead(remote_label: str, local_label: str) -> float:
        client, worker = cpu[remote_label]
        return (client + worker - cpu[local_label][0]) / 3

    cpu_node = cpu_overhead("remote", "local")
    cpu_node_cb = cpu_overhead("remote_cb", "local_cb")
    print("| CPU per 3-node graph run (client + worker) | client | worker |")
    print("|---|---|---|")
    for label, title in (
        ("local", "all nodes local"),
        ("remote", "all nodes remote"),
        ("local_cb", "all nodes local, callbacks on"),
        ("remote_cb", "all nodes remote, callbacks on"),
    ):
        client, worker = cpu[label]
        print(f"| {title} | {client * 1e6:,.0f} us | {worker * 1e6:,.0f} us |")
    print(f"| CPU overhead per remote node | {cpu_node * 1e6:,.0f} us | |")
    print(f"| CPU overhead per remote node, callbacks on | {cpu_node_cb * 1e6:,.0f} us | |")
    print()

    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.graph import END, START, StateGraph

    async def chat_local(state: Chat) -> dict[str, Any]:
        words = int(str(state["messages"][-1].content))
        model = GenericFakeChatModel(messages=iter([AIMessage(" ".join(["tok"] * words))]))
        return {"messages": [await model.ainvoke(state["messages"])]}

    def chat_graph(node: Any) -> Any:
        graph = StateGraph(Chat)
        graph.add_node("model", node)
        graph.add_edge(START, "model")
        graph.add_edge("model", END)
        return graph.compile()

    items: dict[tuple[str, int], int] = {}

    def stream_call(where: str, app: Any, words: int) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            n = 0
            async for _ in app.astream(
                {"messages": [HumanMessage(str(words))]}, stream_mode="messages"
            ):
                n += 1
            items[(where, words)] = n

        return one

    chat_local_app = chat_graph(RunnableLambda(chat_local))
    chat_remote_app = chat_graph(PilotRemoteRunnable(node="chat_words", peer="bench-worker"))
    many = 201
    measured = await interleaved_p50(
        {
            f"{where}/{words}": stream_call(where, app, words)
            for where, app in (("local", chat_local_app), ("remote", chat_remote_app))
            for words in (1, many)
        },
        gseconds * (2 if args.quick else 4),
    )
    figures = {
        (where, words): measured[f"{where}/{words}"]
        for where in ("local", "remote")
        for words in (1, many)
    }
    extra_many = figures[("remote", many)] - figures[("local", many)]
    extra_one = figures[("remote", 1)] - figures[("local", 1)]
    per_token = (extra_many - extra_one) / ((2 * many - 1) - 1)
    print("| stream_mode=messages, one chat node | 1 word | 201 words (401 tokens) | items |")
    print("|---|---|---|---|")
    for where in ("local", "remote"):
        one_p50, many_p50 = figures[(where, 1)], figures[(where, many)]
        print(
            f"| {where} node | {one_p50 * 1e6:,.0f} us | {many_p50 * 1e6:,.0f} us "
            f"| {items[(where, many)]} |"
        )
    print(f"| added latency per streamed token | | {per_token * 1e6:,.1f} us |")
    print()
    overhead = f"{per_node * 1e6:,.0f} us"
    print(
        f"ratios: c=1 {ratio1:.2f}x, c=64 {ratio64:.2f}x; overhead per remote node {overhead} "
        f"({per_node_cb * 1e6:,.0f} us with callbacks on; CPU {cpu_node * 1e6:,.0f} us, "
        f"{cpu_node_cb * 1e6:,.0f} us with callbacks on); "
        f"per streamed token {per_token * 1e6:,.1f} us"
    )
    await aclose_default_transport()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--serve-langserve", nargs=3, metavar=("PORT", "CERT", "KEY"))
    args = parser.parse_args()
    if args.serve_langserve:
        port, cert, key = args.serve_langserve
        serve_langserve(int(port), cert, key)
        return 0

    from pilot_langgraph.testing import LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cert, key = make_certificate(root)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve-langserve", str(port), str(cert), str(key)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # LangServe prints a banner
        )
        try:
            handlers = root / "bench_handlers.py"
            handlers.write_text(HANDLERS)
            with LocalCluster(root / "keys") as cluster:
                cluster.add_worker(
                    "bench-worker", handlers=[str(handlers)], extra_args=["--no-call-log"]
                )
                cluster.start()
                wait_listening(port, server)
                print("machine: 2 shared cores; numbers are noisy, ratios are what count")
                pid = cluster.workers["bench-worker"].pid
                return asyncio.run(run(args, f"https://127.0.0.1:{port}/identity/", cert, pid))
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    sys.exit(main())
