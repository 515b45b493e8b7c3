"""One subscriber of a cluster node, with the published Python wse-client (2.5.1), unmodified.

Usage: cluster_subscriber.py URL TOKEN TOPIC COUNT

Protocol with the test that runs it (lines on stdout):
  SUBSCRIBED              the server acknowledged TOPIC -> the test publishes on other nodes
  GOT <event> <json>      one per publication received, COUNT of them
Exit 0 when every step worked; non-zero with a message on stderr otherwise.
"""

import asyncio
import json
import sys
import time

from acks import SubscriptionAcks
from wse_client import AsyncWSEClient

# Bound on each wait (a broken build must not hang the test).
WAIT_SECONDS = 20


def say(*parts):
    print(*parts, flush=True)


async def main(url, token, topic, count):
    acks = SubscriptionAcks()
    async with AsyncWSEClient(url, token=token) as client:
        if not client.is_ready:
            raise RuntimeError("server_ready not seen")
        if not await client.subscribe([topic]):
            raise RuntimeError("subscribe send failed")
        await acks.wait(topic, WAIT_SECONDS)
        say("SUBSCRIBED")
        deadline = time.monotonic() + WAIT_SECONDS
        got = 0
        while got < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{got} of {count} publications within {WAIT_SECONDS}s")
            event = await client.recv(timeout=left)
            if event.type.startswith("from-"):
                say("GOT", event.type, json.dumps(event.payload))
                got += 1


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    except Exception as exc:  # report, then fail the test
        print(f"cluster_subscriber.py: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
