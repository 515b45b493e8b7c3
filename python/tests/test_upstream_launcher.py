"""`../shared/peers/wse_upstream_server.py`, a launcher written against upstream's package, run
unchanged on ours and driven by the published `wse-client` 2.5.1: it handles subscriptions and
publications itself (as upstream's API has the application do), so every path it uses is ours."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
# The project's shared folder sits beside the checkout (CI lays a copy there too).
LAUNCHER = Path(
    os.environ.get("WSE_UPSTREAM_LAUNCHER", ROOT.parent / "shared/peers/wse_upstream_server.py")
)
# Loopback test: everything it waits for normally arrives within milliseconds.
WAIT_S = 10.0


class Lines:
    """A pipe's lines, read by a thread so that the test can wait for one with a timeout."""

    def __init__(self, pipe) -> None:
        self.q: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def wait_for(self, pred, timeout: float = WAIT_S) -> str:
        while True:
            try:
                line = self.q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no matching line in {timeout}s; seen {self.seen}") from None
            if line is None:
                raise AssertionError(f"the stream ended; seen {self.seen}")
            self.seen.append(line)
            if pred(line):
                return line

    def rest(self, timeout: float = WAIT_S) -> list[str]:
        """Every line up to the end of the stream."""
        while True:
            line = self.q.get(timeout=timeout)
            if line is None:
                return self.seen
            self.seen.append(line)


def launcher_env() -> dict[str, str]:
    return dict(os.environ, WSE_CORES="2", PYTHONUNBUFFERED="1")


def mint(sub: str) -> str:
    out = subprocess.run([sys.executable, str(LAUNCHER), "--mint-token", sub],
                         capture_output=True, text=True, env=launcher_env(), timeout=WAIT_S,
                         check=True)
    return out.stdout.strip()


async def recv_type(client, event_type: str) -> object:
    async def until() -> object:
        while True:
            event = await client.recv(timeout=WAIT_S)
            if event.type == event_type:
                return event

    return await asyncio.wait_for(until(), WAIT_S)


def test_upstream_launcher_runs_unchanged_with_wse_client() -> None:
    assert LAUNCHER.is_file(), (
        f"{LAUNCHER} not found: the project's shared/peers folder must sit beside the checkout "
        "(or set WSE_UPSTREAM_LAUNCHER)")
    from wse_client import AsyncWSEClient

    sys.path.insert(0, str(ROOT / "tests/python"))
    from acks import SubscriptionAcks

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCHER), str(port), "--recovery", "--presence", "--verbose",
         "--idle-timeout", "3600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env())
    try:
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        url = out.wait_for(lambda line: line.startswith("READY ")).split()[1]
        assert url == f"ws://127.0.0.1:{port}/wse"
        alice, publisher = mint("alice"), mint("publisher")

        async def go() -> None:
            acks = SubscriptionAcks()
            async with AsyncWSEClient(url, token=alice) as sub, \
                    AsyncWSEClient(url, token=publisher) as pub:
                assert sub.is_ready and pub.is_ready
                assert sub.recovery_enabled  # our server_hello advertises what it was given
                assert await sub.subscribe(["news"])
                await acks.wait("news", WAIT_S)

                await pub.send("publish", {"topic": "news", "event": "headline",
                                           "data": {"title": "hi"}, "ack": True})
                ack = await recv_type(pub, "publish_ack")
                assert ack.payload == {"topic": "news", "published": 1}
                got = await recv_type(sub, "headline")
                assert got.payload == {"title": "hi"}

                # Only the JWT subs in --publishers may publish: the launcher refuses alice.
                await sub.send("publish", {"topic": "news", "data": {"x": 1}})
                refused = await recv_type(sub, "publish_error")
                assert refused.payload == {"reason": "not a publisher", "user": "alice"}

        asyncio.run(go())
        # Presence: the launcher joins subscribers with {"user": sub}; ours reports the join.
        err.wait_for(lambda line: line.startswith("[presence_join]") and "'alice'" in line
                     and "'news'" in line)
        err.wait_for(lambda line: line.startswith("[-] "))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT_S * 2) == 0, err.rest()
        lines = err.rest()
        stats = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("[stats] ")]
        assert stats and stats[-1]["published"] == 1 and stats[-1]["rejected_publishes"] == 1, lines
        assert any(line.startswith("stopped (") for line in lines), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
