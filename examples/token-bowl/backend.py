"""A stand-in for the Token Bowl chat backend, unchanged from what it would run against
Centrifugo, pointed at wse-server instead (docs/CENTRIFUGO.md).

It serves the two routes the published token-bowl-chat client uses for real-time chat:

- GET /centrifugo/connection-token (header X-API-Key: key-<user>): a connection JWT whose
  `channels` claim subscribes the connection, server side, to `room:main` and `user:<user>`;
- POST /messages ({"content", "to_username"?}): stores nothing, numbers the message and
  publishes it with `cent` through Centrifugo's HTTP API, which wse-server serves on its control
  listener: to `room:main`, or a direct message to `user:<to_username>` only.

Usage:
  python backend.py --listen 127.0.0.1:8000 --ws-url ws://127.0.0.1:5007/connection/websocket \\
      --api-url http://127.0.0.1:5008/api --api-key "$KEY" --secret "$SECRET"
It prints "listening on http://HOST:PORT" once it accepts requests.
"""

import argparse
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cent
import jwt

# Connection tokens last this long, seconds (the client asks for a new one when it reconnects).
TOKEN_TTL_S = 3600
# Longest request body accepted, bytes: a chat message, not a file.
MAX_BODY_BYTES = 64 * 1024
# Longest wait for wse-server's API, seconds.
API_TIMEOUT_S = 10.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:8000")
    p.add_argument("--ws-url", required=True)
    p.add_argument("--api-url", required=True, help="wse-server's Centrifugo-compatible API, ending in /api")
    p.add_argument("--api-key", required=True)
    p.add_argument("--secret", required=True, help="the HS256 secret wse-server checks tokens with")
    args = p.parse_args()

    api = cent.Client(args.api_url, args.api_key, timeout=API_TIMEOUT_S)
    # One client shared by the handler threads; its HTTP session is not thread-safe.
    api_lock = threading.Lock()
    ids = itertools.count()

    class Handler(BaseHTTPRequestHandler):
        def user(self):
            key = self.headers.get("X-API-Key", "")
            return key.removeprefix("key-") if key.startswith("key-") else None

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            user = self.user()
            if self.path != "/centrifugo/connection-token":
                return self.answer(404, {"detail": "not found"})
            if not user:
                return self.answer(401, {"detail": "missing or bad X-API-Key"})
            dm = f"user:{user}"
            now = int(time.time())
            claims = {"sub": user, "iat": now, "exp": now + TOKEN_TTL_S, "channels": ["room:main", dm]}
            token = jwt.encode(claims, args.secret, algorithm="HS256")
            self.answer(200, {"token": token, "url": args.ws_url, "channels": [dm, "room:main"], "user": user})

        def do_POST(self):
            user = self.user()
            if self.path != "/messages":
                return self.answer(404, {"detail": "not found"})
            if not user:
                return self.answer(401, {"detail": "missing or bad X-API-Key"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self.answer(413, {"detail": "message too large"})
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                content = body["content"]
            except (ValueError, KeyError, TypeError):
                return self.answer(422, {"detail": "expected {\"content\": ..., \"to_username\"?: ...}"})
            to = body.get("to_username")
            message = {
                "id": f"m{next(ids)}",
                "from_user_id": "",
                "from_username": user,
                "to_username": to,
                "content": content,
                "message_type": "direct" if to else "room",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            channel = f"user:{to}" if to else "room:main"
            try:
                with api_lock:
                    api.publish(cent.PublishRequest(channel=channel, data=message))
            except cent.CentError as e:
                return self.answer(502, {"detail": f"publishing failed: {e}"})
            self.answer(201, message)

        def log_message(self, *_):
            pass

    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    print(f"listening on http://{host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
