"""The published centrifuge-python client (0.7.0, unmodified) as a plain subscriber.

Usage: centrifuge_subscriber.py URL TOKEN CHANNEL

Connects, subscribes to CHANNEL and prints one JSON line per event on stdout:
{"step": "subscribed"}, {"step": "publication", "data": ..} for each publication, and
{"step": "disconnected", "code": n, "reason": ".."} when the server closes the connection for
good, after which it exits. Also exits when stdin closes (the caller is done with it). Any
failure is a traceback on stderr and exit status 1.
"""

import asyncio
import json
import sys

from centrifuge import Client, ClientEventHandler, SubscriptionEventHandler


def out(**fields):
    print(json.dumps(fields, sort_keys=True), flush=True)


async def main():
    url, token, channel = sys.argv[1:4]
    done = asyncio.Event()

    class ClientEvents(ClientEventHandler):
        async def on_disconnected(self, ctx):
            out(step="disconnected", code=ctx.code, reason=ctx.reason)
            done.set()

    class Events(SubscriptionEventHandler):
        async def on_subscribed(self, ctx):
            out(step="subscribed")

        async def on_publication(self, ctx):
            out(step="publication", data=ctx.pub.data)

    client = Client(url, token=token, proxy=None, events=ClientEvents())
    sub = client.new_subscription(channel, events=Events())
    await client.connect()
    await sub.subscribe()
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    await asyncio.wait(
        [asyncio.ensure_future(done.wait()), stdin_closed], return_when=asyncio.FIRST_COMPLETED
    )
    await client.disconnect()


asyncio.run(main())
