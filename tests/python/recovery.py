"""Message recovery with the published Python wse-client (2.5.1), unmodified.

Usage: recovery.py URL TOKEN

The test drives it through stdin (one command per line) and reads its stdout:
  -> READY                      connected, subscribed to "feed", recovery advertised
  <- wait N                     wait until N "tick" events have arrived; -> GOT N
  <- drop                       force a reconnect (the client re-subscribes with its positions);
                                -> DROPPED
  <- wait_epoch_change          wait until the client re-baselined on a new epoch (after a server
                                restart); -> REBASELINED <epoch>
  <- check N                    -> OK when the ticks are exactly seq 0..N-1, in order, once each;
                                else exits 1
Every tick carries {"seq": n}.
"""

import asyncio
import json
import sys
import time

from acks import SubscriptionAcks
from wse_client import AsyncWSEClient


def say(*parts):
    print(*parts, flush=True)


async def main(url, token):
    acks = SubscriptionAcks()
    seqs = []
    async with AsyncWSEClient(url, token=token) as client:
        if not client.recovery_enabled:
            raise RuntimeError("server_ready did not advertise recovery")
        await client.subscribe(["feed"])
        await acks.wait("feed", 10)

        async def consume():
            async for event in client:
                if event.type == "tick":
                    seqs.append(event.payload["seq"])

        consumer = asyncio.create_task(consume())
        say("READY")
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = (await reader.readline()).decode().strip()
            if not line:
                break
            cmd, *args = line.split()
            if cmd == "wait":
                n = int(args[0])
                deadline = time.monotonic() + 60
                while len(seqs) < n:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"only {len(seqs)} of {n} ticks: {seqs[-5:]}")
                    await asyncio.sleep(0.02)
                say("GOT", len(seqs))
            elif cmd == "drop":
                await client.force_reconnect()
                say("DROPPED")
            elif cmd == "wait_epoch_change":
                before = client.recovery_state.get("feed", ("", 0))[0]
                deadline = time.monotonic() + 60
                while client.recovery_state.get("feed", (before, 0))[0] == before:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"still on epoch {before}: {client.recovery_state}")
                    await asyncio.sleep(0.05)
                say("REBASELINED", client.recovery_state["feed"][0])
            elif cmd == "check":
                n = int(args[0])
                if seqs != list(range(n)):
                    raise RuntimeError(f"ticks not exactly 0..{n - 1} in order: {seqs}")
                say("OK", json.dumps(client.get_stats()["reconnect_count"]))
                break
        consumer.cancel()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
    except Exception as exc:
        print(f"recovery.py: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
