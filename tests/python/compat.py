"""Drives wse-server with the published Python wse-client (2.5.1), its code unmodified.

Usage: compat.py URL TOKEN STAY_SECONDS WATCHDOG_SCALE

The client's heartbeat timing (a ping every 15 s, a reconnect once 40 s pass without a pong or a
server ping) is divided by WATCHDOG_SCALE, so that staying past the watchdog takes seconds; the
code that pings, counts and reconnects is the client's own.

Protocol with the test that runs it (lines on stdout):
  READY <connection_id>   connected and server_ready seen
  SUBSCRIBED              the subscription was acknowledged -> the test publishes "headline"
  GOT headline <json>     received it
  STAYED <seconds>        connected for STAY_SECONDS more  -> the test publishes "late"
  GOT late <json>
  STATS <json>            the client's own statistics (reconnect_count must be 0)
Exit 0 when every step worked; non-zero with a message on stderr otherwise.
"""

import asyncio
import json
import sys
import time

import wse_client.connection
from acks import SubscriptionAcks
from wse_client import AsyncWSEClient

# The published values, read by wse_client.connection's heartbeat loop at each turn.
PUBLISHED_HEARTBEAT = (15.0, 40.0)


def say(*parts):
    print(*parts, flush=True)


async def wait_for_event(client, event_type, timeout):
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {event_type!r} event within {timeout}s")
        event = await client.recv(timeout=left)
        if event.type == event_type:
            return event


def scale_watchdog(scale):
    conn = wse_client.connection
    found = (conn.HEARTBEAT_INTERVAL, conn.IDLE_TIMEOUT)
    if found != PUBLISHED_HEARTBEAT:
        raise RuntimeError(f"heartbeat/idle timeout {found}, expected {PUBLISHED_HEARTBEAT}")
    conn.HEARTBEAT_INTERVAL = found[0] / scale
    conn.IDLE_TIMEOUT = found[1] / scale


async def main(url, token, stay):
    acks = SubscriptionAcks()
    async with AsyncWSEClient(url, token=token) as client:
        if not client.is_ready:
            raise RuntimeError("server_ready not seen")
        conn_id = client.get_stats()["connection_id"]
        say("READY", conn_id)
        if client.recovery_enabled:
            raise RuntimeError("recovery advertised but not enabled")
        if not await client.subscribe(["news"]):
            raise RuntimeError("subscribe send failed")
        await acks.wait("news", 10)
        say("SUBSCRIBED")
        ev = await wait_for_event(client, "headline", 20)
        say("GOT headline", json.dumps(ev.payload))
        # Stay connected past the client's (scaled) liveness watchdog.
        start = time.monotonic()
        while time.monotonic() - start < stay:
            try:
                ev = await client.recv(timeout=1.0)
            except Exception:
                pass
        say("STAYED", round(time.monotonic() - start, 1))
        ev = await wait_for_event(client, "late", 20)
        say("GOT late", json.dumps(ev.payload))
        stats = client.get_stats()
        say("STATS", json.dumps({k: stats[k] for k in ("connection_id", "reconnect_count", "state", "is_ready")}))
        if stats["reconnect_count"] != 0 or stats["connection_id"] != conn_id:
            raise RuntimeError(f"the client reconnected: {stats}")


if __name__ == "__main__":
    try:
        scale_watchdog(float(sys.argv[4]))
        asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
    except Exception as exc:  # report, then fail the test
        print(f"compat.py: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
