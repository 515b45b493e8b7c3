"""The published centrifuge-python client (0.7.0, unmodified) calling `rpc` on the real
wse-server, whose answers come from the caller's stand-in backend (it reads the event stream's
`rpc` events and replies through the server API).

Usage: centrifuge_rpc.py URL TOKEN json|protobuf

Calls `sum` with {"a": 1, "b": 2} and prints the result's data; then calls `fail` and prints
the reply error. One JSON line per step on stdout; any failure is a traceback on stderr and exit
status 1.
"""

import asyncio
import json
import sys

from centrifuge import Client, ReplyError

STEP_TIMEOUT = 10.0


def out(**fields):
    print(json.dumps(fields, sort_keys=True), flush=True)


async def main():
    url, token, encoding = sys.argv[1:4]
    protobuf = encoding == "protobuf"

    def encode(value):
        # Protobuf carries bytes (JSON text here), JSON carries the value itself.
        return json.dumps(value).encode() if protobuf else value

    def decode(raw):
        return json.loads(raw) if protobuf else raw

    client = Client(url, token=token, use_protobuf=protobuf, proxy=None)
    await client.connect()
    await client.ready(timeout=STEP_TIMEOUT)
    result = await client.rpc("sum", encode({"a": 1, "b": 2}), timeout=STEP_TIMEOUT)
    out(step="result", data=decode(result.data))
    try:
        await client.rpc("fail", encode({}), timeout=STEP_TIMEOUT)
        out(step="error", code=None)
    except ReplyError as e:
        out(step="error", code=e.code, message=e.message)
    await client.disconnect()


asyncio.run(main())
