"""RustWSEServer against real WebSocket clients (`websockets`, and the published `wse-client`)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import warnings
from pathlib import Path

import pytest
import websockets

from conftest import SECRET, free_port, recv_json, recv_raw, token, wait_connect, wait_events
from wse_server import RustWSEServer, rust_jwt_encode

UPSTREAM_HEALTH_KEYS = {
    "connections", "inbound_queue_depth", "inbound_dropped", "cluster_connected",
    "cluster_peer_count", "cluster_messages_sent", "cluster_messages_delivered",
    "cluster_messages_dropped", "cluster_bytes_sent", "cluster_bytes_received",
    "cluster_reconnect_count", "cluster_unknown_message_types", "cluster_dlq_size",
    "uptime_secs", "recovery_enabled", "recovery_topic_count", "recovery_total_bytes",
    "presence_enabled", "presence_topics", "presence_total_users",
}


def run(coro):
    return asyncio.run(coro)


def health_until(srv: RustWSEServer, pred, timeout: float = 5.0) -> dict:
    """The first health_snapshot() matching `pred`: its gauges are sampled by the shards at the
    end of each loop turn, so a change shows up a turn after the event that caused it."""
    end = time.monotonic() + timeout
    while True:
        h = srv.health_snapshot()
        if pred(h):
            return h
        if time.monotonic() >= end:
            raise AssertionError(f"health_snapshot never matched in {timeout}s: {h}")
        time.sleep(0.01)


# -- constructor and lifecycle -------------------------------------------------------------

def test_constructor_refuses_and_adjusts_like_upstream() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        RustWSEServer("127.0.0.1", 1, jwt_secret=b"short")
    with pytest.warns(RuntimeWarning, match="max_message_size"):
        RustWSEServer("127.0.0.1", 1, max_message_size=100)
    with pytest.warns(RuntimeWarning, match="recovery_buffer_size"):
        RustWSEServer("127.0.0.1", 1, recovery_buffer_size=100)
    with pytest.raises(ValueError, match="RS256 public key"):
        RustWSEServer("127.0.0.1", 1, jwt_secret=b"-----BEGIN PUBLIC KEY-----", jwt_algorithm="RS256")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RustWSEServer("127.0.0.1", 1, jwt_secret=SECRET, jwt_issuer="me", jwt_audience="app",
                      recovery_enabled=True, presence_enabled=True, rate_limit_capacity=50.0)


FIXTURES = Path(__file__).resolve().parents[2] / "shards/tests/fixtures"


@pytest.mark.parametrize("alg,key", [("RS256", "rsa"), ("ES256", "ec")])
def test_public_key_algorithms(make_server, alg: str, key: str) -> None:
    """As upstream: with RS256/ES256, `jwt_secret` is the PEM public key (and
    `jwt_previous_secret` the previous one, accepted during a rotation)."""
    pem = {n: (FIXTURES / f"{key}{n}").read_bytes()
           for n in ("1-public.pem", "1-private.pem", "2-public.pem", "2-private.pem")}
    srv, url = make_server(jwt_secret=pem["1-public.pem"], jwt_previous_secret=pem["2-public.pem"],
                           jwt_algorithm=alg)
    now = int(time.time())

    def signed(sub: str, private: str) -> str:
        return rust_jwt_encode({"sub": sub, "iat": now, "exp": now + 600}, pem[private], alg)

    async def go() -> None:
        for sub, private in (("current", "1-private.pem"), ("previous", "2-private.pem")):
            async with websockets.connect(url, additional_headers={
                    "Authorization": f"Bearer {signed(sub, private)}"}):
                ev = wait_events(srv, lambda e: e[0] == "auth_connect")
                assert ev[2] == sub
        # An HS256 token (another algorithm, another key): refused.
        async with websockets.connect(url, additional_headers={
                "Authorization": f"Bearer {token('intruder')}"}) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 4401

    run(go())


def test_binary_hs256_secret(make_server) -> None:
    """As upstream, any bytes make a secret (not only UTF-8)."""
    secret = bytes(range(200, 256)) + b"\x00\xff"
    srv, url = make_server(jwt_secret=secret)
    now = int(time.time())
    tok = rust_jwt_encode({"sub": "bin", "iat": now, "exp": now + 600}, secret)

    async def go() -> None:
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {tok}"}):
            assert wait_events(srv, lambda e: e[0] == "auth_connect")[2] == "bin"

    run(go())


def test_lifecycle(make_server) -> None:
    srv, _ = make_server(start=False)
    assert not srv.is_running()
    assert srv.drain_inbound(10, 10) == []
    srv.start()
    assert srv.is_running()
    with pytest.raises(RuntimeError, match="already running"):
        srv.start()
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 5
    assert not srv.is_running()
    srv.stop()  # idempotent
    srv.start()  # restartable
    assert srv.is_running()


def test_drain_stops_the_server_and_closes_clients(make_server) -> None:
    srv, url = make_server()

    async def go() -> int:
        async with websockets.connect(url) as ws:
            wait_connect(srv)
            threading.Thread(target=srv.drain, args=(4300, "bye", 5)).start()
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            return ws.close_code

    assert run(go()) == 4300
    deadline = time.monotonic() + 5
    while srv.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not srv.is_running()
    with pytest.raises(ValueError):
        srv.drain(1234)


# -- inbound events ----------------------------------------------------------------------

def test_drain_inbound_event_tuples(make_server) -> None:
    srv, url = make_server()

    async def go() -> str:
        async with websockets.connect(url) as ws:
            conn = wait_connect(srv)
            await ws.send(json.dumps({"t": "hello", "p": {"a": 1}}))
            await ws.send("not json")
            await ws.send(b"\x01\x02binary")
            seen: list = []
            wait_events(srv, lambda e: e[0] == "bin", seen=seen)
            assert ("msg", conn, {"t": "hello", "p": {"a": 1}}) in seen
            assert ("raw", conn, "not json") in seen
            assert ("bin", conn, b"\x01\x02binary") in seen
            return conn

    conn = run(go())
    assert wait_events(srv, lambda e: e[0] == "disconnect") == ("disconnect", conn, None)


def test_connect_event_and_auth_connect(make_server) -> None:
    srv, url = make_server()

    async def anon() -> None:
        async with websockets.connect(url):
            ev = wait_events(srv, lambda e: e[0] == "connect")
            assert ev[2] == "" and isinstance(ev[1], str)

    run(anon())
    srv2, url2 = make_server(jwt_secret=SECRET)

    async def authed() -> None:
        async with websockets.connect(url2, additional_headers={"Authorization": "Bearer " + token("alice")}):
            ev = wait_events(srv2, lambda e: e[0] == "auth_connect")
            assert ev[2] == "alice"

    run(authed())


def test_drain_inbound_releases_the_gil(make_server) -> None:
    srv, _ = make_server()
    ticks = 0
    done = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1

    t = threading.Thread(target=spin)
    t.start()
    t0 = time.monotonic()
    assert srv.drain_inbound(10, 500) == []
    waited = time.monotonic() - t0
    before = ticks
    time.sleep(0.05)
    done.set()
    t.join()
    assert 0.45 < waited < 2.0
    assert before > 1000, "another Python thread ran while drain_inbound waited"


def test_callbacks_run_on_a_python_thread(make_server) -> None:
    srv, url = make_server(drain=False, start=False)
    got: list = []
    threads: set = set()

    def record(kind):
        def cb(*args):
            threads.add(threading.current_thread().name)
            got.append((kind, *args))
            if kind == "m" and args[1] == "boom":
                raise RuntimeError("a failing callback does not stop the next one")
        return cb

    srv.set_callbacks(record("c"), record("m"), record("d"))
    srv.start()

    async def go() -> None:
        async with websockets.connect(url) as ws:
            await ws.send('{"t":"hi","p":{}}')
            await ws.send("boom")
            await ws.send("raw text")
            await ws.send(b"\x00bin")
            await asyncio.sleep(0.5)

    run(go())
    deadline = time.monotonic() + 5
    while not any(g[0] == "d" for g in got) and time.monotonic() < deadline:
        time.sleep(0.05)
    conn = got[0][1]
    assert got == [("c", conn, ""), ("m", conn, {"t": "hi", "p": {}}), ("m", conn, "boom"),
                   ("m", conn, "raw text"), ("m", conn, b"\x00bin"), ("d", conn)]
    assert threading.main_thread().name not in threads


# -- sending -------------------------------------------------------------------------------

def test_send_family(make_server) -> None:
    srv, url = make_server()

    async def go() -> None:
        async with websockets.connect(url) as ws:
            conn = wait_connect(srv)
            assert srv.send(conn, '{"t":"text","p":{}}') is None
            assert await recv_json(ws, lambda m: m.get("t") == "text") == {"t": "text", "p": {}}
            srv.send(conn, "plain")
            assert await recv_raw(ws, lambda f: f == "plain") == "plain"
            assert srv.send_bytes(conn, b"\x00\x01") is None
            assert await recv_raw(ws, lambda f: f == b"\x00\x01") == b"\x00\x01"
            n = srv.send_event(conn, {"t": "note", "p": {"k": 1}})
            assert isinstance(n, int) and n > 0
            ev = await recv_json(ws, lambda m: m.get("t") == "note")
            assert ev["p"] == {"k": 1} and ev["c"] == "U" and ev["v"] == 1 and "id" in ev and "seq" in ev
            srv.send_event(conn, {"type": "note2", "payload": {"k": 2}})
            assert (await recv_json(ws, lambda m: m.get("t") == "note2"))["p"] == {"k": 2}
            # Unknown connections are ignored, as upstream does.
            assert srv.send("00000000000000ff", "x") is None
            assert srv.send("not-an-id", "x") is None
            assert srv.send_event("not-an-id", {"t": "a"}) == 0
            with pytest.raises(ValueError):
                srv.send_event(conn, {"p": {}})
            with pytest.raises(TypeError):
                srv.send_event(conn, {"t": "x", "p": object()})

    run(go())


def test_broadcasts_and_subscriptions(make_server) -> None:
    srv, url = make_server()

    async def go() -> None:
        async with websockets.connect(url) as a, websockets.connect(url) as b:
            ca = wait_connect(srv)
            cb = wait_connect(srv)
            assert sorted(srv.get_connections()) == sorted([ca, cb])
            assert srv.get_connection_count() == 2
            assert srv.subscribe_connection(ca, ["room"]) is None
            assert srv.get_topic_subscriber_count("room") == 1
            srv.broadcast_local("room", '{"t":"x","p":{"n":1}}')
            assert (await recv_json(a, lambda m: m.get("t") == "x"))["p"] == {"n": 1}
            srv.broadcast("room", '{"t":"y","p":{"n":2}}')
            assert (await recv_json(a, lambda m: m.get("t") == "y"))["p"] == {"n": 2}
            # Text that is not a JSON object goes as it is (test_wire_compat.py has the rest);
            # text that starts like one but is not is refused: stamped, it would be broken JSON.
            srv.broadcast_local("room", "plain text")
            assert await recv_raw(a, lambda f: f == "plain text") == "plain text"
            with pytest.raises(ValueError, match="starts with '\\{'"):
                srv.broadcast("room", "{not json")
            srv.broadcast_all('{"t":"all","p":{}}')
            for ws in (a, b):
                await recv_json(ws, lambda m: m.get("t") == "all")
            srv.broadcast_all_bytes(b"\x00all")
            for ws in (a, b):
                await recv_raw(ws, lambda f: f == b"\x00all")
            srv.unsubscribe_connection(ca, ["room"])
            assert srv.get_topic_subscriber_count("room") == 0
            srv.subscribe_connection(ca, ["r1", "r2"])
            srv.unsubscribe_connection(ca)
            assert srv.get_topic_subscriber_count("r1") == 0 == srv.get_topic_subscriber_count("r2")

    run(go())


def test_queue_groups(make_server) -> None:
    srv, url = make_server()

    async def go() -> None:
        async with websockets.connect(url):
            conn = wait_connect(srv)
            srv.subscribe_connection(conn, ["jobs"], None, "workers")
            assert srv.get_queue_group_info("jobs") == {"workers": 1}
            assert srv.get_topic_subscriber_count("jobs") == 0

    # No permission asked, as upstream: no "refused" warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(go())


def test_disconnect(make_server) -> None:
    srv, url = make_server()

    async def go() -> None:
        async with websockets.connect(url) as ws:
            conn = wait_connect(srv)
            srv.disconnect(conn)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            # A close frame without status, as upstream: the client reports 1005.
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1005
            assert wait_events(srv, lambda e: e[0] == "disconnect")[1] == conn
        srv.disconnect(conn)  # gone: ignored

    run(go())


# -- presence, recovery, health ---------------------------------------------------------------

def test_presence(make_server) -> None:
    srv, url = make_server(jwt_secret=SECRET, presence_enabled=True)

    async def go() -> None:
        hdr = {"Authorization": "Bearer " + token("alice")}
        async with websockets.connect(url, additional_headers=hdr) as ws:
            conn = wait_events(srv, lambda e: e[0] == "auth_connect")[1]
            srv.subscribe_connection(conn, ["room"], {"status": "on"})
            assert srv.presence("room") == {"alice": {"data": {"status": "on"}, "connections": 1}}
            assert srv.presence_stats("room") == {"num_users": 1, "num_connections": 1}
            ev = wait_events(srv, lambda e: e[0] == "presence_join")
            assert ev == ("presence_join", None, {"topic": "room", "user_id": "alice", "data": {"status": "on"}})
            h = health_until(srv, lambda h: h["presence_topics"] == 1)
            assert h["presence_total_users"] == 1
            srv.update_presence(conn, {"status": "away"})
            update = await recv_json(ws, lambda m: m.get("t") == "presence_update")
            assert update["p"] == {"topic": "room", "user_id": "alice", "data": {"status": "away"}}
            assert srv.presence("room") == {"alice": {"data": {"status": "away"}, "connections": 1}}
            # As upstream: over presence_max_data_size (4096) or unknown -> RuntimeError.
            for bad_conn, data in ((conn, {"x": "y" * 5000}), ("0" * 16, {"a": 1})):
                with pytest.raises(RuntimeError, match="Failed to update presence data"):
                    srv.update_presence(bad_conn, data)
        ev = wait_events(srv, lambda e: e[0] == "presence_leave")
        assert ev[1] is None and ev[2]["user_id"] == "alice" and ev[2]["topic"] == "room"
        assert srv.presence("room") == {}
        health_until(srv, lambda h: h["presence_topics"] == 0 == h["presence_total_users"])

    run(go())
    srv2, _ = make_server()
    assert srv2.presence("room") == {}
    assert srv2.presence_stats("room") == {"num_users": 0, "num_connections": 0}


def test_subscribe_with_recovery(make_server) -> None:
    srv, url = make_server(recovery_enabled=True)

    async def go() -> None:
        async with websockets.connect(url) as ws, websockets.connect(url) as watcher:
            conn = wait_connect(srv)
            watching = wait_connect(srv)
            plain = srv.subscribe_with_recovery(conn, ["prices"])
            assert plain == {"recovered": False, "topics": {"prices": {
                "epoch": None, "offset": 0, "recoverable": False, "recovered": False, "count": 0}}}
            srv.subscribe_connection(watching, ["prices"])
            srv.broadcast("prices", '{"t":"p","p":{"v":1}}')
            first = await recv_json(ws, lambda m: m.get("t") == "p")
            srv.unsubscribe_connection(conn)
            srv.broadcast("prices", '{"t":"p","p":{"v":2}}')
            srv.broadcast("prices", '{"t":"p","p":{"v":3}}')
            # A broadcast is sequenced by the topic's owner after the call returns: once the
            # watcher has v3, both are in the history the recovery reads.
            await recv_json(watcher, lambda m: m.get("t") == "p" and m["p"].get("v") == 3)
            res = srv.subscribe_with_recovery(conn, ["prices"], recover=True,
                                              epoch=first.get("e"), offset=first.get("o"))
            info = res["topics"]["prices"]
            assert info["recoverable"] is True and isinstance(info["epoch"], str)
            assert res["recovered"] is True and info["count"] == 2, res
            got = [(await recv_json(ws, lambda m: m.get("t") == "p"))["p"]["v"] for _ in range(2)]
            assert got == [2, 3]
            # The owner's gauges, sampled at the end of its loop turn.
            h = health_until(srv, lambda h: h["recovery_topic_count"] == 1)
            assert h["recovery_enabled"] is True and h["recovery_total_bytes"] > 0

    run(go())


def test_health_and_metrics(make_server) -> None:
    srv, url = make_server()

    async def go() -> None:
        async with websockets.connect(url):
            wait_connect(srv)
            h = srv.health_snapshot()
            assert UPSTREAM_HEALTH_KEYS <= set(h)
            assert h["connections"] == 1 and h["cluster_connected"] is False
            assert isinstance(h["uptime_secs"], float)
            text = srv.prometheus_metrics()
            assert "wse_connections 1" in text and "# TYPE wse_uptime_seconds gauge" in text
            assert srv.inbound_dropped_count() == 0 and srv.inbound_queue_depth() >= 0

    run(go())


def metric(text: str, name: str) -> float:
    (value,) = [line.split()[1] for line in text.splitlines() if line.split()[:1] == [name]]
    return float(value)


def test_prometheus_recovery_presence_and_rejections(make_server) -> None:
    srv, url = make_server(recovery_enabled=True, presence_enabled=True, max_connections=1)

    def until(pred) -> str:
        # The recovery and presence gauges are the shards' own, sampled at each loop turn's end.
        end = time.monotonic() + 5
        while not pred(text := srv.prometheus_metrics()):
            assert time.monotonic() < end, text
            time.sleep(0.01)
        return text

    async def go() -> None:
        async with websockets.connect(url):
            conn = wait_connect(srv)
            assert metric(srv.prometheus_metrics(), "wse_presence_users") == 0
            srv.subscribe_connection(conn, ["room"], {"x": 1})
            text = until(lambda t: metric(t, "wse_presence_users") == 1)
            assert metric(text, "wse_presence_topics") == 1
            assert metric(text, "wse_recovery_topics") == 0
            srv.subscribe_with_recovery(conn, ["feed"])
            srv.broadcast("feed", '{"t":"a"}')
            text = until(lambda t: metric(t, "wse_recovery_topics") == 1)
            assert metric(text, "wse_recovery_bytes") > 0
            assert metric(text, "wse_cluster_peers") == 0
            # Over max_connections: closed with 1013 after the upgrade, counted as rejected.
            assert metric(text, "wse_connections_rejected_total") == 0
            async with websockets.connect(url) as extra:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(extra.recv(), 5)
                assert closed.value.rcvd.code == 1013
            assert metric(srv.prometheus_metrics(), "wse_connections_rejected_total") == 1

    run(go())


def test_prometheus_topics(make_server) -> None:
    srv, url = make_server()

    async def go() -> None:
        async with websockets.connect(url), websockets.connect(url):
            ca, cb = wait_connect(srv), wait_connect(srv)
            text = srv.prometheus_metrics()
            assert metric(text, "wse_topics") == 0 and "wse_topic_messages_total" not in text
            srv.subscribe_connection(ca, ["two", "one", "gone"])
            srv.subscribe_connection(cb, ["two"])
            srv.unsubscribe_connection(ca, ["gone"])
            for _ in range(3):
                srv.broadcast("two", '{"t":"x"}')
            srv.broadcast("one", "plain")
            srv.broadcast("nobody", '{"t":"x"}')
            end = time.monotonic() + 5
            while metric(text := srv.prometheus_metrics(), "wse_topics") != 2:
                assert time.monotonic() < end, text
                time.sleep(0.01)
            # Publications per topic, most first; a topic nothing holds is not kept (listed).
            lines = [line for line in text.splitlines()
                     if line.startswith("wse_topic_messages_total{")]
            assert lines == ['wse_topic_messages_total{topic="two"} 3',
                             'wse_topic_messages_total{topic="one"} 1']
            assert "# TYPE wse_topic_messages_total counter" in text

    run(go())


def test_cluster_calls_say_single_node(make_server) -> None:
    srv, _ = make_server()
    with pytest.raises(NotImplementedError, match="cluster"):
        srv.connect_cluster(peers=["127.0.0.1:9999"], cluster_port=9998)
    with pytest.raises(NotImplementedError, match="cluster"):
        srv.reload_cluster_tls("c", "k", "ca")
    assert srv.cluster_connected() is False
    assert srv.cluster_peers_count() == 0
    assert srv.cluster_info() == [] and srv.get_cluster_dlq_entries() == []


# -- the published Python client ----------------------------------------------------------------

def test_published_wse_client(make_server) -> None:
    from wse_client import AsyncWSEClient

    srv, url = make_server(jwt_secret=SECRET)

    async def go() -> None:
        async with AsyncWSEClient(url, token=token("bob")) as client:
            conn = wait_events(srv, lambda e: e[0] == "auth_connect")[1]
            srv.subscribe_connection(conn, ["news"])
            srv.broadcast("news", '{"t":"headline","p":{"title":"hi"}}')
            srv.send_event(conn, {"t": "direct", "p": {"n": 1}})
            got = {}
            async def collect() -> None:
                async for event in client:
                    got[event.type] = event.payload
                    if {"headline", "direct"} <= set(got):
                        return
            await asyncio.wait_for(collect(), 10)
            assert got["headline"] == {"title": "hi"} and got["direct"] == {"n": 1}
            await client.send("app_message", {"x": 1})
            ev = wait_events(srv, lambda e: e[0] == "msg" and e[2].get("t") == "app_message")
            assert ev[2]["p"] == {"x": 1}

    run(go())


def test_ctrl_c_interrupts_drain_inbound_and_exits_cleanly(tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "serve.py"
    script.write_text(
        "import sys\n"
        "from wse_server import RustWSEServer\n"
        f"srv = RustWSEServer('127.0.0.1', {free_port()})\n"
        "srv.enable_drain_mode()\n"
        "srv.start()\n"
        "print('READY', flush=True)\n"
        "try:\n"
        "    while True:\n"
        "        srv.drain_inbound(256, 60_000)\n"
        "except KeyboardInterrupt:\n"
        "    print('INTERRUPTED', flush=True)\n"
    )
    env = dict(os.environ, WSE_CORES="2")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "READY"
    time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=15)
    assert "INTERRUPTED" in out
    assert proc.returncode == 0
    assert time.monotonic() - t0 < 10


def test_json_that_is_not_an_object_is_not_delivered(make_server) -> None:
    srv, url = make_server()

    async def go() -> None:
        async with websockets.connect(url) as ws:
            conn = wait_connect(srv)
            await ws.send("[1, 2]")
            err = await recv_json(ws, lambda m: m.get("t") == "error")
            assert err["p"]["code"] == "INVALID_MESSAGE"
            await ws.send("after")
            assert wait_events(srv, lambda e: e[0] in ("raw", "msg")) == ("raw", conn, "after")

    run(go())
