"""What a real client (`websockets`) receives from `RustWSEServer` for broadcasts of any text,
send_event and disconnect, one line per observation, for whichever `wse_server` is installed
(upstream's 2.5.1 or ours): test_wire_compat.py runs it under both and compares the lines.

Values that are not the same from run to run are normalised: the recovery epoch (`"e"`), offsets
relative to the first publication's (upstream numbers a topic from 0, ours from 1), event
timestamps, generated ids and `seq` (upstream's counts send_event calls server-wide, ours every
message to the connection). Each step reads the number of frames it expects (no step waits on
a timer); one more would show before the close. Run: python wire_scenario.py"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import zlib

import websockets

os.environ.setdefault("WSE_CORES", "2")

from wse_server import RustWSEServer  # noqa: E402

# What subscribers of "feed" get broadcast, in order: objects with and without `t`/`c`, and text
# that is not a JSON object (upstream sends that as it is).
BROADCASTS = [
    '{"t":"first","p":{"a":1}}',
    "plain text",
    '{"x":1,"t":"a"}',
    "[1,2]",
    '"a string"',
    "",
    '{"p":1}',
    '{"c":"Z","t":"b"}',
    "{}",
    '  {"t":"spaced"}  ',
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_connect(srv: RustWSEServer) -> str:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        for ev in srv.drain_inbound(64, 100):
            if ev[0] in ("connect", "auth_connect"):
                return ev[1]
    raise SystemExit("no connect event")


class Reader:
    """Reads a client's frames and shows them normalised."""

    def __init__(self, ws) -> None:
        self.ws, self.base = ws, None

    async def frames(self, count: int) -> list:
        """The next `count` frames (ours greets each connection with server_ready first,
        upstream's drain mode does not: skipped)."""
        frames = []
        while len(frames) < count:
            frame = await asyncio.wait_for(self.ws.recv(), 10)
            if not (isinstance(frame, str) and '"server_ready"' in frame):
                frames.append(frame)
        return frames

    def show(self, frame) -> str:
        kind = "binary" if isinstance(frame, bytes) else "text"
        body = frame
        if isinstance(frame, bytes) and frame.startswith(b"C:"):
            kind, body = "binary C:", zlib.decompress(frame[2:])
        if isinstance(body, bytes):
            body = body.decode()
        try:
            msg = json.loads(body)
        except ValueError:
            return f"{kind} {body!r}"
        if isinstance(msg, dict):
            if "e" in msg:
                msg["e"] = "EPOCH"
            if "o" in msg:
                if self.base is None:
                    self.base = msg["o"]
                msg["o"] = f"first+{msg['o'] - self.base}"
            for key in ("ts", "seq"):
                if key in msg:
                    msg[key] = key.upper()
            if isinstance(msg.get("p"), dict) and "pad" in msg["p"]:
                msg["p"]["pad"] = f"{len(msg['p']['pad'])} characters"
            if isinstance(msg.get("id"), str) and len(msg["id"]) == 36:
                msg["id"] = "UUID"
            # Keys in order: stamps first, then the message's own (upstream keeps the given
            # order in broadcasts); send_event envelopes are compared sorted (see PYTHON.md).
            body = json.dumps(msg, separators=(",", ":"), sort_keys=kind != "text")
        return f"{kind} {body}"


async def main() -> None:
    port = free_port()
    srv = RustWSEServer("127.0.0.1", port, recovery_enabled=True)
    srv.enable_drain_mode()
    srv.start()
    url = f"ws://127.0.0.1:{port}/wse"
    async with websockets.connect(url) as ws:
        conn = wait_connect(srv)
        r = Reader(ws)
        srv.subscribe_with_recovery(conn, ["feed"])
        first = None
        for data in BROADCASTS:
            srv.broadcast("feed", data)
        srv.broadcast_local("feed", "local plain")
        for frame in await r.frames(len(BROADCASTS) + 1):
            if first is None:
                first = json.loads(frame)
            print("broadcast ->", r.show(frame))

        # A second client recovers from the first publication: the rest is replayed, plain
        # text included.
        async with websockets.connect(url) as ws2:
            conn2 = wait_connect(srv)
            r2 = Reader(ws2)
            r2.base = r.base
            out = srv.subscribe_with_recovery(conn2, ["feed"], recover=True, epoch=first["e"],
                                              offset=first["o"])
            t = out["topics"]["feed"]
            print("recovered", out["recovered"], t["recovered"], t["count"])
            for frame in await r2.frames(t["count"]):
                print("replay ->", r2.show(frame))

        # send_event: the envelope, the frame type, a duplicate id, compression.
        n = srv.send_event(conn, {"t": "ev", "p": {"a": 1}, "id": "x1"})
        print("send_event returned bytes:", n > 0)
        print("send_event again returned", srv.send_event(conn, {"t": "ev", "id": "x1"}))
        srv.send_event(conn, {"t": "big", "p": {"pad": "y" * 3000}})
        for frame in await r.frames(2):
            print("send_event ->", r.show(frame))

        # disconnect: the close frame the client gets.
        srv.disconnect(conn)
        try:
            while True:
                print("unexpected frame ->", r.show(await asyncio.wait_for(ws.recv(), 10)))
        except websockets.ConnectionClosed as e:
            rcvd = e.rcvd
            print("disconnect -> close", None if rcvd is None else (rcvd.code, rcvd.reason))
    srv.stop()


if __name__ == "__main__":
    asyncio.run(main())
