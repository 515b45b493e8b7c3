"""The Python example backend's frame handling, without a server: no frame or event a client can
cause stops it (issue 10: a 10 KB message of 5 000 nested arrays ended it with RecursionError).

    python chat_frames.py <path to examples/python-chat>

Feeds `handle_frame` hostile frames, then a valid `join`, with a stub server API; prints `OK`
when the join after them is still handled.
"""

import asyncio
import json
import logging
import sys

sys.path.insert(0, sys.argv[1])
import chat_backend  # noqa: E402


class StubApi:
    """Records calls; the `boom` room makes the API fail the way a bug would."""

    def __init__(self):
        self.calls = []

    def call(self, method, path, body=None):
        self.calls.append((method, path, body))
        if body and "chat.boom" in json.dumps(body):
            raise RuntimeError("a bug in the handler")
        if path.endswith("/subscribe"):
            return {"success_topics": body["topics"], "failed_topics": []}
        return {}


def msg(payload, conn="c1"):
    return {"type": "msg", "connection_id": conn, "user_id": "eve", "payload": payload}


async def main():
    api = StubApi()
    chat = chat_backend.Chat(api)
    deep = "[" * 5000 + "]" * 5000
    hostile = [
        deep,                                             # the frame: RecursionError
        "[" + json.dumps(msg({"t": "say"}))[:-1] + ',"x":' + deep + "}]",  # deep inside an event
        "not json",
        b"\xff\xfe binary",
        "{}",                                             # a reply-shaped object
        "[1, null, \"x\", []]",                           # events that are not objects
        json.dumps([{"no": "type"}, {"type": "msg"}, {"type": "disconnect"}]),
        json.dumps([msg("a string"), msg({"t": ["join"]}), msg({"t": "join", "p": []})]),
        json.dumps([msg({"t": "join", "p": {"room": {"x": 1}}}), msg({"t": "join", "p": {"room": "boom"}})]),
    ]
    for frame in hostile:
        await chat_backend.handle_frame(chat, frame)
    await chat_backend.handle_frame(chat, json.dumps([msg({"t": "join", "p": {"room": "lobby", "name": "Eve"}})]))
    subscribed = [c for c in api.calls if c[1] == "/api/v1/connections/c1/subscribe"]
    assert subscribed[-1][2]["topics"] == ["chat.lobby"], api.calls
    replies = [c[2]["event"] for c in api.calls if c[1].endswith("/send_event")]
    assert replies[-1] == {"t": "joined", "p": {"room": "lobby"}}, replies
    assert chat.members["c1"]["rooms"] == {"lobby"}, chat.members
    print("OK", flush=True)


logging.basicConfig(level=logging.WARNING)
asyncio.run(main())
