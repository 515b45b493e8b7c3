"""token-bowl-chat 4.0.2 (unmodified): two users against a stand-in Token Bowl backend.

Usage: token_bowl_client.py BASE_URL

alice and bob connect (the backend hands out Centrifuge connection tokens whose `channels`
claim subscribes them server-side to room:main and user:<name>); alice sends a room message and
a direct message to bob through the backend's REST route, then bob sends an "end" room message
as a barrier: once both have it, everything sent before it has arrived. Prints what each user's
on_message saw, and the errors on_error saw, as one JSON line.
"""

import asyncio
import json
import sys

from token_bowl_chat import TokenBowlWebSocket

WAIT = 10.0


async def main():
    base = sys.argv[1]
    got = {"alice": [], "bob": []}
    errors = []
    ended = {name: asyncio.Event() for name in got}

    def on_message(name):
        def handle(m):
            got[name].append(
                {"id": m.id, "content": m.content, "type": m.message_type, "from": m.from_username}
            )
            if m.content == "end":
                ended[name].set()

        return handle

    clients = {
        name: TokenBowlWebSocket(
            api_key=f"key-{name}",
            base_url=base,
            on_message=on_message(name),
            on_error=lambda e: errors.append(str(e)),
        )
        for name in got
    }
    for c in clients.values():
        await c.connect()
    for c in clients.values():
        await c.wait_until_connected(timeout=WAIT)
    await clients["alice"].send_message("hello room")
    await clients["alice"].send_message("psst bob", to_username="bob")
    await clients["bob"].send_message("end")
    for e in ended.values():
        await asyncio.wait_for(e.wait(), WAIT)
    for c in clients.values():
        await c.disconnect()
    print(json.dumps({"got": got, "errors": errors}, sort_keys=True), flush=True)


asyncio.run(main())
