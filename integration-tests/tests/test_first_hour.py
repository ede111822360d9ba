"""A newcomer's first hour: the README's commands work as written on a fresh machine."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pilot_rpc import PilotClient
from pilot_transport import Identity, TrustedPeer, TrustStore

WAIT = 120.0  # failure bound only: a loaded 2-core machine starts Python slowly

HANDLERS = """
from pilot_worker import pilot_handler

@pilot_handler("greet")
def greet(payload):
    return f"hello {payload}"
"""


def _fresh_env(home: Path) -> dict[str, str]:
    """The environment of a machine where nothing was set up: no PILOT_* at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PILOT_", "XDG_"))}
    env["HOME"] = str(home)
    return env


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log.read_text()}")
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return json.loads(text.splitlines()[0])
        time.sleep(0.05)
    pytest.fail(f"worker not ready after {WAIT}s:\n{log.read_text()}")


def test_the_readme_worker_command_works_on_a_fresh_machine(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_handlers.py").write_text(textwrap.dedent(HANDLERS))
    env = _fresh_env(home)
    # Only the ready file is added (the test must know when it serves); the command is the README's.
    ready = tmp_path / "ready.json"
    env["PILOT_WORKER_READY_FILE"] = str(ready)
    log = tmp_path / "worker.log"
    worker_cli = Path(sys.executable).parent / "pilot-langgraph-worker"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(worker_cli), "--handlers", "my_handlers", "--port", "5000"],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        info = _wait_for_file(ready, proc, log)
        config_dir = home / ".config" / "pilot"
        key = config_dir / "identity.key"
        text = log.read_text()
        # First run: the default identity was created, and the log says where.
        assert key.exists()
        assert f"created a new identity at {key}" in text
        assert (key.stat().st_mode & 0o777) == 0o600
        # No trust file yet: the log says it is missing (not "lists no peers").
        assert f"trust file {config_dir / 'trust.json'} does not exist" in text
        assert info["port"] == 5000

        # Pair a caller with it and call the handler, to see it really serves.
        worker_identity = Identity.load(key)
        caller = Identity.generate()
        TrustStore.open(config_dir / "trust.json").add(TrustedPeer("caller", caller.public_key))
        endpoint = str(info["endpoint"])
        caller_trust = TrustStore.in_memory(
            [TrustedPeer("worker", worker_identity.public_key, endpoint=endpoint)]
        )

        async def call() -> object:
            async with PilotClient(identity=caller, trust=caller_trust) as client:
                return await client.call("worker", 5000, "greet", "reader", timeout=WAIT)

        assert asyncio.run(call()) == "hello reader"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_typo_in_pilot_identity_fails_clearly_and_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = _fresh_env(home)
    env["PILOT_IDENTITY"] = str(tmp_path / "me.kye")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "pilot-langgraph-worker"), "--port", "5000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert proc.returncode == 2
    assert "me.kye" in proc.stderr
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "me.kye").exists()
    assert not (home / ".config" / "pilot" / "identity.key").exists()


def test_demo_honours_its_timeout_with_a_clear_message(tmp_path: Path) -> None:
    env = _fresh_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "pilot_langgraph._cli", "demo", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=env,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "did not finish within --timeout 1 s" in out
    assert "Traceback" not in out
    # Honoured: it stops at the timeout, not after the slow parts (an import of
    # langgraph, the workers' start) finish. A generous bound: the old code took
    # 25-80 s here, the fixed one about the timeout plus stopping the workers.
    done = re.search(r"done in ([\d.]+) s", out)
    assert done is not None, out
    assert float(done[1]) < 30.0, out
