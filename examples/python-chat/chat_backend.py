#!/usr/bin/env python3
"""A chat backend for a standalone wse-server, in Python with only `websockets` and `requests`.

Events (what clients did) arrive on the server's event stream, a WebSocket at
`GET /api/v1/events`; the backend acts through the HTTP server API (docs/API.md). The chat
protocol (join / say / who / leave) is in examples/README.md.

    python chat_backend.py --api http://127.0.0.1:5008 --api-key dev-key-0123456789abcdef

Prints `chat backend ready` each time the event stream is (re)connected. Events are handled
one at a time, in the order the stream delivers them, which keeps each client's messages in
sequence (the server sends all of one connection's events to one consumer, in order). A real
backend with slow work would fan out per connection id to keep that order.

Clients choose what they send, so no frame or event may stop the backend: one that cannot be
decoded (not JSON, nested past Python's recursion limit) or whose handling fails is logged and
skipped, and the chat goes on for everyone else (`handle_frame`).
"""

import argparse
import asyncio
import json
import logging
import os
import re
import urllib.parse

import requests
import websockets

ROOM = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DISPLAY_NAME_MAX = 64
HTTP_TIMEOUT_S = 10
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0

log = logging.getLogger("chat")


class ChatError(Exception):
    """A refusal, answered to the client as `chat_error`."""


class Api:
    """The server API over HTTP. Calls are blocking; the backend runs them in a thread."""

    def __init__(self, base, key):
        self.base = base.rstrip("/")
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"

    def call(self, method, path, body=None):
        try:
            r = self.http.request(method, self.base + path, json=body, timeout=HTTP_TIMEOUT_S)
            data = r.json() if r.content else {}
        except requests.RequestException as e:  # unreachable, timed out, not JSON
            raise ChatError(f"server API unavailable: {e}") from e
        if r.status_code >= 400:
            err = data.get("error", {})
            raise ChatError(f"{err.get('code', r.status_code)}: {err.get('message', r.text)}")
        return data


class Chat:
    """Who is called what and sits in which rooms; entries go with their connection."""

    def __init__(self, api):
        self.api = api
        self.members = {}  # connection id -> {"name": str | None, "rooms": set}

    async def call(self, method, path, body=None):
        return await asyncio.to_thread(self.api.call, method, path, body)

    async def handle(self, ev):
        conn = ev.get("connection_id")
        if ev["type"] == "disconnect":
            self.members.pop(conn, None)
            return
        if ev["type"] != "msg" or conn is None:
            return  # connect, presence notices: the clients got their own
        msg = ev["payload"] if isinstance(ev["payload"], dict) else {}
        try:
            reply = await self.on_message(conn, ev.get("user_id") or conn, msg)
        except ChatError as e:
            reply = {"t": "chat_error", "p": {"message": str(e)}}
        if reply is not None:
            try:
                await self.call("POST", f"/api/v1/connections/{conn}/send_event", {"event": reply})
            except ChatError as e:  # the client left meanwhile; its disconnect event cleans up
                log.info("reply to %s not sent: %s", conn, e)

    async def on_message(self, conn, user, msg):
        kind, p = msg.get("t"), msg.get("p") if isinstance(msg.get("p"), dict) else {}
        room = p.get("room")
        if kind not in ("join", "say", "who", "leave"):
            raise ChatError(f"unknown message type {kind!r}")
        if not isinstance(room, str) or not ROOM.match(room):
            raise ChatError("room names are 1 to 64 of A-Z a-z 0-9 _ -")
        topic = f"chat.{room}"
        if kind == "join":
            name = p.get("name")
            name = name[:DISPLAY_NAME_MAX] if isinstance(name, str) and name else None
            body = {"topics": [topic], "presence": {"name": name or user}}
            out = await self.call("POST", f"/api/v1/connections/{conn}/subscribe", body)
            if out["failed_topics"]:
                raise ChatError(f"cannot join {room}: {out['failed_topics'][0]['reason']}")
            member = self.members.setdefault(conn, {"name": None, "rooms": set()})
            member["name"] = name
            member["rooms"].add(room)
            return {"t": "joined", "p": {"room": room}}
        if kind == "say":
            member = self.members.get(conn)
            if member is None or room not in member["rooms"]:
                raise ChatError(f"join {room} first")
            text = p.get("text")
            if not isinstance(text, str):
                raise ChatError("say needs a text")
            data = {"room": room, "from": member["name"] or user, "text": text}
            await self.call("POST", "/api/v1/publish", {"topic": topic, "event": "chat", "data": data})
            return None
        if kind == "who":
            out = await self.call("GET", f"/api/v1/presence/{topic}")
            members = [
                {"user_id": m["user_id"], "name": (m.get("data") or {}).get("name"),
                 "connections": m["connections"]}
                for m in out["members"]
            ]
            return {"t": "who", "p": {"room": room, "members": members}}
        # leave
        await self.call("POST", f"/api/v1/connections/{conn}/unsubscribe", {"topics": [topic]})
        if conn in self.members:
            self.members[conn]["rooms"].discard(room)
        return {"t": "left", "p": {"room": room}}


async def handle_frame(chat, frame):
    """Handles one event-stream frame: a JSON array of events (objects are replies to commands;
    we send none). Never raises: a bad frame or event is logged and skipped."""
    try:
        batch = json.loads(frame)
    except (ValueError, RecursionError) as e:  # not JSON (or not UTF-8), or nested too deep
        log.warning("event stream: undecodable frame of %d bytes skipped (%s)", len(frame),
                    type(e).__name__)
        return
    if not isinstance(batch, list):
        return
    for ev in batch:
        try:
            await chat.handle(ev)
        except Exception as e:  # noqa: BLE001 - one odd event must not stop the chat for all
            # Not the event itself: its repr may be huge, or too deep to print.
            kind = ev.get("type") if isinstance(ev, dict) else None
            kind = kind if isinstance(kind, str) else type(ev).__name__
            log.warning("event %.40r skipped: %s", kind, type(e).__name__)


async def run(api_base, key):
    chat = Chat(Api(api_base, key))
    parts = urllib.parse.urlsplit(api_base)
    scheme = "wss" if parts.scheme == "https" else "ws"
    url = f"{scheme}://{parts.netloc}/api/v1/events?" + urllib.parse.urlencode({"api_key": key})
    backoff = RECONNECT_MIN_S
    while True:
        try:
            # max_size: a frame holds up to 256 KiB of events, but one larger event comes alone,
            # and a client's 1 MiB message of control characters escapes to a 6 MiB `raw` event.
            async with websockets.connect(url, max_size=8 * 2**20) as ws:
                print("chat backend ready", flush=True)
                backoff = RECONNECT_MIN_S
                async for frame in ws:
                    await handle_frame(chat, frame)
        except (OSError, websockets.WebSocketException) as e:
            # What the server had queued for us waits there (bounded) until we are back.
            log.warning("event stream: %s; reconnecting in %.1f s", e, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--api", default="http://127.0.0.1:5008", help="wse-server control listener")
    ap.add_argument("--api-key", default=os.environ.get("WSE_API_KEY"),
                    help="control.api_key (default: $WSE_API_KEY)")
    args = ap.parse_args()
    if not args.api_key:
        ap.error("an API key is required (--api-key or WSE_API_KEY)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(run(args.api, args.api_key))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
