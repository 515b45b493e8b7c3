"""Fixtures for the wse_server package tests: servers on free loopback ports, real clients."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

# Two shards keep start-up quick and still exercise cross-shard routing.
os.environ.setdefault("WSE_CORES", "2")

from wse_server import RustWSEServer, rust_jwt_encode  # noqa: E402

SECRET = b"wse-python-package-test-secret-0123456789"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def upstream_python() -> str:
    """A Python with upstream's `wse-server` 2.5.1 (tests/python/setup-venv.sh makes it), or
    `WSE_UPSTREAM_PYTHON`; checked to be upstream's and not ours."""
    python = os.environ.get("WSE_UPSTREAM_PYTHON")
    if not python:
        subprocess.run([str(ROOT / "tests/python/setup-venv.sh")], check=True, timeout=600)
        venv = Path(os.environ.get("WSE_PY_VENV", ROOT / "target/py-venv"))
        python = str(venv / "bin/python")
    probe = subprocess.run([python, "-c", "import wse_server._wse_accel as a; "
                            "print(hasattr(a, 'ENGINE'))"], capture_output=True, text=True)
    assert probe.stdout.strip() == "False", f"not upstream's package: {probe}"
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token(sub: str, **claims: Any) -> str:
    now = int(time.time())
    return rust_jwt_encode({"sub": sub, "iat": now, "exp": now + 600, **claims}, SECRET)


@pytest.fixture
def make_server() -> Any:
    """make_server(**kwargs) -> (server, url): started on a free port, drain mode unless
    drain=False; stopped at the end of the test."""
    started: list[RustWSEServer] = []

    def make(drain: bool = True, start: bool = True, **kwargs: Any) -> tuple[RustWSEServer, str]:
        port = free_port()
        srv = RustWSEServer("127.0.0.1", port, **kwargs)
        if drain:
            srv.enable_drain_mode()
        if start:
            srv.start()
        started.append(srv)
        return srv, f"ws://127.0.0.1:{port}/wse"

    yield make
    for srv in started:
        srv.stop()
        _pending.pop(id(srv), None)


# Events drained but not yet matched, per server: a later wait_events may want them.
_pending: dict[int, list] = {}


def wait_events(srv: RustWSEServer, pred: Callable[[tuple], bool], timeout: float = 5.0,
                seen: list | None = None) -> tuple:
    """Returns the first event (pending or drained) matching `pred`, leaving the others pending;
    every event looked at goes to `seen`."""
    pending = _pending.setdefault(id(srv), [])
    end = time.monotonic() + timeout
    while True:
        for i, ev in enumerate(pending):
            if seen is not None and ev not in seen:
                seen.append(ev)
            if pred(ev):
                return pending.pop(i)
        if time.monotonic() >= end:
            raise AssertionError(f"no matching event in {timeout}s; pending {pending}")
        pending.extend(srv.drain_inbound(256, 100))


def wait_connect(srv: RustWSEServer) -> str:
    ev = wait_events(srv, lambda e: e[0] in ("connect", "auth_connect"))
    return ev[1]


async def recv_json(ws: Any, pred: Callable[[dict], bool], timeout: float = 5.0) -> dict:
    """Receives frames until a JSON one matches `pred` (server_ready, pings... are skipped)."""
    import asyncio

    async def loop() -> dict:
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                try:
                    frame = frame.decode()
                except UnicodeDecodeError:
                    continue
            try:
                msg = json.loads(frame)
            except ValueError:
                continue
            if isinstance(msg, dict) and pred(msg):
                return msg

    return await asyncio.wait_for(loop(), timeout)


async def recv_raw(ws: Any, pred: Callable[[Any], bool], timeout: float = 5.0) -> Any:
    """Receives frames until one (str or bytes) matches `pred`."""
    import asyncio

    async def loop() -> Any:
        while True:
            frame = await ws.recv()
            if pred(frame):
                return frame

    return await asyncio.wait_for(loop(), timeout)
