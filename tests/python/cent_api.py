"""cent 5.2.0 (unmodified), Centrifugo's Python HTTP API client, driven line by line.

Usage: cent_api.py API_URL API_KEY

Reads one JSON command per stdin line and prints one JSON line per command:
- {"call": "<method>", "args": {..}, "key": ".."}: `Client(API_URL, key).<method>(<Method>Request(**args))`
  (`key` defaults to API_KEY)
  ({"batch": [{"call":..,"args":..},..]} builds a BatchRequest of them); prints
  {"result": <the result model, dumped>} or {"error": {"type": <exception class>, "code", "message",
  "status_code"}} for what cent raised.
- {"raw": {"path": "/api/..", "body": "<text>", "headers": {..}}}: a plain POST with `requests`
  (for what cent cannot send: bad JSON, unknown methods, other keys); prints
  {"status": n, "body": "<text>"}.
Exits at the end of stdin.
"""

import json
import sys

import cent
import requests

TIMEOUT = 10.0


def request_of(call, args):
    name = "".join(part.capitalize() for part in call.split("_")) + "Request"
    return getattr(cent, name)(**args)


def run(command):
    client = cent.Client(API_URL, command.get("key", API_KEY), timeout=TIMEOUT)
    # The server is on loopback: no proxy from the environment.
    client._session._session.trust_env = False
    if "raw" in command:
        raw = command["raw"]
        session = requests.Session()
        session.trust_env = False
        r = session.post(
            API_URL.rsplit("/api", 1)[0] + raw["path"],
            data=raw.get("body", "").encode(),
            headers=raw.get("headers", {}),
            timeout=TIMEOUT,
        )
        return {"status": r.status_code, "body": r.text}
    try:
        if command["call"] == "batch":
            requests_ = [request_of(c["call"], c["args"]) for c in command["args"]["commands"]]
            result = client.batch(cent.BatchRequest(requests=requests_))
            # Dumped one by one: BatchResult declares its replies as the base result type.
            return {"result": {"replies": [r.model_dump() for r in result.replies]}}
        else:
            result = getattr(client, command["call"])(request_of(command["call"], command["args"]))
        return {"result": result.model_dump()}
    except cent.exceptions.CentError as e:
        return {
            "error": {
                "type": type(e).__name__,
                "code": getattr(e, "code", None),
                "message": getattr(e, "message", None),
                "status_code": getattr(e, "status_code", None),
            }
        }


API_URL, API_KEY = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    if line.strip():
        print(json.dumps(run(json.loads(line)), sort_keys=True), flush=True)
