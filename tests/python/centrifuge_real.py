"""The published centrifuge-python client (0.7.0, unmodified) against the real wse-server.

Usage: centrifuge_real.py URL TOKEN json|protobuf CHANNEL

Connects, subscribes to CHANNEL (recoverable), prints `subscribed` with the stream position,
then waits for one publication (the caller publishes it from a WSE client) and prints it; then
publishes a message of its own, waits for it to come back through the subscription and prints
it; then reads the channel's history, presence counts and members, and prints the join and
the leave of a connection the caller opens and closes (after its own join). Then the caller closes the connection with 3011 (force
reconnect) and publishes twice: the client reconnects, resubscribes recovering from its
position, and prints what came back. One JSON line per step on stdout; any failure is a
traceback on stderr and exit status 1.
"""

import asyncio
import json
import sys

from centrifuge import Client, SubscriptionEventHandler

STEP_TIMEOUT = 10.0


def out(**fields):
    print(json.dumps(fields, sort_keys=True), flush=True)


async def main():
    url, token, encoding, channel = sys.argv[1:5]
    protobuf = encoding == "protobuf"
    publications = asyncio.Queue()
    join_leave = asyncio.Queue()

    class Events(SubscriptionEventHandler):
        async def on_publication(self, ctx):
            await publications.put(ctx.pub)

        async def on_join(self, ctx):
            await join_leave.put(("join", ctx.info))

        async def on_leave(self, ctx):
            await join_leave.put(("leave", ctx.info))

    def member(kind, info):
        return {
            "kind": kind,
            "client": info.client,
            "user": info.user,
            "conn_info": data(info.conn_info) if info.conn_info else None,
        }

    def data(raw):
        # Protobuf carries bytes (JSON text here), JSON carries the value itself.
        return json.loads(raw) if protobuf else raw

    client = Client(url, token=token, use_protobuf=protobuf, proxy=None)
    await client.connect()
    await client.ready(timeout=STEP_TIMEOUT)
    out(step="connected")

    subscribed = asyncio.Queue()

    class SubEvents(Events):
        async def on_subscribed(self, ctx):
            await subscribed.put(ctx)

    sub = client.new_subscription(
        channel, events=SubEvents(), recoverable=True, join_leave=True
    )
    await sub.subscribe()
    ctx = await asyncio.wait_for(subscribed.get(), STEP_TIMEOUT)
    position = ctx.stream_position
    out(
        step="subscribed",
        recoverable=ctx.recoverable,
        epoch=position.epoch if position else None,
        offset=position.offset if position else None,
    )
    out(step="own_join", **member(*await asyncio.wait_for(join_leave.get(), STEP_TIMEOUT)))

    pub = await asyncio.wait_for(publications.get(), STEP_TIMEOUT)
    out(step="publication", data=data(pub.data), offset=pub.offset)

    message = {"text": "hello", "from": "python"}
    await sub.publish(json.dumps(message).encode() if protobuf else message)
    pub = await asyncio.wait_for(publications.get(), STEP_TIMEOUT)
    out(step="own_publication", data=data(pub.data), offset=pub.offset)

    history = await sub.history(limit=-1)
    out(
        step="history",
        epoch=history.epoch,
        offset=history.offset,
        publications=[{"offset": p.offset, "data": data(p.data)} for p in history.publications],
    )

    stats = await sub.presence_stats()
    out(step="presence_stats", num_clients=stats.num_clients, num_users=stats.num_users)
    presence = await sub.presence()
    out(
        step="presence",
        clients={
            key: {
                "client": c.client,
                "user": c.user,
                "conn_info": data(c.conn_info) if c.conn_info else None,
            }
            for key, c in presence.clients.items()
        },
    )

    events = [await asyncio.wait_for(join_leave.get(), STEP_TIMEOUT) for _ in range(2)]
    out(step="join_leave", events=[member(*e) for e in events])

    # Closed with 3011 by the caller, who publishes twice meanwhile: the missed publications
    # come back once each, in the resubscribe's reply or (published after it) live.
    ctx = await asyncio.wait_for(subscribed.get(), STEP_TIMEOUT * 2)
    missed = [await asyncio.wait_for(publications.get(), STEP_TIMEOUT) for _ in range(2)]
    out(
        step="recovered",
        was_recovering=ctx.was_recovering,
        recovered=ctx.recovered,
        publications=[{"offset": p.offset, "data": data(p.data)} for p in missed],
    )

    await client.disconnect()
    out(step="done")


asyncio.run(main())
