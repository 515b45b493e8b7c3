"""The same calls on whichever `wse_server` package is installed, one line of output per call:
`label: repr(result)` or `label: !ExceptionType`. test_utilities.py runs it on upstream's
package and on ours and compares the lines.

Argument: a JSON list of artifacts other runs made (ciphertexts, keypairs), which this run must
read; the last output line is `ARTIFACTS <json>` with this run's own.
"""

import json
import sys
import zlib

import wse_server as w

FIXED_KEY = bytes(range(32))
FIXED_PRIV = bytes.fromhex("c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721")
PLAINTEXT = b"wse end-to-end payload \x00\xff"


def out(label, f, *args, **kwargs):
    try:
        r = f(*args, **kwargs)
    except Exception as exc:  # the type is what both must agree on
        print(f"{label}: !{type(exc).__name__}")
        return None
    print(f"{label}: {r!r}")
    return r


def show(label, value):
    print(f"{label}: {value!r}")


def topics_sorted(stats):
    """Upstream keeps topics in a hash map: their order is arbitrary, their content is not."""
    return {**stats, "topics": dict(sorted(stats["topics"].items()))}


# -- names --
# Not provided by ours yet (docs/PYTHON.md says so): left out of the comparison.
NOT_YET: set = set()
show("all", sorted(set(w.__all__) - NOT_YET))
show("version", w.__version__)
show("priority", [(p.name, p.value) for p in w.EventPriority])
show("guarantee", [(g.name, g.value) for g in w.DeliveryGuarantee])
for name in ["RustCompressionManager", "RustTokenBucket", "RustSequencer", "RustEventSequencer", "RustPriorityQueue",
             "RustPriorityMessageQueue", "rust_match_event", "rust_transform_event", "rust_sha256", "rust_compress"]:
    from wse_server import _wse_accel
    show(f"accel.{name}", hasattr(_wse_accel, name))

# -- hashing --
for data in [b"", b"abc", bytes(range(256))]:
    out(f"sha256 {data[:8]!r}", w.rust_sha256, data)
    out(f"hmac {data[:8]!r}", w.rust_hmac_sha256, b"key", data)
out("hmac long key", w.rust_hmac_sha256, b"k" * 200, b"data")
out("sign", w.rust_sign_message, '{"a":1}', b"secret")
out("sign unicode", w.rust_sign_message, '{"é":"✓"}', b"")
out("sha256 str", w.rust_sha256, "abc")
out("sign bytes", w.rust_sign_message, b"{}", b"s")

# -- compression --
text = b"hello world " * 200
for level in [1, 6, 9]:
    out(f"compress {level} roundtrip", lambda lv=level: zlib.decompress(w.rust_compress(text, lv)) == text)
for level in [0, 10, -1]:
    out(f"compress {level}", w.rust_compress, text, level)
out("decompress", w.rust_decompress, zlib.compress(text, 6))
out("decompress empty", w.rust_decompress, b"")
out("decompress junk", w.rust_decompress, b"junk")
out("decompress truncated", w.rust_decompress, zlib.compress(text)[:-6])
out("decompress 10MiB", lambda: len(w.rust_decompress(zlib.compress(bytes(10 << 20)))))
out("decompress 10MiB+1", w.rust_decompress, zlib.compress(bytes((10 << 20) + 1)))
for n, th in [(1024, 1024), (1025, 1024), (0, 0), (1, 0)]:
    out(f"should_compress {n} {th}", w.rust_should_compress, bytes(n), th)

# -- AES-GCM, ECDH --
ct = w.rust_aes_gcm_encrypt(FIXED_KEY, PLAINTEXT)
show("gcm len", len(ct))
out("gcm roundtrip", w.rust_aes_gcm_decrypt, FIXED_KEY, ct)
out("gcm fresh iv", lambda: w.rust_aes_gcm_encrypt(FIXED_KEY, b"x") != w.rust_aes_gcm_encrypt(FIXED_KEY, b"x"))
out("gcm short key", w.rust_aes_gcm_encrypt, bytes(16), b"x")
out("gcm decrypt short key", w.rust_aes_gcm_decrypt, bytes(31), ct)
out("gcm tampered", w.rust_aes_gcm_decrypt, FIXED_KEY, ct[:-1] + bytes([ct[-1] ^ 1]))
out("gcm too short", w.rust_aes_gcm_decrypt, FIXED_KEY, bytes(27))
out("gcm empty body", w.rust_aes_gcm_decrypt, FIXED_KEY, bytes(28))
priv, pub = w.rust_ecdh_generate_keypair()
show("ecdh lens", (len(priv), len(pub), pub[0]))
out("ecdh bad peer", w.rust_ecdh_derive_shared_secret, FIXED_PRIV, b"bad")
out("ecdh bad priv", w.rust_ecdh_derive_shared_secret, b"bad", pub)
out("ecdh zero priv", w.rust_ecdh_derive_shared_secret, bytes(32), pub)
out("ecdh compressed peer", lambda: w.rust_ecdh_derive_shared_secret(FIXED_PRIV, bytes([2 + (pub[64] & 1)]) + pub[1:33])
    == w.rust_ecdh_derive_shared_secret(FIXED_PRIV, pub))
out("ecdh not on curve", w.rust_ecdh_derive_shared_secret, FIXED_PRIV, b"\x04" + bytes(64))
for i, art in enumerate(json.loads(sys.argv[1]) if len(sys.argv) > 1 else []):
    out(f"foreign {i} gcm", w.rust_aes_gcm_decrypt, FIXED_KEY, bytes.fromhex(art["ct"]))
    out(f"foreign {i} ecdh a", lambda: w.rust_ecdh_derive_shared_secret(FIXED_PRIV, bytes.fromhex(art["pub"])).hex())
    out(f"foreign {i} ecdh b", lambda: w.rust_ecdh_derive_shared_secret(bytes.fromhex(art["priv"]), bytes.fromhex(art["fixed_pub"])).hex())

# -- token bucket (no refill: deterministic) --
b = w.RustTokenBucket(10, 0)
for label, f in [("tokens", lambda: b.tokens), ("acquire 5", lambda: b.acquire(5)),
                 ("acquire 5.5", lambda: b.acquire(5.5)), ("acquire 5", lambda: b.acquire(5)),
                 ("tokens", lambda: b.tokens), ("acquire 0", lambda: b.acquire(0)),
                 ("reset", b.reset), ("acquire 11", lambda: b.acquire(11)),
                 ("acquire -1", lambda: b.acquire(-1)), ("tokens", lambda: b.tokens),
                 ("acquire none", lambda: b.acquire())]:
    out(f"bucket {label}", f)
out("bucket initial 3", lambda: w.RustTokenBucket(10, 0, 3).tokens)
out("bucket initial 30", lambda: w.RustTokenBucket(10, 0, 30).tokens)
out("bucket str", w.RustTokenBucket, "10", 0)

# -- sequencers --
s = w.RustSequencer(3)
out("seq next", s.next_seq); out("seq next", s.next_seq); out("seq current", s.get_current_seq)
for e in ["a", "b", "a", "c", "d", "a", "b", "e", "a"]:
    out(f"seq dup {e}", s.is_duplicate, e)
out("seq seen", s.seen_count); s.cleanup(1000.0); out("seq seen after 1000", s.seen_count)
s.cleanup(0.0); out("seq seen after 0", s.seen_count)
out("seq dup int", s.is_duplicate, 1)
out("seq negative", w.RustSequencer, -1)
z = w.RustSequencer(0)
out("seq0", lambda: [z.is_duplicate(x) for x in "aab"] + [z.seen_count()])

es = w.RustEventSequencer(3, 2)
out("es next", es.next_seq); out("es current", es.get_current_sequence)
for e in ["a", "b", "a", "c", "d", "a"]:
    out(f"es dup {e}", es.is_duplicate, e)
for seq in [1, 2, 4, 3, 3, 6, 7, 8, 5, 9, 20, 22]:
    out(f"es t {seq}", es.process_sequenced_event, "t", seq, {"s": seq})
out("es u 5", es.process_sequenced_event, "u", 5, "x")
out("es u 1", es.process_sequenced_event, "u", 1, "y")
out("es u 7", es.process_sequenced_event, "u", 7, "z")
st = es.get_sequence_stats()
show("es stats", topics_sorted(st))
bs = es.get_buffer_stats()
for t in bs["topics"].values():
    t["oldest_buffered_age"] = type(t["oldest_buffered_age"]).__name__
show("es buffer", topics_sorted(bs))
es.cleanup(); show("es after cleanup", topics_sorted(es.get_sequence_stats()))
es.reset_sequence("t"); show("es reset t", topics_sorted(es.get_sequence_stats()))
es.reset_sequence(); show("es reset", es.get_sequence_stats())
out("es defaults", lambda: w.RustEventSequencer().get_sequence_stats())

# -- priority queues --
q = w.RustPriorityQueue(3)
for p, m in [(1, "a"), (5, "b"), (5, "c"), (3, "d")]:
    out(f"pq push {p} {m}", q.push, p, m)
out("pq len", q.len); out("pq full", q.is_full); out("pq pop", q.pop)
out("pq drain", q.drain, 5); out("pq pop empty", q.pop)
for p, m in [(1, "a"), (1, "b"), (2, {"x": 1}), (-5, "n")]:
    q.push(p, m)
out("pq drain 2", q.drain, 2); q.clear(); out("pq len", q.len)
out("pq priority str", q.push, "1", "x")

mq = w.RustPriorityMessageQueue(4, 2)
for m, p in [("a", 5), ("b", 10), ("c", 1), ("d", 5), ("e", 8), ("f", 3), ("g", 7), ("h", 9),
             ("i", 6), ("j", 0), ("k", 100), ("l", -3), ("m", 4)]:
    out(f"mq enqueue {m} {p}", mq.enqueue, m, p)
def stats(q):
    st = q.get_stats()
    st["oldest_message_age"] = type(st["oldest_message_age"]).__name__
    return st
show("mq size", mq.size); show("mq stats", stats(mq))
for _ in range(3):
    out("mq batch", mq.dequeue_batch)
show("mq stats after", stats(mq))
out("mq default", mq.enqueue, {"x": 1}); out("mq batch", mq.dequeue_batch)
mq.clear(); show("mq cleared", stats(mq))
full = w.RustPriorityMessageQueue(2, 10)
out("mq high", lambda: [full.enqueue(i, 10) for i in range(3)] + [full.enqueue("n", 5), full.enqueue("h", 8)])
show("mq high stats", stats(full))
out("mq zero", lambda: stats(w.RustPriorityMessageQueue(0)))

# -- compression manager, MessagePack --
import datetime
import enum
import uuid


class Color(enum.Enum):
    RED = "red"


class Plain:
    def __init__(self):
        self.a = 1
        self.b = [1, 2]


cm = w.RustCompressionManager(100, 6)
out("cm should 100", cm.should_compress, bytes(100)); out("cm should 101", cm.should_compress, bytes(101))
out("cm compress roundtrip", lambda: cm.decompress(cm.compress(text)) == text)
out("cm compress level 1", lambda: zlib.decompress(cm.compress(text, 1)) == text)
out("cm compress small", lambda: len(cm.compress(b"ab")))
out("cm decompress junk", cm.decompress, b"junk")
def cm_stats():
    # Another deflate implementation may save a few bytes more or less: sizes are not compared.
    st = cm.get_stats()
    st["total_bytes_saved"] = st["total_bytes_saved"] > 0
    st["average_bytes_saved"] = st["average_bytes_saved"] > 0
    return st


out("cm stats", cm_stats)
cm.reset_stats(); out("cm reset", cm.get_stats)
VALUES = [
    {}, {"a": 1}, {"n": None, "t": True, "f": False}, {"i": [0, 127, 128, 255, 256, 65535, 65536,
    2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, 2**64, -1, -32, -33, -128, -129, -32768, -32769,
    -2**31, -2**31 - 1, -2**63, -2**63 - 1]}, {"f": [0.0, 1.5, -2.25, 1e300, float("inf")]},
    {"s": ["", "x" * 31, "x" * 32, "x" * 255, "x" * 256, "x" * 70000, "é✓"]},
    {"b": [b"", b"\x00\xff", bytes(300), bytes(70000)]}, {"l": list(range(15)), "m": list(range(16))},
    {str(i): i for i in range(16)}, {1: "int key", None: "none key", (1, 2): "tuple key"},
    {"t": (1, "a"), "u": uuid.UUID(int=12345), "d": datetime.datetime(2026, 1, 2, 3, 4, 5),
     "day": datetime.date(2026, 1, 2), "e": Color.RED, "o": Plain(), "set": {1}},
    {"nested": {"a": {"b": {"c": [1, {"d": None}]}}}},
]
for i, v in enumerate(VALUES):
    packed = out(f"pack {i}", cm.pack_msgpack, v)
    if packed is not None:
        out(f"unpack {i}", cm.unpack_msgpack, packed)
    out(f"pack_event json {i}", cm.pack_event, v, False)
    out(f"pack_event msgpack {i}", cm.pack_event, v)
out("pack list", cm.pack_msgpack, [1])
for label, blob in [("empty", b""), ("truncated", b"\x92\x01"), ("reserved", b"\xc1"),
                    ("trailing", b"\x01\x02"), ("ext", b"\xd4\x01\x07"), ("float32", b"\xca\x3f\xc0\x00\x00"),
                    ("bad utf8", b"\xa2\xff\xfe"), ("list key", b"\x81\x91\x01\x02"),
                    ("json", b'{"a": [1, 2]}'), ("latin1 json", b'{"a": "\xe9"}'), ("junk", b"\xc1junk")]:
    out(f"unpack_msgpack {label}", cm.unpack_msgpack, blob)
    out(f"unpack_event {label}", cm.unpack_event, blob)
    out(f"unpack_event json {label}", cm.unpack_event, blob, False)

# -- event envelope --
import re

UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NOW = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def envelope(label, event, seq, type_map):
    given = dict(event) if isinstance(event, dict) else event
    env = out(label, lambda: normalized(w.rust_transform_event(event, seq, type_map)))
    if isinstance(given, dict) and isinstance(env, dict) and env is not None:
        show(label + " input kept", event == given or sorted(set(event) - set(given)))


def normalized(env):
    env = dict(env)
    if "latency_ms" in env:
        env["latency_ms"] = type(env["latency_ms"]).__name__
    if isinstance(env.get("id"), str) and UUID7.fullmatch(env["id"]):
        env["id"] = "<uuid7>"
    if isinstance(env.get("ts"), str) and NOW.fullmatch(env["ts"]):
        env["ts"] = "<now>"
    return env


META = {"event_id": "e1", "timestamp": "2026-01-02T03:04:05Z", "correlation_id": "c1",
        "priority": 8, "version": 3, "trace_id": "tr"}
PAYLOAD = {"a": 1, "u": uuid.UUID(int=7), "d": datetime.datetime(2026, 1, 2, 3, 4, 5),
           "b": b"x\xff", "t": (1, (2, 3)), "e": Color.RED, "o": Plain(), "s": {1}}
EVENTS = [
    ({"event_type": "OrderPlaced", "payload": PAYLOAD, "_metadata": META}, {}),
    ({"event_type": "OrderPlaced", "payload": PAYLOAD, "_metadata": META}, {"OrderPlaced": "order_placed"}),
    ({"type": "X_Snapshot", "event_id": b"id", "timestamp": "2026-01-02T03:04:05.123",
      "x": {"y": {"z": uuid.UUID(int=1)}, "w": [uuid.UUID(int=2)]}, "_metadata": None}, {}),
    ({"type": "Snapshot_Done", "x": {"y": {"z": {"q": uuid.UUID(int=1)}}}}, {"Snapshot_Done": 5}),
    ({"t": "x", "p": {}, "v": 1, "id": "i", "ts": "s"}, {}),
    ({"t": "x", "p": {}, "v": 1, "id": "i", "ts": "s", "seq": 9}, {}),
    ({}, {}),
    ({"event_type": Color.RED, "c": "custom", "pri": 3, "version": True, "correlation_id": "",
      "trace_id": "", "payload": "not a dict"}, {}),
    ({"event_type": "Error", "timestamp": datetime.datetime(2026, 1, 2, 3, 4, 5), "version": 2.0,
      "_metadata": {"version": 7, "correlation_id": "", "timestamp": None}}, {}),
    ({"event_type": "pong", "timestamp": "2026-01-02 03:04:05+00:00", "payload": {"type": "inner"}}, {}),
    ({"event_type": "ServerReady", "timestamp": "garbage", "event_id": uuid.UUID(int=3),
      "payload": {"event_type": "kept", "type": "t"}}, {"ServerReady": "server_ready"}),
    ({"event_type": "", "_metadata": {"event_id": 5, "priority": 0}}, {}),
]
for i, (event, type_map) in enumerate(EVENTS):
    envelope(f"envelope {i}", event, i, type_map)
out("envelope list", w.rust_transform_event, [], 1, {})
out("envelope seq str", w.rust_transform_event, {}, "1", {})
out("envelope map list", w.rust_transform_event, {}, 1, [])

# -- event filter --
ev = {"event_type": "OrderPlaced", "symbol": "AAPL.X", "quantity": 150, "flag": True,
      "payload": {"price": 101.5, "tags": ["a", "b"], "meta": {"user": "u1"}},
      "note": "hello world", "n": None}
CRITERIA = [
    {}, {"event_type": "OrderPlaced"}, {"event_type": "x"},
    {"event_type": {"$in": ["OrderPlaced", "y"]}}, {"event_type": {"$nin": ["OrderPlaced"]}},
    {"event_type": {"$in": ("OrderPlaced",)}}, {"event_type": {"$nin": "OrderPlaced"}},
    {"missing": {"$nin": ["x"]}}, {"missing": {"$in": ["x"]}},
    {"symbol": {"$regex": "^AAPL"}}, {"symbol": {"$regex": "AAPL"}}, {"symbol": {"$regex": "X$"}},
    {"symbol": {"$regex": "["}}, {"symbol": {"$regex": 5}}, {"quantity": {"$regex": "1[0-9]+"}},
    {"quantity": {"$gte": 150}}, {"quantity": {"$gt": 150}}, {"quantity": {"$lt": 200, "$gt": 100}},
    {"quantity": {"$lte": 150.0}}, {"missing": {"$gt": 1}}, {"missing": {"$ne": 1}},
    {"missing": {"$ne": None}}, {"missing": {"$eq": None}}, {"n": {"$eq": None}},
    {"payload.price": {"$gt": 100}}, {"payload.missing": {"$exists": False}},
    {"payload.price": {"$exists": True}}, {"payload.price": {"$exists": 1}},
    {"payload.meta.user": "u1"}, {"payload.meta.user.x": "u1"}, {"payload.tags.0": "a"},
    {"note": {"$contains": "lo w"}}, {"note": {"$startswith": "hel"}}, {"note": {"$endswith": "xx"}},
    {"flag": {"$contains": "Tru"}}, {"quantity": {"$ne": 150}}, {"quantity": {"$eq": 150}},
    {"$or": [{"quantity": 1}, {"symbol": "AAPL.X"}]}, {"$and": [{"quantity": 150}, {"symbol": "B"}]},
    {"$and": [{"quantity": 150}], "symbol": "nope"}, {"$or": [{"quantity": 1}], "symbol": "AAPL.X"},
    {"quantity": "150"}, {"quantity": 150.0}, {"payload.tags": ["a", "b"]}, {"n": None},
    {"missing": None}, {"quantity": {"$unknown": 1}}, {"symbol": {"$gt": "AAA"}},
    {"payload": {"price": 101.5, "tags": ["a", "b"], "meta": {"user": "u1"}}},
    {"quantity": {"$in": [150.0]}}, {"$or": []}, {"$and": []}, {"quantity": {"$gte": "a"}},
    {"note": {"$regex": "WORLD"}}, {"quantity": True}, {"flag": 1}, {"$or": {"a": 1}},
    {"$not": {"quantity": 1}}, {"start_from_latest": False, "quantity": 0}, {1: "x"},
    {"$and": ["notadict"]}, {"quantity": {"$eq": 150, "$bogus": 1}},
]
for c in CRITERIA:
    out(f"match {c!r}", w.rust_match_event, ev, c)
    out(f"filter {c!r}", w.EventFilter.matches, ev, c)
out("match list event", w.rust_match_event, [], {})

# This run's ciphertext and keypair, for the other package to read ("b" derives the keypair's
# secret with its own public key: deterministic, and both packages must agree on it).
art = {"ct": w.rust_aes_gcm_encrypt(FIXED_KEY, PLAINTEXT).hex(), "priv": priv.hex(),
       "pub": pub.hex(), "fixed_pub": pub.hex()}
print("ARTIFACTS " + json.dumps(art))
