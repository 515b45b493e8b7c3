"""The Python snippets of WSE's v2 migration guide (`../shared/seeds/wse-v2-migration-guide.md`),
read from the guide and run as they are written, in order, on our package.

The guide's snippets are fragments: they use names an application has at hand (`server`,
`conn_id`, `data`, `e`, `o`), which the test binds to real ones (a running server, a connected
client, a recovery position the client was given), and two elide the constructor's arguments as
`RustWSEServer(..., name=value)`, which the test reads as `RustWSEServer(host, port,
name=value)` — the only change made to any snippet. The v1.x snippets ("Before") must fail as
upstream 2.x fails them (the names are gone), the cluster snippets with a NotImplementedError
naming the missing cluster.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from conftest import free_port, wait_connect, wait_events
from wse_server import RustWSEServer

ROOT = Path(__file__).resolve().parents[2]
GUIDE = Path(
    os.environ.get("WSE_MIGRATION_GUIDE", ROOT.parent / "shared/seeds/wse-v2-migration-guide.md")
)
ELIDED = "RustWSEServer(...,"


def snippets() -> list[str]:
    assert GUIDE.is_file(), (
        f"{GUIDE} not found: the project's shared/seeds folder must sit beside the checkout "
        "(or set WSE_MIGRATION_GUIDE)")
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)


def find(code: list[str], needle: str) -> str:
    found = [c for c in code if needle in c]
    assert len(found) == 1, f"one snippet with {needle!r} expected, found {len(found)}"
    return found[0]


def statements(snippet: str) -> list[str]:
    """The snippet's top-level statements, each as its source text."""
    tree = ast.parse(snippet)
    return [ast.get_source_segment(snippet, node) for node in tree.body]


def recv_type(ws, t: str) -> dict:
    """The next JSON message of type `t` (server_ready, pings... before it are skipped)."""
    while True:
        frame = ws.recv(timeout=5)
        msg = json.loads(frame) if isinstance(frame, str) else None
        if isinstance(msg, dict) and msg.get("t") == t:
            return msg


def client(url: str):
    """A connected client (a thread of its own keeps it open), once the server said ready."""
    ws = ws_connect(url)
    recv_type(ws, "server_ready")
    return ws


def test_every_snippet_is_covered() -> None:
    code = snippets()
    assert len(code) == 7, "the guide changed: cover its new snippets"
    for needle in ("WSERouter", '"0.0.0.0", 5007', "connect_redis", "peers=[\"10.0.0.2:9999\"],\n    cluster_port",
                   "tls_ca=", "presence_enabled=True", "recovery_enabled=True"):
        find(code, needle)


def test_v1_snippets_fail_as_on_upstream_2x() -> None:
    code = snippets()
    # `WSERouter` was removed in 2.0 (upstream 2.5.1: ImportError too).
    with pytest.raises(ImportError, match="WSERouter"):
        exec(find(code, "WSERouter"), {})
    srv = RustWSEServer("127.0.0.1", free_port())
    with pytest.raises(AttributeError, match="connect_redis"):
        exec(find(code, "connect_redis"), {"server": srv, "data": '{"t":"x","p":{}}'})


def test_v2_quick_start_snippet_runs_unmodified() -> None:
    ns: dict = {}
    exec(find(snippets(), '"0.0.0.0", 5007'), ns)
    server = ns["server"]
    try:
        assert server.is_running()
        with client("ws://127.0.0.1:5007/wse"):
            assert wait_connect(server)
    finally:
        server.stop()


def test_cluster_snippets_raise_not_implemented_naming_the_cluster(make_server) -> None:
    srv, _ = make_server()
    for needle in ('peers=["10.0.0.2:9999"],\n    cluster_port', "tls_ca="):
        with pytest.raises(NotImplementedError, match="cluster"):
            exec(find(snippets(), needle), {"server": srv, "data": '{"t":"x","p":{}}'})
    assert srv.is_running()


def run_elided(snippet: str, bind) -> dict:
    """Runs `snippet`'s first statement (the elided constructor) on a free port, then `bind(ns)`
    (start the server, connect a client...), then the rest; returns the namespace."""
    first, *rest = statements(snippet)
    assert first.startswith(f"server = {ELIDED}"), first
    port = free_port()
    ns: dict = {"RustWSEServer": RustWSEServer, "_port": port}
    exec(first.replace(ELIDED, 'RustWSEServer("127.0.0.1", _port,', 1), ns)
    try:
        bind(ns, f"ws://127.0.0.1:{port}/wse")
        for stmt in rest:
            exec(stmt, ns)
        return ns
    finally:
        ns["server"].stop()


def test_presence_snippet() -> None:
    clients = []

    def bind(ns: dict, url: str) -> None:
        server = ns["server"]
        server.enable_drain_mode()
        server.start()
        clients.append(client(url))
        ns["conn_id"] = wait_connect(server)

    ns = run_elided(find(snippets(), "presence_enabled=True"), bind)
    clients[0].close()
    conn = ns["conn_id"]
    # Authentication off: the user is the connection.
    assert ns["members"] == {conn: {"data": {"status": "online"}, "connections": 1}}


def test_recovery_snippet() -> None:
    clients = []

    def bind(ns: dict, url: str) -> None:
        server = ns["server"]
        server.enable_drain_mode()
        server.start()
        # A client that was subscribed and saw offsets up to 1 of 3, then came back as conn_id.
        with client(url) as before:
            first = wait_connect(server)
            pos = server.subscribe_with_recovery(first, ["prices"], recover=True)
            ns["e"] = pos["topics"]["prices"]["epoch"]
            for i in range(3):
                server.broadcast_local("prices", '{"t":"price","p":{"i":%d}}' % i)
            for i in range(3):
                assert recv_type(before, "price")["p"] == {"i": i}
            ns["o"] = 1
        wait_events(server, lambda ev: ev[0] == "disconnect")
        clients.append(client(url))
        ns["conn_id"] = wait_connect(server)

    ns = run_elided(find(snippets(), "recovery_enabled=True"), bind)
    # What the client missed, replayed to it (already on its socket when the server stopped).
    assert [recv_type(clients[0], "price")["p"] for _ in range(2)] == [{"i": 1}, {"i": 2}]
    clients[0].close()
    assert ns["result"]["recovered"] is True
    assert ns["result"]["topics"]["prices"]["count"] == 2
    assert ns["result"]["topics"]["prices"]["offset"] == 3
