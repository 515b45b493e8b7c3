"""The published centrifuge-python client (0.7.0, unmodified) against a Centrifuge endpoint.

Usage: centrifuge_client.py URL TOKEN json|protobuf OTHER_TOKEN

Connects, subscribes to room:main (recoverable, with join/leave), publishes, waits for its own
publication, asks for history, sees another user's connection join and leave the channel, asks
for presence and presence stats; then waits for the server to force a
reconnect (3011) and for the subscription to come back recovered with the publications it
missed. Prints one JSON line per step on stdout; the caller asserts what they hold. Any failure
is a traceback on stderr and exit status 1.
"""

import asyncio
import json
import sys

from centrifuge import Client, ClientEventHandler, SubscriptionEventHandler

STEP_TIMEOUT = 5.0


def out(**fields):
    print(json.dumps(fields, sort_keys=True), flush=True)


async def main():
    url, token, encoding, other_token = sys.argv[1:5]
    protobuf = encoding == "protobuf"
    events = asyncio.Queue()

    class Events(SubscriptionEventHandler):
        async def on_subscribed(self, ctx):
            await events.put(("subscribed", ctx))

        async def on_publication(self, ctx):
            await events.put(("publication", ctx.pub))

        async def on_join(self, ctx):
            await events.put(("join", ctx.info))

        async def on_leave(self, ctx):
            await events.put(("leave", ctx.info))

    connecting = []

    class ClientEvents(ClientEventHandler):
        async def on_connecting(self, ctx):
            connecting.append(ctx.code)

    def data(raw):
        # Protobuf carries bytes (JSON text here), JSON carries the value itself.
        return json.loads(raw) if protobuf else raw

    async def next_event(kind):
        got, value = await asyncio.wait_for(events.get(), STEP_TIMEOUT)
        assert got == kind, (got, kind)
        return value

    client = Client(
        url, token=token, use_protobuf=protobuf, proxy=None, events=ClientEvents()
    )
    await client.connect()
    await client.ready(timeout=STEP_TIMEOUT)
    out(step="connected")

    sub = client.new_subscription(
        "room:main", events=Events(), recoverable=True, join_leave=True
    )
    await sub.subscribe()
    ctx = await next_event("subscribed")
    position = ctx.stream_position
    out(
        step="subscribed",
        recoverable=ctx.recoverable,
        positioned=ctx.positioned,
        epoch=position.epoch if position else None,
        offset=position.offset if position else None,
    )

    message = {"text": "hello", "from": "python"}
    await sub.publish(json.dumps(message).encode() if protobuf else message)
    pub = await next_event("publication")
    out(
        step="publication",
        data=data(pub.data),
        offset=pub.offset,
        user=pub.info.user if pub.info else None,
    )

    history = await sub.history(limit=-1)
    out(
        step="history",
        epoch=history.epoch,
        offset=history.offset,
        publications=[{"offset": p.offset, "data": data(p.data)} for p in history.publications],
    )

    other = Client(url, token=other_token, use_protobuf=protobuf, proxy=None)
    await other.connect()
    other_sub = other.new_subscription("room:main")
    await other_sub.subscribe()
    await other_sub.ready(timeout=STEP_TIMEOUT)
    joined = await next_event("join")
    await other.disconnect()
    left = await next_event("leave")
    out(
        step="join_leave",
        join={"user": joined.user, "conn_info": data(joined.conn_info)},
        leave={"user": left.user, "same_client": left.client == joined.client},
    )

    presence = await sub.presence()
    out(step="presence", users=sorted(c.user for c in presence.clients.values()))
    stats = await sub.presence_stats()
    out(step="presence_stats", num_clients=stats.num_clients, num_users=stats.num_users)

    # The server now closes with 3011 and publishes twice while we are away.
    got = [await asyncio.wait_for(events.get(), STEP_TIMEOUT * 2) for _ in range(3)]
    resubscribed = [v for k, v in got if k == "subscribed"]
    missed = [v for k, v in got if k == "publication"]
    assert len(resubscribed) == 1 and len(missed) == 2, got
    ctx = resubscribed[0]
    out(
        step="recovered",
        was_recovering=ctx.was_recovering,
        recovered=ctx.recovered,
        connecting=connecting,
        publications=[{"offset": p.offset, "data": data(p.data)} for p in missed],
    )

    await client.disconnect()
    out(step="done")


asyncio.run(main())
