#!/usr/bin/env python3
# Vendored from the project's shared peers kit (shared/peers/wse_upstream_server.py) so that CI,
# which runs on a fresh checkout of this repository alone, can run the Rust client against the
# upstream server (client/tests/upstream.rs).
"""Reference ("peer") launcher for the upstream WSE server (PyPI `wse-server`).

Runs `wse_server.RustWSEServer` (Rust core via PyO3) on 127.0.0.1 only, with
HS256 JWT auth and drain mode, so that benchmarks and interop tests can compare
against the real upstream implementation.

Needs Python >= 3.12 (wse-server declares Requires-Python >=3.12) and
`pip install wse-server` (tested with 2.5.1).

Port: first positional argument, else $WSE_PORT, else 5007.
JWT secret: $WSE_JWT_SECRET (>= 32 bytes), else a fixed default (benchmarks only).
Optional claims checks: $WSE_JWT_ISSUER / $WSE_JWT_AUDIENCE (or flags).

What the drain thread does
  auth_connect        -> remember conn -> user (JWT `sub`); subscribe the
                         connection to --auto-topics (if any). NOTE: the Rust
                         core does not pass the URL query (`?topics=`) nor the
                         JWT claims to Python, so "requested topics" arrive as
                         a client message (below), not with the handshake.
  msg subscription_update {"action": "subscribe"|"unsubscribe", "topics": [...],
                           "recover": bool, "recovery": {topic: {epoch, offset}}}
                         (what wse-client's subscribe()/unsubscribe() send)
  msg subscribe / unsubscribe {"topics": [...]}   (older/simple form)
                      -> subscribe_connection / subscribe_with_recovery, and a
                         "subscription_update" reply (success_topics, and per
                         topic epoch/offset when --recovery is on).
  msg publish {"topic": T, "data": <json>, "event": "<type>"}  or
              {"topic": T, "raw": "<json object text>"}
                      -> only from connections whose JWT sub is listed in
                         --publishers: server.broadcast_local(T, frame)
                         (server.broadcast(T, frame) with --cluster-port: upstream's mesh).
                         The frame is {"t": event or "publication", "p": data},
                         or `raw` verbatim. Optional "ack": true -> a
                         "publish_ack" reply with the count published.
  msg rate_control {"topic": T, "rate": N, "bytes": B, "duration": S}
                      -> (publishers only) reconfigure the built-in rate loop;
                         rate 0 stops it.
  disconnect          -> forget the connection.

Built-in rate loop (optional): --pub-topic T --pub-rate N [--pub-bytes B]
  broadcasts N messages/s to T with
  {"t": "bench", "p": {"seq": n, "ts_ns": <time.time_ns() at send>, "pad": "x"*B}}.

Other:
  --mint-token SUB   print a JWT for SUB (same secret/iss/aud) and exit.
  --run-seconds S    stop by itself after S seconds (0 = until SIGINT/SIGTERM).
  Prints one line "READY ws://127.0.0.1:PORT/wse" on stdout when listening.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from wse_server import RustWSEServer, rust_jwt_encode

HOST = "127.0.0.1"  # loopback only, on purpose: there is no flag to change it
DEFAULT_SECRET = "wse-peer-benchmark-secret-not-for-production-0123456789"


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def csv_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def mint_token(sub: str, secret: bytes, issuer: str | None, audience: str | None,
               ttl: int = 24 * 3600) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return rust_jwt_encode(claims, secret)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tokio does
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def wait_listening(port: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class RateLoop:
    """Broadcasts `rate` messages/s to `topic` from its own thread."""

    def __init__(self, server: RustWSEServer, stop: threading.Event) -> None:
        self.server = server
        self.stop = stop
        self.lock = threading.Lock()
        self.topic = ""
        self.rate = 0.0
        self.pad = ""
        self.deadline = 0.0  # 0 = no deadline
        self.generation = 0
        self.sent = 0
        self.wake = threading.Event()

    def configure(self, topic: str, rate: float, nbytes: int, duration: float) -> None:
        with self.lock:
            self.topic = topic
            self.rate = max(0.0, float(rate))
            self.pad = "x" * max(0, int(nbytes))
            self.deadline = time.monotonic() + duration if duration > 0 else 0.0
            self.generation += 1
        self.wake.set()
        log(f"[rate] topic={topic!r} rate={rate}/s bytes={nbytes} duration={duration or 'inf'}")

    def run(self) -> None:
        seq = 0
        while not self.stop.is_set():
            with self.lock:
                topic, rate, pad, deadline, gen = (
                    self.topic, self.rate, self.pad, self.deadline, self.generation)
            if not topic or rate <= 0:
                self.wake.wait(0.2)
                self.wake.clear()
                continue
            start = time.monotonic()
            done = 0
            while not self.stop.is_set():
                now = time.monotonic()
                if deadline and now >= deadline:
                    with self.lock:
                        if self.generation == gen:
                            self.rate = 0.0
                    log(f"[rate] duration over, {done} messages sent to {topic!r}")
                    break
                with self.lock:
                    if self.generation != gen:
                        break
                due = int((now - start) * rate) + 1 - done
                # cap one burst so a stalled thread does not flood afterwards
                for _ in range(min(due, 10_000)):
                    seq += 1
                    frame = json.dumps(
                        {"t": "bench", "p": {"seq": seq, "ts_ns": time.time_ns(), "pad": pad}},
                        separators=(",", ":"))
                    self.fan_out(topic, frame)
                    done += 1
                    self.sent += 1
                # sleep until the next message is due (bounded to stay responsive)
                next_at = start + done / rate
                self.stop.wait(min(max(next_at - time.monotonic(), 0.0), 0.05))


class Peer:
    def __init__(self, args: argparse.Namespace, secret: bytes) -> None:
        self.args = args
        self.stop = threading.Event()
        self.server = RustWSEServer(
            HOST, args.port,
            max_connections=args.max_connections,
            jwt_secret=secret,
            jwt_issuer=args.issuer,
            jwt_audience=args.audience,
            recovery_enabled=args.recovery,
            recovery_buffer_size=args.recovery_buffer_size,
            presence_enabled=args.presence,
            max_inbound_queue_size=args.inbound_queue,
            rate_limit_capacity=args.rate_limit_capacity,
            rate_limit_refill=args.rate_limit_refill,
            max_outbound_queue_bytes=args.max_outbound_queue_bytes,
            ping_interval=args.ping_interval,
            idle_timeout=args.idle_timeout,
        )
        self.server.enable_drain_mode()  # must come before start()
        self.users: dict[str, str] = {}  # conn_id -> JWT sub
        self.publishers = set(csv_list(args.publishers))
        self.auto_topics = csv_list(args.auto_topics)
        self.rate = RateLoop(self.server, self.stop)
        self.rate.fan_out = self.fan_out
        self.published = 0
        self.rejected_publishes = 0
        self.events = 0

    # -- replies -------------------------------------------------------------
    def fan_out(self, topic: str, frame: str) -> None:
        """broadcast() crosses the mesh in cluster mode; broadcast_local() otherwise."""
        if self.args.cluster_port:
            self.server.broadcast(topic, frame)
        else:
            self.server.broadcast_local(topic, frame)

    def reply(self, conn_id: str, msg_type: str, payload: dict[str, Any]) -> None:
        frame = {"c": "WSE" if msg_type == "subscription_update" else "U",
                 "t": msg_type, "p": payload, "v": 1}
        self.server.send(conn_id, json.dumps(frame, separators=(",", ":")))

    # -- subscriptions ---------------------------------------------------------
    def subscribe(self, conn_id: str, topics: list[str], recover: bool,
                  recovery: dict[str, Any]) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.args.recovery:
            wanted = recovery if (recover and isinstance(recovery, dict)) else {}
            plain = [t for t in topics if t not in wanted]
            if plain:
                res = self.server.subscribe_with_recovery(conn_id, plain, recover=False)
                info.update(res.get("topics", {}))
            for topic in topics:
                pos = wanted.get(topic)
                if not isinstance(pos, dict):
                    continue
                off = pos.get("offset")
                res = self.server.subscribe_with_recovery(
                    conn_id, [topic], recover=True, epoch=pos.get("epoch"),
                    offset=int(off) if off is not None else None)
                info.update(res.get("topics", {}))
        if self.args.presence:
            # subscribe_with_recovery does no presence tracking; subscribe_connection
            # is idempotent for topics already joined, so this only adds presence.
            self.server.subscribe_connection(
                conn_id, topics, {"user": self.users.get(conn_id, "?")})
        elif not self.args.recovery:
            self.server.subscribe_connection(conn_id, topics)
        return info

    def handle_subscription(self, conn_id: str, action: str, p: dict[str, Any]) -> None:
        topics = [t for t in p.get("topics") or [] if isinstance(t, str) and t]
        if not topics:
            return
        if action == "unsubscribe":
            self.server.unsubscribe_connection(conn_id, topics)
            self.reply(conn_id, "subscription_update", {
                "action": "unsubscribe", "success": True,
                "success_topics": topics, "failed_topics": []})
            return
        info = self.subscribe(conn_id, topics, bool(p.get("recover")), p.get("recovery") or {})
        payload: dict[str, Any] = {
            "action": "subscribe", "success": True,
            "success_topics": topics, "failed_topics": [],
        }
        if self.args.recovery:
            payload["recoverable"] = True
            payload["recovered"] = any(
                isinstance(v, dict) and v.get("recovered") for v in info.values())
            payload["recovery"] = {
                t: {k: v.get(k) for k in ("epoch", "offset", "recovered", "count")}
                for t, v in info.items() if isinstance(v, dict)}
        self.reply(conn_id, "subscription_update", payload)

    # -- publishing ------------------------------------------------------------
    def handle_publish(self, conn_id: str, p: dict[str, Any]) -> None:
        user = self.users.get(conn_id)
        if user not in self.publishers:
            self.rejected_publishes += 1
            self.reply(conn_id, "publish_error", {"reason": "not a publisher", "user": user})
            return
        topic = p.get("topic")
        if not isinstance(topic, str) or not topic:
            return
        raw = p.get("raw")
        if isinstance(raw, str):
            frame = raw
        else:
            frame = json.dumps({"t": p.get("event") or "publication", "p": p.get("data")},
                               separators=(",", ":"))
        self.fan_out(topic, frame)
        self.published += 1
        if p.get("ack"):
            self.reply(conn_id, "publish_ack", {"topic": topic, "published": self.published})

    def handle_rate_control(self, conn_id: str, p: dict[str, Any]) -> None:
        if self.users.get(conn_id) not in self.publishers:
            self.rejected_publishes += 1
            return
        self.rate.configure(str(p.get("topic") or ""), float(p.get("rate") or 0),
                            int(p.get("bytes") or 0), float(p.get("duration") or 0))

    # -- drain loop ----------------------------------------------------------------
    def drain_loop(self) -> None:
        srv = self.server
        while not self.stop.is_set():
            for kind, conn_id, data in srv.drain_inbound(1024, 50):
                self.events += 1
                try:
                    if kind == "auth_connect":
                        self.users[conn_id] = data
                        if self.auto_topics:
                            self.subscribe(conn_id, self.auto_topics, False, {})
                        if self.args.verbose:
                            log(f"[+] {data} {conn_id}")
                    elif kind == "msg" and isinstance(data, dict):
                        t = data.get("t")
                        p = data.get("p") if isinstance(data.get("p"), dict) else {}
                        if t == "subscription_update":
                            self.handle_subscription(conn_id, str(p.get("action") or "subscribe"), p)
                        elif t in ("subscribe", "unsubscribe"):
                            self.handle_subscription(conn_id, t, p)
                        elif t == "publish":
                            self.handle_publish(conn_id, p)
                        elif t == "rate_control":
                            self.handle_rate_control(conn_id, p)
                        elif self.args.verbose:
                            log(f"[msg] {conn_id} {t}")
                    elif kind == "disconnect":
                        self.users.pop(conn_id, None)
                        if self.args.verbose:
                            log(f"[-] {conn_id}")
                    elif kind in ("presence_join", "presence_leave") and self.args.verbose:
                        log(f"[{kind}] {data}")
                except Exception as exc:  # keep the loop alive on a bad message
                    log(f"[drain] {kind} {conn_id}: {exc!r}")

    def stats_line(self) -> str:
        h = self.server.health_snapshot()
        return json.dumps({
            "t": round(time.time(), 3), "connections": h.get("connections"),
            "rate_sent": self.rate.sent, "published": self.published,
            "rejected_publishes": self.rejected_publishes, "events": self.events,
            "inbound_queue_depth": h.get("inbound_queue_depth"),
            "inbound_dropped": h.get("inbound_dropped"),
            "recovery_topics": h.get("recovery_topic_count"),
            "presence_users": h.get("presence_total_users"),
        })

    def run(self) -> int:
        # RustWSEServer.start() does not raise when the port is taken (the bind
        # error stays inside the Rust runtime), so check before and after.
        if not port_free(self.args.port):
            log(f"port {HOST}:{self.args.port} is already in use")
            return 3
        self.server.start()
        if not wait_listening(self.args.port, 5.0):
            log(f"server did not start listening on {HOST}:{self.args.port}")
            return 3
        if self.args.cluster_port:
            self.server.connect_cluster(peers=csv_list(self.args.peers), cluster_port=self.args.cluster_port)
            log(f"cluster: port {self.args.cluster_port} peers {csv_list(self.args.peers)}")
        threads = [threading.Thread(target=self.drain_loop, name="drain", daemon=True),
                   threading.Thread(target=self.rate.run, name="rate", daemon=True)]
        for th in threads:
            th.start()
        if self.args.pub_topic and self.args.pub_rate > 0:
            self.rate.configure(self.args.pub_topic, self.args.pub_rate,
                                self.args.pub_bytes, self.args.pub_duration)
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        log(f"wse-server peer on {HOST}:{self.args.port} recovery={self.args.recovery} "
            f"presence={self.args.presence} publishers={sorted(self.publishers)} "
            f"auto_topics={self.auto_topics}")
        print(f"READY ws://{HOST}:{self.args.port}/wse", flush=True)
        t0 = time.monotonic()
        next_stats = t0 + self.args.stats_interval if self.args.stats_interval > 0 else None
        while not self.stop.is_set():
            self.stop.wait(0.2)
            now = time.monotonic()
            if self.args.run_seconds and now - t0 >= self.args.run_seconds:
                self.stop.set()
            if next_stats and now >= next_stats:
                log("[stats] " + self.stats_line())
                next_stats = now + self.args.stats_interval
        # stop() needs exclusive access to the PyO3 object: join the threads that
        # are (or may be) inside drain_inbound()/broadcast_local() first, or it
        # raises "RuntimeError: Already borrowed".
        for th in threads:
            th.join(timeout=5)
        log("[stats] " + self.stats_line())
        # Observed with wse-server 2.5.1: once the idle ("zombie") detector has
        # fired on any connection, server.stop() never returns (and the listener
        # stays open). Exit hard if it hangs, so scripts can rely on SIGTERM.
        def watchdog() -> None:
            time.sleep(self.args.stop_timeout)
            log(f"server.stop() still running after {self.args.stop_timeout}s; exiting hard")
            os._exit(4)
        threading.Thread(target=watchdog, name="stop-watchdog", daemon=True).start()
        t_stop = time.monotonic()
        self.server.stop()
        log(f"stopped ({time.monotonic() - t_stop:.2f}s in server.stop())")
        return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", nargs="?", type=int, default=int(env("WSE_PORT", "5007")))
    ap.add_argument("--issuer", default=env("WSE_JWT_ISSUER") or None)
    ap.add_argument("--audience", default=env("WSE_JWT_AUDIENCE") or None)
    ap.add_argument("--max-connections", type=int, default=int(env("WSE_MAX_CONNECTIONS", "15000")))
    ap.add_argument("--inbound-queue", type=int, default=131072)
    ap.add_argument("--rate-limit-capacity", type=float, default=100_000.0,
                    help="per-connection inbound token bucket (upstream default)")
    ap.add_argument("--rate-limit-refill", type=float, default=10_000.0,
                    help="tokens/s; one inbound message costs one token (upstream default)")
    ap.add_argument("--max-outbound-queue-bytes", type=int, default=16 << 20)
    ap.add_argument("--ping-interval", type=int, default=25,
                    help="s between the server's JSON text pings (must be < idle timeout)")
    ap.add_argument("--idle-timeout", type=int, default=60,
                    help="s without an INBOUND text/binary frame before the server closes "
                         "the connection (WS-level pongs do not count)")
    ap.add_argument("--recovery", action="store_true", help="recovery_enabled=True")
    ap.add_argument("--recovery-buffer-size", type=int, default=128)
    ap.add_argument("--presence", action="store_true", help="presence_enabled=True")
    ap.add_argument("--publishers", default=env("WSE_PUBLISHERS", "publisher"),
                    help="comma list of JWT subs allowed to send publish/rate_control")
    ap.add_argument("--auto-topics", default=env("WSE_AUTO_TOPICS", ""),
                    help="comma list of topics every authenticated connection joins")
    ap.add_argument("--pub-topic", default="")
    ap.add_argument("--pub-rate", type=float, default=0.0, help="messages per second")
    ap.add_argument("--pub-bytes", type=int, default=0, help="padding bytes per message")
    ap.add_argument("--pub-duration", type=float, default=0.0, help="seconds, 0 = no limit")
    ap.add_argument("--stats-interval", type=float, default=0.0)
    ap.add_argument("--run-seconds", type=float, default=0.0)
    ap.add_argument("--stop-timeout", type=float, default=10.0,
                    help="s to wait for server.stop() before exiting hard (exit code 4)")
    ap.add_argument("--cluster-port", type=int, default=0,
                    help="join upstream's TCP mesh: listen for peers on this port (127.0.0.1)")
    ap.add_argument("--peers", default="", help="comma-separated host:port of the other nodes' cluster ports")
    ap.add_argument("--mint-token", metavar="SUB", help="print a JWT for SUB and exit")
    ap.add_argument("--verbose", "-v", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    secret = os.environ.get("WSE_JWT_SECRET", DEFAULT_SECRET).encode()
    if len(secret) < 32:
        log("WSE_JWT_SECRET must be at least 32 bytes for HS256")
        return 2
    if args.mint_token:
        print(mint_token(args.mint_token, secret, args.issuer, args.audience))
        return 0
    return Peer(args, secret).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
