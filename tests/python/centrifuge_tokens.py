"""The published centrifuge-python client (0.7.0, unmodified): what the server does with its tokens.

Usage: centrifuge_tokens.py URL BAD_TOKEN SHORT_TOKEN FRESH_TOKEN json|protobuf CHANNEL

1. With BAD_TOKEN (a wrong signature) the client is disconnected with 3500 and stays
   disconnected: the code is terminal, so it goes to `disconnected`, never `connecting`.
2. Two clients connect with SHORT_TOKEN (expiring in a few seconds). The first gets
   FRESH_TOKEN from its `get_token` when the server's `ttl` runs out and refreshes; the second's
   `get_token` never answers, so it cannot. The server (run with a short
   `centrifuge.expired_close_delay`) closes the second with 3005 — which proves the deadline is
   enforced — while the first, refreshed, is still connected under the same client id and gets
   its own publication after that.
One JSON line per step on stdout; any failure is a traceback on stderr and exit status 1.
"""

import asyncio
import json
import sys

from centrifuge import Client, ClientEventHandler, SubscriptionEventHandler

STEP_TIMEOUT = 15.0


def out(**fields):
    print(json.dumps(fields, sort_keys=True), flush=True)


class States(ClientEventHandler):
    """Queues every connection state change with its code."""

    def __init__(self):
        self.changes = asyncio.Queue()

    async def on_connecting(self, ctx):
        await self.changes.put(("connecting", ctx.code))

    async def on_connected(self, ctx):
        await self.changes.put(("connected", ctx.client))

    async def on_disconnected(self, ctx):
        await self.changes.put(("disconnected", ctx.code))

    async def next(self):
        return await asyncio.wait_for(self.changes.get(), STEP_TIMEOUT)


async def main():
    url, bad, short, fresh, encoding, channel = sys.argv[1:7]
    protobuf = encoding == "protobuf"

    # 1. An invalid token: 3500, terminal.
    states = States()
    client = Client(url, token=bad, use_protobuf=protobuf, events=states)
    await client.connect()
    changes = [await states.next()]
    while changes[-1][0] == "connecting":
        changes.append(await states.next())
    out(step="bad_token", changes=changes)
    await client.disconnect()

    # 2. Refreshed and not refreshed.
    asked = asyncio.Event()

    async def fresh_token():
        asked.set()
        return fresh

    async def no_token():
        await asyncio.Event().wait()

    refreshing_states, stuck_states = States(), States()
    refreshing = Client(url, token=short, get_token=fresh_token, use_protobuf=protobuf,
                        events=refreshing_states)
    stuck = Client(url, token=short, get_token=no_token, use_protobuf=protobuf,
                   events=stuck_states)
    publications = asyncio.Queue()

    class Events(SubscriptionEventHandler):
        async def on_publication(self, ctx):
            await publications.put(ctx.pub.data)

    for c, s in ((refreshing, refreshing_states), (stuck, stuck_states)):
        await c.connect()
        assert (await s.next())[0] == "connecting"
        kind, _client_id = await s.next()
        assert kind == "connected", kind
    sub = refreshing.new_subscription(channel, events=Events())
    await sub.subscribe()
    await sub.ready(timeout=STEP_TIMEOUT)

    await asyncio.wait_for(asked.wait(), STEP_TIMEOUT)
    out(step="get_token_called")
    # The one that could not refresh is closed once the token is past its expiry and the delay.
    kind, code = await stuck_states.next()
    out(step="stuck", kind=kind, code=code)
    await stuck.disconnect()

    # By now the original token has expired and the delay has passed (the other client's close
    # says so): the refreshed client is still on its first connection (no state change since).
    message = {"text": "after expiry"}
    await sub.publish(json.dumps(message).encode() if protobuf else message)
    got = await asyncio.wait_for(publications.get(), STEP_TIMEOUT)
    out(step="refreshed", publication=json.loads(got) if protobuf else got,
        state_changes=refreshing_states.changes.qsize())
    await refreshing.disconnect()
    out(step="done")


asyncio.run(main())
