"""Upstream's application-side utilities that need no native code, in Python.

Upstream 2.5.1 compiles these into ``wse_server._wse_accel``; ``wse_server/__init__.py`` attaches
them there too, so both import paths work. Their behaviour (results, defaults, bounds, exception
types) is upstream's, checked against upstream's own package on the same inputs by
``python/tests/test_utilities.py``. None of them takes part in the server's work: the engine
has its own rate limits, queues and sequencing.
"""

from __future__ import annotations

import heapq
import operator
import re
import time
from collections import OrderedDict, deque
from typing import Any

__all__ = [
    "RustTokenBucket",
    "RustSequencer",
    "RustEventSequencer",
    "RustPriorityQueue",
    "RustPriorityMessageQueue",
    "rust_match_event",
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
