"""Type stubs for wse_server._wse_accel: the wse-shards engine behind upstream's API.

Names, arguments and defaults are those of upstream's `wse-server` 2.5.1; differences are in
the docstrings and docs/PYTHON.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: "wse-shards": which engine this module is.
ENGINE: str
#: The version of the wse-shards package this module was built from.
ENGINE_VERSION: str

def rust_jwt_encode(
    claims: dict[str, Any],
    secret: bytes,
    algorithm: str = "HS256",
    key_id: str | None = None,
) -> str:
    """Encode claims into a JWT token string.

    Supported algorithms: HS256 (default), RS256, ES256.
    For HS256: secret is the shared key (>= 32 bytes).
    For RS256/ES256: secret is the PEM-encoded private key.

    Raises ValueError if algorithm is not HS256, RS256, or ES256.
    Raises RuntimeError on signing failure (invalid key, bad PEM, etc.).
    """
    ...

def rust_jwt_decode(
    token: str,
    secret: bytes,
    algorithm: str = "HS256",
    issuer: str | None = None,
    audience: str | None = None,
    previous_secret: bytes | None = None,
    key_id: str | None = None,
) -> dict[str, Any] | None:
    """Decode and validate a JWT. Returns None on any failure (expired, wrong key, bad
    signature, unknown algorithm, issuer/audience/kid mismatch)."""
    ...

# -- hashing and signing --------------------------------------------------------------------

def rust_sha256(data: bytes) -> str:
    """SHA-256 of data, as a hex digest string."""
    ...

def rust_hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of data with key: 32 raw bytes."""
    ...

def rust_sign_message(payload_json: str, secret: bytes) -> str:
    """Hex HMAC-SHA256(secret, hex SHA-256 of payload_json)."""
    ...

# -- zlib -------------------------------------------------------------------------------------

def rust_compress(data: bytes, level: int) -> bytes:
    """zlib-compress data at level 1..9 (ValueError otherwise)."""
    ...

def rust_decompress(data: bytes) -> bytes:
    """Inflate zlib data: at most 10 MiB of output (RuntimeError past it, or on corrupt data);
    a truncated stream gives what it holds."""
    ...

def rust_should_compress(data: bytes, threshold: int) -> bool:
    """Whether data is longer than threshold bytes."""
    ...

# -- AES-GCM-256, ECDH P-256 -------------------------------------------------------------------

def rust_aes_gcm_encrypt(key: bytes, plaintext: bytes) -> bytes:
    """Encrypt with AES-GCM-256 (32-byte key): 12-byte random IV + ciphertext + 16-byte tag."""
    ...

def rust_aes_gcm_decrypt(key: bytes, data: bytes) -> bytes:
    """Decrypt IV + ciphertext + tag; ValueError for a bad key or short data, RuntimeError when
    the tag does not verify."""
    ...

def rust_ecdh_generate_keypair() -> tuple[bytes, bytes]:
    """A P-256 keypair: (32-byte private scalar, 65-byte uncompressed SEC1 public key)."""
    ...

def rust_ecdh_derive_shared_secret(private_key: bytes, peer_public_key: bytes) -> bytes:
    """A 32-byte AES key: HKDF-SHA256 (no salt, info "wse-encryption/aes-gcm-key") of the ECDH
    secret of private_key and the peer's SEC1 public key; ValueError for an invalid key."""
    ...

# -- Python utilities, also importable from here (wse_server._utilities) ----------------------

def rust_match_event(event: dict[str, Any], criteria: dict[str, Any]) -> bool:
    """Match an event against MongoDB-style filter criteria."""
    ...

def rust_transform_event(
    event: dict[str, Any], sequence: int, event_type_map: dict[str, Any]
) -> dict[str, Any]:
    """Transform a raw event dict into a WSE wire envelope `{c, t, id, ts, seq, p, v, ...}`."""
    ...

class RustCompressionManager:
    """zlib compression with statistics, MessagePack and event packing (JSON fallback)."""

    def __init__(self, threshold: int = 1024, compression_level: int = 6) -> None: ...
    def should_compress(self, data: bytes) -> bool: ...
    def compress(self, data: bytes, level: int | None = None) -> bytes: ...
    def decompress(self, data: bytes) -> bytes: ...
    def pack_msgpack(self, data: dict[str, Any]) -> bytes: ...
    def unpack_msgpack(self, data: bytes) -> Any: ...
    def pack_event(self, event: dict[str, Any], use_msgpack: bool = True) -> bytes: ...
    def unpack_event(self, data: bytes, is_msgpack: bool = True) -> Any: ...
    def get_stats(self) -> dict[str, int | float]: ...
    def reset_stats(self) -> None: ...

class RustTokenBucket:
    """Token bucket rate limiter."""

    def __init__(self, capacity: float, refill_rate: float,
                 initial_tokens: float | None = None) -> None: ...
    def acquire(self, tokens: float) -> bool:
        """Try to acquire tokens. Returns True if successful."""
        ...
    @property
    def tokens(self) -> float:
        """Current token count after refill."""
        ...
    def reset(self) -> None:
        """Reset bucket to full capacity."""
        ...

class RustSequencer:
    """Monotonic sequence counter with duplicate detection."""

    def __init__(self, window_size: int) -> None: ...
    def next_seq(self) -> int: ...
    def get_current_seq(self) -> int: ...
    def is_duplicate(self, event_id: str) -> bool: ...
    def cleanup(self, max_age_secs: float) -> None: ...
    def seen_count(self) -> int: ...

class RustEventSequencer:
    """Event sequencer with dedup and out-of-order buffering."""

    def __init__(self, window_size: int = 10000, max_out_of_order: int = 100) -> None: ...
    def next_seq(self) -> int: ...
    def get_current_sequence(self) -> int: ...
    def is_duplicate(self, event_id: str) -> bool: ...
    def process_sequenced_event(self, topic: str, sequence: int, event: Any) -> list[Any] | None: ...
    def cleanup(self) -> None: ...
    def get_buffer_stats(self) -> dict[str, Any]: ...
    def get_sequence_stats(self) -> dict[str, Any]: ...
    def reset_sequence(self, topic: str | None = None) -> None: ...

class RustPriorityQueue:
    """Bounded priority queue."""

    def __init__(self, max_size: int) -> None: ...
    def push(self, priority: int, message: Any) -> bool: ...
    def pop(self) -> Any | None: ...
    def drain(self, max_count: int) -> list[Any]: ...
    def len(self) -> int: ...
    def is_full(self) -> bool: ...
    def clear(self) -> None: ...

class RustPriorityMessageQueue:
    """Priority message queue with stats and batch dequeue."""

    def __init__(self, max_size: int = 1000, batch_size: int = 10) -> None: ...
    def enqueue(self, message: Any, priority: int = 5) -> bool: ...
    def dequeue_batch(self) -> list[tuple[int, Any]]: ...
    @property
    def size(self) -> int: ...
    def get_stats(self) -> dict[str, Any]: ...
    def clear(self) -> None: ...

class RustWSEServer:
    """Standalone Rust WebSocket server controlled from Python (the wse-shards engine).

    All transport (TCP accept, framing, JWT auth, compression, ping/pong) runs in the engine's
    shard threads, one per core (``WSE_CORES`` in the environment overrides the count). Python
    handles application logic via drain mode or callbacks. Every call that waits on the engine
    releases the GIL.
    """

    def __init__(
        self,
        host: str,
        port: int,
        max_connections: int = 1000,
        jwt_secret: bytes | None = None,
        jwt_issuer: str | None = None,
        jwt_audience: str | None = None,
        jwt_cookie_name: str | None = None,
        jwt_previous_secret: bytes | None = None,
        jwt_key_id: str | None = None,
        jwt_algorithm: str | None = None,
        jwt_private_key: bytes | None = None,
        max_inbound_queue_size: int = 131072,
        recovery_enabled: bool = False,
        recovery_buffer_size: int = 128,
        recovery_ttl: int = 300,
        recovery_max_messages: int = 500,
        recovery_memory_budget: int = 268435456,
        presence_enabled: bool = False,
        presence_max_data_size: int = 4096,
        presence_max_members: int = 0,
        rate_limit_capacity: float = 100_000.0,
        rate_limit_refill: float = 10_000.0,
        max_message_size: int = 1_048_576,
        ping_interval: int = 25,
        idle_timeout: int = 60,
        max_outbound_queue_bytes: int = 16_777_216,
    ) -> None:
        """Configure (nothing starts until start()). A value upstream accepts and this engine
        does not (e.g. max_message_size under 1024) is adjusted with a RuntimeWarning.

        Raises ValueError for an HS256 secret under 32 bytes or an unresolvable host;
        NotImplementedError for jwt_algorithm RS256/ES256 (not yet).
        """
        ...

    # -- Lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Start the server; returns once it accepts connections.
        Raises RuntimeError if already running, OSError if the address cannot be bound."""
        ...
    def stop(self) -> None:
        """Stop the server and close all connections (4300). No-op when not running."""
        ...
    def drain(self, close_code: int = 4300, close_reason: str = "", timeout: int = 30) -> None:
        """Graceful drain: stop accepting, close every client with close_code (4000..=4999),
        wait up to timeout seconds. The server is not running afterwards."""
        ...
    def is_running(self) -> bool:
        """Return True if the server is running."""
        ...

    # -- Callbacks (alternative to drain mode) --------------------------------
    def set_callbacks(
        self,
        on_connect: Callable[[str, str], Any],
        on_message: Callable[[str, dict[str, Any] | str | bytes], Any],
        on_disconnect: Callable[[str], Any],
    ) -> None:
        """Register callbacks; they run on a thread of this server's, never on a shard."""
        ...

    # -- Drain Mode -----------------------------------------------------------
    def enable_drain_mode(self) -> None:
        """Enable drain mode (before start()): events queue for drain_inbound()."""
        ...
    def drain_inbound(
        self, max_count: int = 256, timeout_ms: int = 50
    ) -> list[tuple[str, str | None, Any]]:
        """Drain up to max_count events, waiting (without the GIL) up to timeout_ms.

        Tuples: ("connect", conn_id, ""), ("auth_connect", conn_id, user_id),
        ("msg", conn_id, dict), ("raw", conn_id, str), ("bin", conn_id, bytes),
        ("disconnect", conn_id, None), ("presence_join" | "presence_leave", None,
        {"topic", "user_id", "data"}).
        """
        ...
    def inbound_dropped_count(self) -> int:
        """Number of inbound events dropped due to queue overflow."""
        ...
    def inbound_queue_depth(self) -> int:
        """Current number of events in the inbound queues."""
        ...

    # -- Send -----------------------------------------------------------------
    def send(self, conn_id: str, data: str) -> None:
        """Send a text frame to a connection (unknown connections are ignored)."""
        ...
    def send_bytes(self, conn_id: str, data: bytes) -> None:
        """Send a binary frame to a connection (unknown connections are ignored)."""
        ...
    def send_event(
        self,
        conn_id: str,
        event: dict[str, Any],
        compression_threshold: int = 1024,
    ) -> int:
        """Send an event in the WSE envelope. Returns bytes queued (0: unknown connection or
        duplicate id). compression_threshold is accepted; the server's (1024) applies."""
        ...

    # -- Broadcast ------------------------------------------------------------
    def broadcast_all(self, data: str) -> None:
        """Send text to all connected clients (no topic filtering)."""
        ...
    def broadcast_all_bytes(self, data: bytes) -> None:
        """Send binary to all connected clients."""
        ...
    def broadcast_local(self, topic: str, data: str) -> None:
        """Fan-out to this node's topic subscribers. data must be a JSON object's text
        (ValueError otherwise)."""
        ...
    def broadcast(self, topic: str, data: str) -> None:
        """Fan-out to topic subscribers (single-node for now: as broadcast_local)."""
        ...

    # -- Connection Management ------------------------------------------------
    def get_connection_count(self) -> int:
        """Number of active connections."""
        ...
    def get_connections(self) -> list[str]:
        """List of active connection IDs."""
        ...
    def disconnect(self, conn_id: str) -> None:
        """Force-disconnect a connection (close code 1000)."""
        ...

    # -- Topic Authorization ---------------------------------------------------
    def set_topic_acl(
        self,
        conn_id: str,
        allow: list[str] | None = None,
        deny: list[str] | None = None,
    ) -> None:
        """Set a connection's topic ACL (globs; deny wins; empty allow = allow all)."""
        ...

    # -- Subscriptions --------------------------------------------------------
    def subscribe_connection(
        self,
        conn_id: str,
        topics: list[str],
        presence_data: dict[str, Any] | None = None,
        queue_group: str | None = None,
    ) -> None:
        """Subscribe a connection to topics (presence data, or a queue group instead)."""
        ...
    def subscribe_with_recovery(
        self,
        conn_id: str,
        topics: list[str],
        recover: bool = False,
        epoch: str | None = None,
        offset: int | None = None,
    ) -> dict[str, Any]:
        """Subscribe with message recovery. Returns {"recovered": bool, "topics": {topic:
        {"epoch", "offset", "recoverable", "recovered", "count"}}}."""
        ...
    def unsubscribe_connection(self, conn_id: str, topics: list[str] | None = None) -> None:
        """Unsubscribe from topics. If topics is None, unsubscribe from all."""
        ...
    def get_topic_subscriber_count(self, topic: str) -> int:
        """Number of fan-out subscribers of a topic (queue group members excluded)."""
        ...
    def get_queue_group_info(self, topic: str) -> dict[str, int]:
        """Queue groups of a topic: {group_name: member_count}."""
        ...

    # -- Presence -------------------------------------------------------------
    def presence(self, topic: str) -> dict[str, dict[str, Any]]:
        """Members of a topic: {user_id: {"data": dict, "connections": int}}."""
        ...
    def presence_stats(self, topic: str) -> dict[str, int]:
        """{"num_users": int, "num_connections": int} for a topic."""
        ...
    def update_presence(self, conn_id: str, data: dict[str, Any]) -> None:
        """Replace the connection's presence data in all its presence topics (members get
        `presence_update`). RuntimeError for an unknown connection or data over
        presence_max_data_size."""
        ...

    # -- Cluster (not implemented yet: single-node) ---------------------------
    def connect_cluster(
        self,
        peers: list[str],
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        cluster_port: int | None = None,
        seeds: list[str] | None = None,
        cluster_addr: str | None = None,
    ) -> None:
        """Not implemented yet: raises NotImplementedError naming the missing cluster."""
        ...
    def cluster_connected(self) -> bool:
        """Always False (single-node)."""
        ...
    def cluster_peers_count(self) -> int:
        """Always 0 (single-node)."""
        ...
    def cluster_info(self) -> list[dict[str, Any]]:
        """Always [] (single-node)."""
        ...
    def reload_cluster_tls(self, cert_path: str, key_path: str, ca_path: str) -> None:
        """Not implemented yet: raises NotImplementedError."""
        ...
    def get_cluster_dlq_entries(self) -> list[dict[str, Any]]:
        """Always [] (single-node)."""
        ...

    # -- Health / Monitoring --------------------------------------------------
    def health_snapshot(self) -> dict[str, Any]:
        """Upstream's keys (cluster, recovery and presence counts are 0 for now) plus ours:
        running, draining, shards, slow_consumer_drops, fabric_overflow_drops."""
        ...
    def prometheus_metrics(self) -> str:
        """Prometheus text: upstream's server-wide series (no per-topic/cluster ones yet)."""
        ...
