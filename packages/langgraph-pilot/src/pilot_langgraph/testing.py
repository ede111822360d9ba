"""Real worker processes on loopback, for tests, examples and local experiments.

``LocalCluster`` starts ``pilot-langgraph-worker`` processes on
``tcp://127.0.0.1:0``, each with its own identity in a directory you give,
makes them and a client identity trust each other, and points this process's
default transport at the client identity, so code written for a real
deployment (``PilotRemoteRunnable(node="search", peer="worker-a")``,
``PilotCheckpointSaver(peer="state-worker")``) runs unchanged::

    with LocalCluster(tmp_dir) as cluster:
        cluster.add_worker("worker-a", handlers=["my_handlers"])
        cluster.add_worker("state-worker", plugins=["checkpoint-sqlite"],
                           extra_args=["--checkpoint-db", f"sqlite:///{tmp_dir}/cp.db"])
        cluster.start()
        ...  # run graphs

Every process it starts is stopped (by pid) when the block exits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pilot_langgraph import _env
from pilot_langgraph._procs import WorkerProcess, start_worker, stop_all, wait_ready
from pilot_langgraph.errors import PilotUsageError

__all__ = ["LocalCluster", "WorkerProcess"]


@dataclass(frozen=True, kw_only=True)
class _WorkerSpec:
    name: str
    handlers: tuple[str, ...]
    plugins: tuple[str, ...]
    extra_args: tuple[str, ...]
    env: Mapping[str, str]
    langgraph_codec: bool


class LocalCluster:
    """Worker processes on loopback that trust each other and a client identity.

    Args:
        directory: Where keys, trust files, logs and ready files go.
        client: Name of the client identity (this process and its children).
        configure_environment: Set ``PILOT_IDENTITY``/``PILOT_TRUST``/``PILOT_TRANSPORT_URL``
            in ``os.environ`` on :meth:`start` (restored on :meth:`stop`), so the
            process-wide default transport and ``PilotCheckpointSaver`` use the
            client identity.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        client: str = "client",
        configure_environment: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.client = client
        self._configure = configure_environment
        self._pending: list[_WorkerSpec] = []
        self.workers: dict[str, WorkerProcess] = {}
        self._saved_env: dict[str, str | None] = {}
        self._started = False

    # -- setup ---------------------------------------------------------------

    def add_worker(
        self,
        name: str,
        *,
        handlers: Sequence[str] = (),
        plugins: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        langgraph_codec: bool = True,
    ) -> None:
        """Declare a worker (started by :meth:`start`)."""
        if self._started:
            raise PilotUsageError("add workers before start()")
        if name == self.client or any(w.name == name for w in self._pending):
            raise PilotUsageError(f"name {name!r} is already used")
        self._pending.append(
            _WorkerSpec(
                name=name,
                handlers=tuple(handlers),
                plugins=tuple(plugins),
                extra_args=tuple(extra_args),
                env=dict(env or {}),
                langgraph_codec=langgraph_codec,
            )
        )

    def _names(self) -> list[str]:
        return [*(w.name for w in self._pending), self.client]

    def pair(self, endpoints: Mapping[str, str] | None = None) -> None:
        """(Re)write every trust file so everyone trusts everyone, with endpoints."""
        from pilot_langgraph._trust import PeerSpec, ensure_trust

        endpoints = dict(endpoints or {})
        ensure_trust(
            *[
                PeerSpec(
                    name=n,
                    identity=self.identity_path(n),
                    trust=self.trust_path(n),
                    endpoint=endpoints.get(n),
                )
                for n in self._names()
            ]
        )

    def identity_path(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def trust_path(self, name: str) -> Path:
        return self.directory / f"{name}.trust.json"

    @property
    def client_env(self) -> dict[str, str]:
        """Environment for a process acting as the client identity."""
        return {
            _env.PILOT_IDENTITY: str(self.identity_path(self.client)),
            _env.PILOT_TRUST: str(self.trust_path(self.client)),
            _env.PILOT_TRANSPORT_URL: "tcp://127.0.0.1:0",
        }

    # -- lifecycle -----------------------------------------------------------

    def start(self, *, timeout: float = 120.0) -> None:
        """Start every declared worker and wait until all serve."""
        if self._started:
            raise PilotUsageError("the cluster is already started")
        self._started = True
        self.pair()
        try:
            for spec in self._pending:
                self.workers[spec.name] = start_worker(
                    spec.name,
                    workdir=self.directory,
                    handlers=spec.handlers,
                    plugins=spec.plugins,
                    extra_args=spec.extra_args,
                    env=spec.env,
                    langgraph_codec=spec.langgraph_codec,
                )
            wait_ready(list(self.workers.values()), timeout=timeout)
            self.pair({n: w.endpoint for n, w in self.workers.items()})
        except BaseException:
            self.stop()
            raise
        if self._configure:
            for key, value in self.client_env.items():
                self._saved_env[key] = os.environ.get(key)
                os.environ[key] = value

    def kill(self, name: str) -> None:
        """SIGKILL one worker (to test failover); it stays in :attr:`workers`."""
        proc = self.workers[name].proc
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10.0)

    def stop(self) -> None:
        """Stop every worker this cluster started (SIGTERM, then SIGKILL). Idempotent."""
        stop_all([w.proc for w in self.workers.values()])
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
