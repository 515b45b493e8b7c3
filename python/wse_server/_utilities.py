"""Upstream's application-side utilities that need no native code, in Python.

Upstream 2.5.1 compiles these into ``wse_server._wse_accel``; ``wse_server/__init__.py`` attaches
them there too, so both import paths work. Their behaviour (results, defaults, bounds, exception
types) is upstream's, checked against upstream's own package on the same inputs by
``python/tests/test_utilities.py``. None of them takes part in the server's work: the engine
has its own rate limits, queues and sequencing.
"""

from __future__ import annotations

import heapq
import json
import operator
import re
import struct
import time
from collections import OrderedDict, deque
from typing import Any

from wse_server import _wse_accel as _accel

__all__ = [
    "RustCompressionManager",
    "RustTokenBucket",
    "RustSequencer",
    "RustEventSequencer",
    "RustPriorityQueue",
    "RustPriorityMessageQueue",
    "rust_match_event",
    "rust_transform_event",
]

_MODULE = "wse_server._wse_accel"


def _count(name: str, value: Any) -> int:
    """A non-negative int, refused as upstream's native argument parsing refuses it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"argument '{name}': '{type(value).__name__}' object cannot be "
                        "interpreted as an integer")
    if value < 0:
        raise OverflowError(f"argument '{name}': can't convert negative int to unsigned")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"argument '{name}': must be real number, not {type(value).__name__}")


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"argument '{name}': '{type(value).__name__}' object cannot be "
                        "converted to 'PyString'")
    return value


# -- token bucket ---------------------------------------------------------------------------


class RustTokenBucket:
    """Token bucket rate limiter: `refill_rate` tokens per second up to `capacity`."""

    __module__ = _MODULE

    def __init__(self, capacity: float, refill_rate: float,
                 initial_tokens: float | None = None) -> None:
        self._capacity = _float("capacity", capacity)
        self._rate = _float("refill_rate", refill_rate)
        self._tokens = (self._capacity if initial_tokens is None
                        else _float("initial_tokens", initial_tokens))
        self._last = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self._tokens + elapsed * self._rate, self._capacity)
            self._last = now

    def acquire(self, tokens: float) -> bool:
        """Try to acquire tokens. Returns True if successful (and takes them)."""
        tokens = _float("tokens", tokens)
        self._refill()
        if self._tokens >= tokens:
            self._tokens -= tokens
            return True
        return False

    @property
    def tokens(self) -> float:
        """Current token count after refill."""
        self._refill()
        return self._tokens

    def reset(self) -> None:
        """Reset bucket to full capacity."""
        self._tokens = self._capacity
        self._last = time.monotonic()


# -- sequencers -----------------------------------------------------------------------------


class _SeenWindow:
    """The last `size` event ids (oldest evicted first), with when each was recorded."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ids: OrderedDict[str, float] = OrderedDict()

    def seen(self, event_id: str) -> bool:
        """Whether `event_id` is in the window; records it when it is not."""
        if event_id in self.ids:
            return True
        if len(self.ids) >= self.size and self.ids:
            self.ids.popitem(last=False)
        self.ids[event_id] = time.monotonic()
        return False


class RustSequencer:
    """Monotonic sequence counter with duplicate detection over the last `window_size` ids."""

    __module__ = _MODULE

    def __init__(self, window_size: int) -> None:
        self._seq = 0
        self._window = _SeenWindow(_count("window_size", window_size))

    def next_seq(self) -> int:
        """Increment and return the next sequence number."""
        self._seq += 1
        return self._seq

    def get_current_seq(self) -> int:
        """Get current sequence number without incrementing."""
        return self._seq

    def is_duplicate(self, event_id: str) -> bool:
        """Check if event ID has been seen (and remember it if not)."""
        return self._window.seen(_str("event_id", event_id))

    def cleanup(self, max_age_secs: float) -> None:
        """Remove entries older than max_age_secs."""
        max_age = _float("max_age_secs", max_age_secs)
        now = time.monotonic()
        ids = self._window.ids
        while ids:
            oldest, at = next(iter(ids.items()))
            if now - at <= max_age:
                break
            del ids[oldest]

    def seen_count(self) -> int:
        """Number of tracked event IDs."""
        return len(self._window.ids)


#: How long `RustEventSequencer.cleanup` keeps a buffered event, seconds (upstream's 5 minutes).
_BUFFERED_MAX_AGE_S = 300.0
#: `cleanup` trims the seen ids back to the window once they pass this multiple of it.
_SEEN_TRIM_FACTOR = 1.5


class RustEventSequencer:
    """Event sequencer with dedup and per-topic out-of-order buffering.

    Per topic, the first event sets the expected sequence; the expected one is delivered with
    the buffered ones that follow it; one ahead by at most `max_out_of_order` is buffered; one
    further ahead resets the topic (what was skipped is counted as dropped); an old one is
    dropped.
    """

    __module__ = _MODULE

    def __init__(self, window_size: int = 10000, max_out_of_order: int = 100) -> None:
        self._seq = 0
        self._window_size = _count("window_size", window_size)
        self._max_ooo = _count("max_out_of_order", max_out_of_order)
        self._seen: deque[str] = deque()
        self._seen_set: set[str] = set()
        self._expected: dict[str, int] = {}
        # topic -> {sequence: (buffered at, event)}
        self._buffered: dict[str, dict[int, tuple[float, Any]]] = {}
        self._duplicates = 0
        self._out_of_order = 0
        self._dropped = 0

    def next_seq(self) -> int:
        """Increment and return the next sequence number."""
        self._seq += 1
        return self._seq

    def get_current_sequence(self) -> int:
        """Get current sequence number."""
        return self._seq

    def is_duplicate(self, event_id: str) -> bool:
        """Check if event ID has been seen (and remember it if not)."""
        event_id = _str("event_id", event_id)
        if event_id in self._seen_set:
            self._duplicates += 1
            return True
        if len(self._seen) >= self._window_size and self._seen:
            self._seen_set.discard(self._seen.popleft())
        self._seen.append(event_id)
        self._seen_set.add(event_id)
        return False

    def process_sequenced_event(self, topic: str, sequence: int, event: Any) -> list[Any] | None:
        """Process a sequenced event. Returns deliverable events or None if buffered/dropped."""
        topic = _str("topic", topic)
        sequence = _count("sequence", sequence)
        expected = self._expected.get(topic)
        if expected is None:
            self._expected[topic] = sequence + 1
            self._buffered[topic] = {}
            return [event]
        if sequence == expected:
            out = [event]
            buffered = self._buffered.get(topic, {})
            nxt = sequence + 1
            while nxt in buffered:
                out.append(buffered.pop(nxt)[1])
                nxt += 1
            self._expected[topic] = nxt
            return out
        if sequence > expected:
            self._out_of_order += 1
            if sequence - expected > self._max_ooo:
                self._dropped += sequence - expected - 1
                self._expected[topic] = sequence + 1
                self._buffered.setdefault(topic, {}).clear()
                return [event]
            self._buffered.setdefault(topic, {})[sequence] = (time.monotonic(), event)
            return None
        self._dropped += 1
        return None

    def cleanup(self) -> None:
        """Clean up buffered events older than 5 minutes and trim seen_ids."""
        now = time.monotonic()
        for topic in list(self._buffered):
            events = self._buffered[topic]
            for seq in [s for s, (at, _) in events.items() if now - at > _BUFFERED_MAX_AGE_S]:
                del events[seq]
                self._dropped += 1
            if not events:
                del self._buffered[topic]
                self._expected.pop(topic, None)
        if len(self._seen_set) > int(self._window_size * _SEEN_TRIM_FACTOR):
            while len(self._seen) > self._window_size:
                self._seen_set.discard(self._seen.popleft())

    def get_buffer_stats(self) -> dict[str, Any]:
        """Get statistics about buffered events per topic."""
        now = time.monotonic()
        topics = {}
        for topic, expected in self._expected.items():
            events = self._buffered.get(topic)
            if not events:
                continue
            seqs = sorted(events)
            topics[topic] = {
                "expected_sequence": expected,
                "buffered_count": len(seqs),
                "buffered_sequences": seqs,
                "gap_size": seqs[0] - expected,
                "oldest_buffered_age": max(now - at for at, _ in events.values()),
            }
        return {
            "total_topics": len(self._expected),
            "total_buffered": sum(len(e) for e in self._buffered.values()),
            "topics": topics,
        }

    def get_sequence_stats(self) -> dict[str, Any]:
        """Get detailed sequence statistics including per-topic info."""
        topics = {}
        total = 0
        for topic, expected in self._expected.items():
            seqs = sorted(self._buffered.get(topic, {}))
            total += len(seqs)
            gaps = []
            last = expected
            for seq in seqs:
                if seq - last > 1:
                    gaps.append({"start": last + 1, "end": seq - 1, "size": seq - last - 1})
                last = seq
            topics[topic] = {"expected": expected, "buffered": len(seqs), "gaps": gaps,
                             "buffered_sequences": seqs}
        return {
            "current_sequence": self._seq,
            "duplicate_count": self._duplicates,
            "out_of_order_count": self._out_of_order,
            "dropped_count": self._dropped,
            "topics": topics,
            "total_topics": len(self._expected),
            "total_buffered": total,
            "seen_ids_count": len(self._seen_set),
        }

    def reset_sequence(self, topic: str | None = None) -> None:
        """Reset sequence tracking for a specific topic or all topics."""
        if topic is None:
            self._expected.clear()
            self._buffered.clear()
        else:
            self._expected.pop(_str("topic", topic), None)
            self._buffered.pop(topic, None)


# -- priority queues ------------------------------------------------------------------------


class RustPriorityQueue:
    """Bounded priority queue: highest priority first, first in first out within one."""

    __module__ = _MODULE

    def __init__(self, max_size: int) -> None:
        self._max = _count("max_size", max_size)
        self._heap: list[tuple[int, int, Any]] = []
        self._n = 0

    def push(self, priority: int, message: Any) -> bool:
        """Push a message. Returns False if queue is full."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError("argument 'priority': an integer is required")
        if len(self._heap) >= self._max:
            return False
        self._n += 1
        heapq.heappush(self._heap, (-priority, self._n, message))
        return True

    def pop(self) -> Any | None:
        """Pop the highest-priority message (None when empty)."""
        return heapq.heappop(self._heap)[2] if self._heap else None

    def drain(self, max_count: int) -> list[Any]:
        """Drain up to max_count messages in priority order."""
        n = min(_count("max_count", max_count), len(self._heap))
        return [heapq.heappop(self._heap)[2] for _ in range(n)]

    def len(self) -> int:
        return len(self._heap)

    def is_full(self) -> bool:
        return len(self._heap) >= self._max

    def clear(self) -> None:
        self._heap.clear()


#: The levels of RustPriorityMessageQueue, highest first (CRITICAL, HIGH, NORMAL, LOW, BACKGROUND).
_LEVELS = (10, 8, 5, 3, 1)
#: When full, a message of these levels (lowest first) makes room for a new one.
_DROPPABLE = (1, 3, 5)
#: Levels below this are refused when nothing can make room.
_HIGH = 8
#: Above this fraction of its capacity the queue reports backpressure.
_BACKPRESSURE = 0.8


def _level(priority: int) -> int:
    """The level nearest to `priority` (the higher on a tie, as upstream's scan finds it)."""
    return min(_LEVELS, key=lambda p: abs(p - priority))


class RustPriorityMessageQueue:
    """Priority message queue (five levels) with priority-based dropping and batch dequeue."""

    __module__ = _MODULE

    def __init__(self, max_size: int = 1000, batch_size: int = 10) -> None:
        self._max = _count("max_size", max_size)
        self._batch = _count("batch_size", batch_size)
        self._queues: dict[int, deque[tuple[float, Any]]] = {p: deque() for p in _LEVELS}
        self._dropped = {p: 0 for p in _LEVELS}
        self._size = 0
        self._oldest: float | None = None

    def enqueue(self, message: Any, priority: int = 5) -> bool:
        """Enqueue a message. Priorities: BACKGROUND=1, LOW=3, NORMAL=5, HIGH=8, CRITICAL=10."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError("argument 'priority': an integer is required")
        level = _level(priority)
        if self._size >= self._max:
            victim = next((p for p in _DROPPABLE if self._queues[p]), None)
            if victim is None:
                self._dropped[level] += 1
                return False
            self._queues[victim].popleft()
            self._size -= 1
            self._dropped[victim] += 1
        now = time.monotonic()
        self._queues[level].append((now, message))
        self._size += 1
        if self._oldest is None:
            self._oldest = now
        return True

    def dequeue_batch(self) -> list[tuple[int, Any]]:
        """Dequeue a batch of (priority, message) tuples, highest priority first."""
        batch: list[tuple[int, Any]] = []
        for level in _LEVELS:
            q = self._queues[level]
            while q and len(batch) < self._batch:
                batch.append((level, q.popleft()[1]))
                self._size -= 1
        if self._size == 0:
            self._oldest = None
        elif batch:
            self._oldest = min(q[0][0] for q in self._queues.values() if q)
        return batch

    @property
    def size(self) -> int:
        """Current total message count."""
        return self._size

    def get_stats(self) -> dict[str, Any]:
        """Queue statistics (size, capacity, utilization, per-level depths and drops...)."""
        return {
            "size": self._size,
            "capacity": self._max,
            "utilization_percent": self._size / self._max * 100.0 if self._max else 0.0,
            "priority_distribution": {p: len(self._queues[p]) for p in _LEVELS},
            "priority_queue_depths": {f"priority_{p}_depth": len(self._queues[p])
                                      for p in _LEVELS},
            "dropped_by_priority": dict(self._dropped),
            "total_dropped": sum(self._dropped.values()),
            "backpressure": self._size > self._max * _BACKPRESSURE,
            "oldest_message_age": (None if self._oldest is None
                                   else time.monotonic() - self._oldest),
            "processing_rate": 0.0,
        }

    def clear(self) -> None:
        for q in self._queues.values():
            q.clear()
        self._size = 0
        self._oldest = None


# -- event filter ---------------------------------------------------------------------------

_MISSING = object()
_regex_cache: dict[str, re.Pattern[str]] = {}
#: Compiled patterns kept for reuse; past it the cache starts over.
_REGEX_CACHE_MAX = 1024


def _lookup(event: dict, key: str) -> Any:
    if "." not in key:
        return event.get(key, _MISSING)
    current: Any = event
    for part in key.split("."):
        if not isinstance(current, dict) or part not in current:
            return _MISSING
        current = current[part]
    return current


def _regex(pattern: str) -> re.Pattern[str]:
    anchored = pattern if pattern.startswith("^") else f"^(?:{pattern})"
    compiled = _regex_cache.get(anchored)
    if compiled is None:
        try:
            compiled = re.compile(anchored)
        except re.error as exc:
            raise ValueError(f"Invalid regex '{pattern}': {exc}") from None
        if len(_regex_cache) >= _REGEX_CACHE_MAX:
            _regex_cache.clear()
        _regex_cache[anchored] = compiled
    return compiled


def _text_op(op: str, value: Any, arg: Any) -> bool:
    arg = _str(op, arg)
    if value is _MISSING:
        return False
    text = str(value)
    if op == "$regex":
        return _regex(arg).search(text) is not None
    if op == "$contains":
        return arg in text
    if op == "$startswith":
        return text.startswith(arg)
    return text.endswith(arg)


_COMPARISONS = {"$gt": operator.gt, "$lt": operator.lt, "$gte": operator.ge, "$lte": operator.le}


def _operator(op: Any, value: Any, arg: Any) -> bool:
    op = _str("operator", op)
    present = value is not _MISSING
    if op == "$eq":
        return bool(value == arg) if present else arg is None
    if op == "$ne":
        return not (value == arg) if present else arg is not None
    if op in _COMPARISONS:
        return present and bool(_COMPARISONS[op](value, arg))
    if op == "$in":
        return present and isinstance(arg, list) and value in arg
    if op == "$nin":
        return not (present and isinstance(arg, list)) or value not in arg
    if op == "$exists":
        if not isinstance(arg, bool):
            raise TypeError(f"'{type(arg).__name__}' object cannot be converted to 'PyBool'")
        return present == arg
    if op in ("$regex", "$contains", "$startswith", "$endswith"):
        return _text_op(op, value, arg)
    # An operator upstream does not know matches nothing.
    return False


def rust_match_event(event: dict, criteria: dict) -> bool:
    """Match an event against MongoDB-style filter criteria.

    Operators: $eq, $ne, $gt, $lt, $gte, $lte, $in, $nin, $regex (anchored at the start),
    $exists, $contains, $startswith, $endswith, and top-level $and/$or lists; dot notation
    reaches nested dicts ("payload.price"). A `start_from_latest` key matches everything.
    """
    if not isinstance(event, dict):
        raise TypeError(f"argument 'event': '{type(event).__name__}' object cannot be "
                        "converted to 'PyDict'")
    if not isinstance(criteria, dict):
        raise TypeError(f"argument 'criteria': '{type(criteria).__name__}' object cannot be "
                        "converted to 'PyDict'")
    if "start_from_latest" in criteria:
        return True
    both = criteria.get("$and", _MISSING)
    if isinstance(both, list):
        return all(rust_match_event(event, sub) for sub in both)
    either = criteria.get("$or", _MISSING)
    if isinstance(either, list):
        return any(rust_match_event(event, sub) for sub in either)
    for key, expected in criteria.items():
        key = _str("key", key)
        if key in ("$and", "$or"):
            continue
        value = _lookup(event, key)
        if isinstance(expected, dict):
            if not all(_operator(op, value, arg) for op, arg in expected.items()):
                return False
        elif value is _MISSING:
            if expected is not None:
                return False
        elif not value == expected:
            return False
    return True


# -- MessagePack and the compression manager ---------------------------------------------------


def _to_plain(obj: Any) -> Any:
    """The value upstream's packer sees: UUIDs as their text, dates as ISO 8601, enums as their
    value, objects as their __dict__, anything else unknown as str(obj); ints past 64 bits as
    text."""
    if obj is None or isinstance(obj, (bool, float, str, bytes)):
        return obj
    if isinstance(obj, int):
        return obj if -(1 << 63) <= obj < (1 << 64) else str(obj)
    if isinstance(obj, dict):
        return {_Key(_to_plain(k)): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    hex_attr = getattr(obj, "hex", None)
    if isinstance(hex_attr, str) and len(hex_attr) == 32:
        return str(obj)
    if hasattr(obj, "isoformat") and hasattr(obj, "year"):
        return obj.isoformat()
    if hasattr(obj, "value") and hasattr(obj, "name"):
        return _to_plain(obj.value)
    if isinstance(getattr(obj, "__dict__", None), dict):
        return _to_plain(obj.__dict__)
    return str(obj)


class _Key:
    """A map key kept apart from its value's hashability (keys may be lists upstream)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _pack(value: Any, out: bytearray) -> None:
    if value is None:
        out.append(0xC0)
    elif value is True or value is False:
        out.append(0xC3 if value else 0xC2)
    elif isinstance(value, int):
        if value >= 0:
            if value < 0x80:
                out.append(value)
            elif value <= 0xFF:
                out += b"\xcc" + value.to_bytes(1, "big")
            elif value <= 0xFFFF:
                out += b"\xcd" + value.to_bytes(2, "big")
            elif value <= 0xFFFFFFFF:
                out += b"\xce" + value.to_bytes(4, "big")
            else:
                out += b"\xcf" + value.to_bytes(8, "big")
        elif value >= -32:
            out += value.to_bytes(1, "big", signed=True)
        elif value >= -0x80:
            out += b"\xd0" + value.to_bytes(1, "big", signed=True)
        elif value >= -0x8000:
            out += b"\xd1" + value.to_bytes(2, "big", signed=True)
        elif value >= -0x80000000:
            out += b"\xd2" + value.to_bytes(4, "big", signed=True)
        else:
            out += b"\xd3" + value.to_bytes(8, "big", signed=True)
    elif isinstance(value, float):
        out += b"\xcb" + struct.pack(">d", value)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        _head(out, len(data), 0xA0, 32, b"\xd9", b"\xda", b"\xdb")
        out += data
    elif isinstance(value, bytes):
        _head(out, len(value), None, 0, b"\xc4", b"\xc5", b"\xc6")
        out += value
    elif isinstance(value, list):
        _head(out, len(value), 0x90, 16, None, b"\xdc", b"\xdd")
        for v in value:
            _pack(v, out)
    else:  # dict of _Key
        _head(out, len(value), 0x80, 16, None, b"\xde", b"\xdf")
        for k, v in value.items():
            _pack(k.value, out)
            _pack(v, out)


def _head(out: bytearray, n: int, fix: int | None, fix_max: int, b8: bytes | None, b16: bytes,
          b32: bytes) -> None:
    if fix is not None and n < fix_max:
        out.append(fix | n)
    elif b8 is not None and n <= 0xFF:
        out += b8 + n.to_bytes(1, "big")
    elif n <= 0xFFFF:
        out += b16 + n.to_bytes(2, "big")
    else:
        out += b32 + n.to_bytes(4, "big")


class _Truncated(Exception):
    pass


#: Containers nested deeper than this are refused when unpacking (no unbounded recursion).
_UNPACK_DEPTH_MAX = 1024


def _unpack(data: bytes, pos: int, depth: int = 0) -> tuple[Any, int]:
    if depth > _UNPACK_DEPTH_MAX:
        raise ValueError("nested too deeply")

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise _Truncated("unexpected end of data")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    def uint(n: int) -> int:
        return int.from_bytes(take(n), "big")

    def sint(n: int) -> int:
        return int.from_bytes(take(n), "big", signed=True)

    def text(n: int) -> str:
        try:
            return take(n).decode("utf-8")
        except UnicodeDecodeError:
            return ""

    def seq(n: int) -> list:
        nonlocal pos
        items = []
        for _ in range(n):
            item, pos = _unpack(data, pos, depth + 1)
            items.append(item)
        return items

    def mapping(n: int) -> dict:
        nonlocal pos
        out = {}
        for _ in range(n):
            k, pos = _unpack(data, pos, depth + 1)
            v, pos = _unpack(data, pos, depth + 1)
            out[k] = v
        return out

    b = take(1)[0]
    if b <= 0x7F:
        value: Any = b
    elif b <= 0x8F:
        value = mapping(b & 0x0F)
    elif b <= 0x9F:
        value = seq(b & 0x0F)
    elif b <= 0xBF:
        value = text(b & 0x1F)
    elif b >= 0xE0:
        value = b - 0x100
    else:
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            value = simple[b]
        elif b in (0xC4, 0xC5, 0xC6):
            value = take(uint(1 << (b - 0xC4)))
        elif b in (0xC7, 0xC8, 0xC9):  # ext 8/16/32: the data, as bytes
            n = uint(1 << (b - 0xC7))
            take(1)
            value = take(n)
        elif b == 0xCA:
            value = struct.unpack(">f", take(4))[0]
        elif b == 0xCB:
            value = struct.unpack(">d", take(8))[0]
        elif 0xCC <= b <= 0xCF:
            value = uint(1 << (b - 0xCC))
        elif 0xD0 <= b <= 0xD3:
            value = sint(1 << (b - 0xD0))
        elif 0xD4 <= b <= 0xD8:  # fixext 1..16
            take(1)
            value = take(1 << (b - 0xD4))
        elif b in (0xD9, 0xDA, 0xDB):
            value = text(uint(1 << (b - 0xD9)))
        elif b in (0xDC, 0xDD):
            value = seq(uint(2 << (b - 0xDC)))
        elif b in (0xDE, 0xDF):
            value = mapping(uint(2 << (b - 0xDE)))
        else:  # 0xC1, never used
            raise ValueError(f"reserved marker 0x{b:02x}")
    return value, pos


def _json_ready(value: Any) -> Any:
    """`_to_plain`'s value as upstream's JSON fallback writes it: bytes as hex, non-finite
    floats as null, keys as text (sorted, as its JSON maps are)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        items = {(k.value if isinstance(k.value, str) else _display(k.value)): _json_ready(v)
                 for k, v in value.items()}
        return dict(sorted(items.items()))
    return value


def _display(value: Any) -> str:
    """A non-text map key as upstream's MessagePack value prints it."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bytes):
        return "[" + ", ".join(str(b) for b in value) + "]"
    if isinstance(value, list):
        return "[" + ", ".join(_display(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_display(k.value)}: {_display(v)}" for k, v in value.items()) + "}"
    return str(value)


class RustCompressionManager:
    """zlib compression with statistics, MessagePack and event packing (JSON fallback)."""

    __module__ = _MODULE

    def __init__(self, threshold: int = 1024, compression_level: int = 6) -> None:
        self._threshold = _count("threshold", threshold)
        self._level = _count("compression_level", compression_level)
        self.reset_stats()

    def should_compress(self, data: bytes) -> bool:
        """Return True if data exceeds the compression threshold."""
        return len(_bytes("data", data)) > self._threshold

    def compress(self, data: bytes, level: int | None = None) -> bytes:
        """Compress data with zlib (the manager's level unless one is given)."""
        data = _bytes("data", data)
        level = self._level if level is None else _count("level", level)
        try:
            out = _accel.rust_compress(data, level)
        except Exception:
            self._failures_c += 1
            raise
        saved = len(data) - len(out)
        if saved > 0:
            self._saved += saved
        self._compressed += 1
        return out

    def decompress(self, data: bytes) -> bytes:
        """Decompress zlib data (10 MiB of output at most)."""
        try:
            out = _accel.rust_decompress(_bytes("data", data))
        except Exception:
            self._failures_d += 1
            raise
        self._decompressed += 1
        return out

    def pack_msgpack(self, data: dict[str, Any]) -> bytes:
        """Serialize dict to msgpack bytes."""
        if not isinstance(data, dict):
            raise TypeError(f"argument 'data': '{type(data).__name__}' object cannot be "
                            "converted to 'PyDict'")
        out = bytearray()
        _pack(_to_plain(data), out)
        return bytes(out)

    def unpack_msgpack(self, data: bytes) -> Any:
        """Deserialize msgpack bytes (the first value; what follows it is ignored)."""
        try:
            return _unpack(_bytes("data", data), 0)[0]
        except (_Truncated, ValueError) as exc:
            raise RuntimeError(f"msgpack unpacking failed: {exc}") from None

    def pack_event(self, event: dict[str, Any], use_msgpack: bool = True) -> bytes:
        """Pack event as msgpack, or as compact JSON with use_msgpack=False."""
        if use_msgpack:
            return self.pack_msgpack(event)
        if not isinstance(event, dict):
            raise TypeError(f"argument 'event': '{type(event).__name__}' object cannot be "
                            "converted to 'PyDict'")
        return json.dumps(_json_ready(_to_plain(event)), separators=(",", ":"),
                          ensure_ascii=False).encode()

    def unpack_event(self, data: bytes, is_msgpack: bool = True) -> Any:
        """Unpack event from msgpack (falling back to JSON), or from JSON."""
        data = _bytes("data", data)
        if is_msgpack:
            try:
                return _unpack(data, 0)[0]
            except (_Truncated, ValueError, TypeError):
                pass
        for text in _decodings(data):
            try:
                return json.loads(text)
            except ValueError:
                continue
        if is_msgpack:
            raise RuntimeError("Failed to unpack event (tried msgpack + JSON)")
        return {"_raw_hex": data.hex(), "_decode_error": True}

    def get_stats(self) -> dict[str, int | float]:
        """Compression statistics."""
        c_attempts = self._compressed + self._failures_c
        d_attempts = self._decompressed + self._failures_d
        return {
            "total_compressed": self._compressed,
            "total_decompressed": self._decompressed,
            "compression_failures": self._failures_c,
            "decompression_failures": self._failures_d,
            "total_bytes_saved": self._saved,
            "compression_success_rate": self._compressed / c_attempts if c_attempts else 0.0,
            "decompression_success_rate": self._decompressed / d_attempts if d_attempts else 0.0,
            "average_bytes_saved": self._saved / self._compressed if self._compressed else 0.0,
        }

    def reset_stats(self) -> None:
        """Reset all compression statistics to zero."""
        self._compressed = self._decompressed = 0
        self._failures_c = self._failures_d = 0
        self._saved = 0


def _decodings(data: bytes):
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Upstream's latin-1 and cp1252 attempts both map each byte to one character.
    yield data.decode("latin-1")


def _bytes(name: str, value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"argument '{name}': '{type(value).__name__}' object cannot be "
                        "converted to 'PyBytes'")
    return value


# -- event envelope ---------------------------------------------------------------------------

#: Event types whose envelope category is "WSE" (the rest: "U", snapshots "S").
_WSE_TYPES = frozenset({"server_ready", "snapshot_complete", "client_hello_ack",
                        "connection_state_change", "error", "pong"})
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_NAIVE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?")


def _clean(obj: Any) -> bool:
    return obj is None or isinstance(obj, (str, bool, int, float))


def _shallow_clean(obj: Any) -> bool:
    return _clean(obj) or isinstance(obj, (list, dict))


def _needs_conversion(d: dict) -> bool:
    """Whether anything in the first two levels of `d` is not JSON-ready (deeper is not looked
    at, as upstream)."""
    for v in d.values():
        if not _shallow_clean(v):
            return True
        inner = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        if any(not _shallow_clean(x) for x in inner):
            return True
    return False


def _text_of(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _convert(obj: Any) -> Any:
    """A JSON-ready copy: bytes as text, UUIDs as text, dates as ISO 8601, enums as their
    value, tuples as lists, objects as their __dict__."""
    if _clean(obj):
        return obj
    if isinstance(obj, dict):
        if not _needs_conversion(obj):
            return obj
        return {k: _convert(v) for k, v in obj.items()}
    if isinstance(obj, bytes):
        return _text_of(obj)
    hex_attr = getattr(obj, "hex", None)
    if isinstance(hex_attr, str) and len(hex_attr) == 32:
        return str(obj)
    if hasattr(obj, "isoformat") and hasattr(obj, "year"):
        return obj.isoformat()
    if hasattr(obj, "value") and hasattr(obj, "name"):
        return _convert(obj.value)
    if isinstance(obj, (list, tuple)):
        return [_convert(v) for v in obj]
    if isinstance(getattr(obj, "__dict__", None), dict):
        return _convert(obj.__dict__)
    return obj


def _as_text(obj: Any) -> str:
    """str() of an id-like value after upstream's conversions (bytes, UUID, date, enum)."""
    if isinstance(obj, bytes):
        return _text_of(obj)
    hex_attr = getattr(obj, "hex", None)
    if isinstance(hex_attr, str) and len(hex_attr) == 32:
        return str(obj)
    if hasattr(obj, "isoformat") and hasattr(obj, "year"):
        return str(obj.isoformat())
    if hasattr(obj, "value") and hasattr(obj, "name"):
        return str(obj.value)
    return str(obj)


def _get(d: dict | None, key: str) -> Any:
    """d[key] unless absent or None (then None)."""
    return None if d is None else d.get(key)


def _latency_ms(stamp: str) -> int | None:
    import datetime as dt

    if _RFC3339.fullmatch(stamp):
        text = stamp[:-1] + "+00:00" if stamp[-1] in "Zz" else stamp
        when = dt.datetime.fromisoformat(text.replace("t", "T").replace(" ", "T"))
    elif _NAIVE.fullmatch(stamp):
        when = dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.timezone.utc)
    else:
        return None
    delta = dt.datetime.now(dt.timezone.utc) - when
    # Whole milliseconds, toward zero.
    return int(delta / dt.timedelta(milliseconds=1))


def _uuid7() -> str:
    """A UUIDv7 (time-ordered) as text: 48-bit Unix milliseconds, version 7, random rest."""
    import os
    import uuid

    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 \
        | 0b10 << 62 | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def rust_transform_event(event: dict[str, Any], sequence: int,
                         event_type_map: dict[str, Any]) -> dict[str, Any]:
    """Transform a raw event dict into a WSE wire envelope `{c, t, id, ts, seq, p, v, ...}`.

    The type is `event_type` (or `type`) mapped through event_type_map, else lowercased; id,
    timestamp, correlation id, priority, version and trace id come from `_metadata` or the event;
    the payload is `payload` (or the event itself, `_metadata` left out), made JSON-ready. An
    event that already has v, t, p, id and ts is returned as it is (with `seq` added if absent).
    """
    import datetime as dt

    if not isinstance(event, dict):
        raise TypeError(f"argument 'event': '{type(event).__name__}' object cannot be "
                        "converted to 'PyDict'")
    if isinstance(sequence, bool) or not isinstance(sequence, int):
        raise TypeError(f"argument 'sequence': '{type(sequence).__name__}' object cannot be "
                        "interpreted as an integer")
    if not isinstance(event_type_map, dict):
        raise TypeError(f"argument 'event_type_map': '{type(event_type_map).__name__}' object "
                        "cannot be converted to 'PyDict'")
    if all(k in event for k in ("v", "t", "p", "id", "ts")):
        event.setdefault("seq", sequence)
        return event

    raw = _get(event, "event_type")
    raw = _get(event, "type") if raw is None else raw
    raw_type = "unknown" if raw is None else _as_text(raw)
    mapped = event_type_map.get(raw_type)
    ws_type = raw_type.lower() if mapped is None else str(mapped)

    meta = event.get("_metadata")
    meta = meta if isinstance(meta, dict) else None

    def text_of(key: str, meta_key: str | None = None) -> str | None:
        value = _get(meta, meta_key or key)
        return None if value is None else str(value)

    stamp_text = text_of("timestamp")
    if stamp_text is None and _get(event, "timestamp") is not None:
        stamp_text = str(event["timestamp"])
    latency = None if stamp_text is None else _latency_ms(stamp_text)

    ident = _get(meta, "event_id")
    ident = _get(event, "event_id") if ident is None else ident
    event_id = _uuid7() if ident is None else _as_text(ident)

    stamp = _get(meta, "timestamp")
    stamp = _get(event, "timestamp") if stamp is None else stamp
    if stamp is None:
        timestamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    else:
        timestamp = _as_text(stamp)

    source = _get(event, "payload")
    source = source if isinstance(source, dict) else event
    payload = {k: _convert(v) for k, v in source.items() if str(k) != "_metadata"}
    if "event_type" not in payload and _get(payload, "type") is not None:
        payload["event_type"] = payload["type"]
    payload = _convert(payload)

    category = _get(event, "c")
    if category is None:
        if "_snapshot" in ws_type or "snapshot_" in ws_type:
            category = "S"
        else:
            category = "WSE" if ws_type in _WSE_TYPES else "U"
    envelope: dict[str, Any] = {"c": category, "t": ws_type, "id": event_id, "ts": timestamp,
                                "seq": sequence, "p": payload, "v": 1}
    if raw_type != ws_type:
        envelope["original_event_type"] = raw_type
    if latency is not None:
        envelope["latency_ms"] = latency
    cid = text_of("correlation_id")
    if cid is None and _get(event, "correlation_id") is not None:
        cid = str(event["correlation_id"]) or None
    if cid is not None:
        envelope["cid"] = cid
    pri = _get(meta, "priority")
    pri = _get(event, "pri") if pri is None else pri
    if pri is not None:
        envelope["pri"] = pri
    version = _get(event, "version")
    version = _get(meta, "version") if version is None else version
    envelope["event_version"] = (int(version) if isinstance(version, int)
                                 and -(1 << 63) <= version < (1 << 63) else 1)
    trace = text_of("trace_id")
    if trace is None and _get(event, "trace_id") is not None:
        trace = str(event["trace_id"]) or None
    if trace is not None:
        envelope["trace_id"] = trace
    return envelope
