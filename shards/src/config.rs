//! The engine's configuration: every limit the server enforces, with its unit and default.
//!
//! Owns: the [`Config`] tree, its defaults and its validation. The same struct is read from
//! `wse.toml`, overlaid by `WSE_*` environment variables and command-line flags (in the binary),
//! and printed by `wse-server --print-config`. The TOML key, the struct field and (where one
//! exists) the metric share the name.
//!
//! Never: reads files or the environment (the binary does).
//!
//! Reloading: a running server takes a new configuration through `Server::reload`, which applies
//! every key except [`RESTART_KEYS`] (see [`Config::reloaded`]); those keep their running value
//! until a restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Protocol limit (protocol.md §3): topics longer than this are refused. Bytes.
pub const TOPIC_LEN_MAX: usize = 1024;
/// Protocol limit (protocol.md §1): tokens larger than this are refused without parsing. Bytes.
pub const TOKEN_LEN_MAX: usize = 8 * 1024;
/// Largest `presence.max_data_size` the configuration accepts, bytes (the protocol's default is
/// 4 KiB; presence data travels with every join and update).
pub const PRESENCE_DATA_CEILING: usize = 64 * 1024;
/// Largest number of shards a server may run; the per-topic shard-interest set is a fixed bitset
/// of this many bits.
pub const SHARDS_MAX: usize = 256;
/// Granularity of every per-connection deadline (ping, idle, handshake, close). The per-shard
/// timer wheel advances in steps of this size, so deadlines fire up to one tick late.
pub const TIMER_TICK: Duration = Duration::from_millis(50);
/// The WSE protocol version this server speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Keys a reload cannot change: they shape what was built at start (threads, listeners, the
/// cross-shard queues, the control plane's body limit). A reload keeps their running value and
/// reports them; every other key takes effect live.
pub const RESTART_KEYS: [&str; 44] = [
    "server.cores",
    "server.listen",
    "server.pin_threads",
    "limits.max_message_size",
    "limits.fabric_queue_capacity",
    "limits.fabric_memory_per_shard",
    "control.enabled",
    "control.listen",
    // The history is allocated and sized at start, and holds its ttl and reply limit.
    "recovery.enabled",
    "recovery.buffer_size",
    "recovery.ttl",
    "recovery.max_messages",
    "recovery.memory_budget",
    "recovery.max_topics",
    // Members are counted from the start; switching mid-run would miscount.
    "presence.enabled",
    // The webhook sender and its queue are set up at start.
    "events.webhook_url",
    "events.webhook_queue_capacity",
    "events.webhook_queue_bytes",
    // The cluster core's thread, listener and identity are set up at start. So are, in this
    // increment, its seeds, keys, limits and timers: the core reads [cluster] once (applying
    // keys to new links on SIGHUP is to come, docs/CLUSTER.md).
    "cluster.enabled",
    "cluster.node_name",
    "cluster.listen",
    "cluster.core",
    "cluster.advertised",
    "cluster.seeds",
    "cluster.security",
    "cluster.tls_ca",
    "cluster.tls_cert",
    "cluster.tls_key",
    "cluster.psk",
    "cluster.psk_previous",
    "cluster.compression",
    "cluster.batch_max",
    "cluster.peer_queue_bytes",
    "cluster.hold_bytes",
    "cluster.dlq_entries",
    "cluster.max_members",
    "cluster.handshake_timeout",
    "cluster.ping_interval",
    "cluster.link_timeout",
    "cluster.probe_timeout",
    "cluster.suspect_timeout",
    "cluster.suspect_min",
    "cluster.rejoin_interval",
    "cluster.sub_ack_timeout",
];

/// The whole configuration. `Config::default()` is the embedded laptop configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: listen address, cores, connection cap.
    pub server: ServerConfig,
    /// `[limits]`: sizes, queue caps and timeouts that bound what a client can cost.
    pub limits: LimitsConfig,
    /// `[protocol]`: ping interval, idle timeout, rate limits, compression.
    pub protocol: ProtocolConfig,
    /// `[auth]`: JWT verification and default rights.
    pub auth: AuthConfig,
    /// `[recovery]`: the per-topic publication history for reconnecting clients.
    pub recovery: RecoveryConfig,
    /// `[presence]`: per-topic member tracking.
    pub presence: PresenceConfig,
    /// `[control]`: the HTTP control listener (server API, health, metrics).
    pub control: ControlConfig,
    /// `[events]`: how application events reach the backend (event stream or webhook).
    pub events: EventsConfig,
    /// `[centrifuge]`: the Centrifuge client protocol's endpoint, timing and namespaces.
    pub centrifuge: CentrifugeConfig,
    /// `[cluster]`: the mesh of wse-server nodes (membership only so far, docs/CLUSTER.md).
    pub cluster: ClusterConfig,
    /// `[log]`: log level and the refusal summary interval.
    pub log: LogConfig,
}

/// Listener, threads and lifecycle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Number of shards (one thread per core). 0 = every online core.
    pub cores: usize,
    /// WebSocket listener address; every shard binds it with SO_REUSEPORT.
    pub listen: SocketAddr,
    /// Pin shard N to core N (mod the online cores).
    pub pin_threads: bool,
    /// Opt-in RFC 6455 conformance route: data messages on this path are echoed back, without
    /// auth and without the WSE protocol. Off when unset.
    pub echo_path: Option<String>,
    /// Most live WebSocket connections across all shards. Past it a new connection is upgraded
    /// and closed with 1013 (try again later), and counted in `wse_rejected_total{reason="max_connections"}`.
    pub max_connections: usize,
    /// How long a graceful shutdown (SIGTERM/SIGINT) waits for connections to take their close
    /// frame before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Close code sent to every connection on graceful shutdown; clients reconnect on 4xxx.
    pub shutdown_close_code: u16,
    /// Browser origins allowed to open a WebSocket (WSE and Centrifuge alike), each the exact
    /// `Origin` header (`https://app.example.com`, case-insensitive; `*` in an entry matches any
    /// run of characters, e.g. `https://*.example.com`), or `"*"` for any. An upgrade without an
    /// `Origin` (a non-browser client) always passes; one whose `Origin` is not listed gets HTTP
    /// 403 and is counted in `wse_rejected_total{reason="origin"}`. Empty: every browser refused
    /// (Centrifugo's default); the default `["*"]` allows every origin.
    pub allowed_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            cores: 0,
            listen: SocketAddr::from(([0, 0, 0, 0], 5007)),
            pin_threads: true,
            echo_path: None,
            max_connections: 1_000_000,
            drain_timeout: Duration::from_secs(10),
            shutdown_close_code: crate::close::CloseCode::Shutdown.code(),
            allowed_origins: vec![ORIGIN_ANY.to_owned()],
        }
    }
}

/// The `server.allowed_origins` entry that allows every origin.
pub const ORIGIN_ANY: &str = "*";

/// Longest `server.allowed_origins` entry, bytes (an origin is a scheme, a host and a port).
pub const ORIGIN_ENTRY_MAX: usize = 512;

/// Memory and abuse limits. Each says what happens when it is reached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest inbound message (after reassembly of fragments), bytes. Past it: error
    /// `MESSAGE_TOO_LARGE` and close 1009.
    pub max_message_size: usize,
    /// Largest HTTP upgrade request, bytes. Past it: HTTP 431 and the socket is closed.
    pub max_handshake_bytes: usize,
    /// Time a client has to complete the HTTP upgrade. Past it the socket is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Connections per shard still in the HTTP upgrade (slowloris guard). Past it a new socket
    /// gets HTTP 503 and is closed.
    pub max_pending_handshakes: usize,
    /// Bytes queued for one connection that it has not read yet. Past it the connection is
    /// evicted with close 4413 (it reconnects and recovers) rather than silently losing messages.
    pub max_outbound_queue_bytes: usize,
    /// Topics one connection may be subscribed to. Past it: `SUBSCRIPTION_LIMIT` in `failed_topics`.
    pub max_subscriptions_per_connection: usize,
    /// Application events (client messages of unknown type) buffered per shard for the event
    /// stream. Past it the oldest is dropped and counted in `wse_dropped_total{reason="app_event_overflow"}`.
    pub app_event_queue_capacity: usize,
    /// Bytes of application events (payloads as received) buffered per shard for the event
    /// stream, whatever their count: what a shard holds while no consumer is connected or the
    /// event stream falls behind. Past it the oldest are dropped and counted like
    /// `app_event_queue_capacity`.
    pub app_event_queue_bytes: usize,
    /// Time a closing connection has to answer our close frame (and to read what we sent)
    /// before its socket is closed anyway.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// Most entries in each cross-shard queue (one per ordered pair of participants). A queue
    /// gets fewer when its sender's share of `fabric_memory_per_shard` does not hold this many
    /// (see `fabric_plan::Plan`); at least 64.
    pub fabric_queue_capacity: usize,
    /// Bytes of cross-shard traffic each shard (and the control plane) may hold: the slots of its
    /// outbound queues (at most an eighth of it) plus the bytes of the entries it sent that their
    /// destination has not taken yet, queued or held back. Past it new entries are dropped and
    /// counted in `wse_dropped_total{reason="fabric_overflow"}`. The fabric as a whole holds at
    /// most this times (shards + 2).
    pub fabric_memory_per_shard: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_size: 1 << 20,
            max_handshake_bytes: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 4096,
            max_outbound_queue_bytes: 4 << 20,
            max_subscriptions_per_connection: 1000,
            app_event_queue_capacity: 65_536,
            app_event_queue_bytes: 4 << 20,
            close_timeout: Duration::from_secs(5),
            fabric_queue_capacity: 16_384,
            fabric_memory_per_shard: 64 << 20,
        }
    }
}

/// WSE protocol timing and rate limits (protocol.md §4, §6, §7).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolConfig {
    /// Interval between the server's JSON text pings to each connection.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection with no inbound frame for this long is closed with 4408 (clients reconnect).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Inbound token bucket size per connection, messages.
    pub rate_limit_capacity: u32,
    /// Inbound token bucket refill per connection, messages per second.
    pub rate_limit_refill: u32,
    /// Messages dropped by the rate limit within one `rate_limit_abuse_window` after which the
    /// connection is closed with 4429.
    pub rate_limit_abuse_drops: u32,
    /// Window over which rate-limit drops are counted for the 4429 decision.
    #[serde(with = "humantime_serde")]
    pub rate_limit_abuse_window: Duration,
    /// Per-connection JSON sends larger than this are sent `C:`+zlib compressed, bytes.
    pub compression_threshold: usize,
    /// Client `subscription_update` (`subscription`, `subscribe`, `unsubscribe`) and `publish`
    /// messages go to the application's event stream as they are, instead of being served by
    /// the engine. Upstream's Python API leaves them to the application, so the Python package
    /// (`python/`) sets it; an embedder's switch, not a configuration-file key.
    #[serde(skip)]
    pub app_handles_requests: bool,
    /// Events sent to one connection (`Server::send_event`) go in binary frames, JSON ones
    /// included (they go in text frames otherwise). Upstream's Python `send_event` sends binary
    /// frames, so the Python package sets it; an embedder's switch, not a configuration-file key.
    #[serde(skip)]
    pub binary_event_frames: bool,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            rate_limit_capacity: 100_000,
            rate_limit_refill: 10_000,
            rate_limit_abuse_drops: 100_000,
            rate_limit_abuse_window: Duration::from_secs(10),
            compression_threshold: 1024,
            app_handles_requests: false,
            binary_event_frames: false,
        }
    }
}

/// JWT algorithms accepted; the algorithm is pinned here, never taken from the token header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with the shared `secret`.
    #[default]
    HS256,
    /// RSA PKCS#1 v1.5 SHA-256, verified with the `public_key` PEM.
    RS256,
    /// ECDSA P-256 SHA-256, verified with the `public_key` PEM.
    ES256,
}

/// Connection authentication (protocol.md §1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Require a valid JWT on every connection. Off: connections are anonymous (user id =
    /// connection id), which is only fit for development.
    pub enabled: bool,
    /// The one algorithm tokens must use; a token announcing another is refused.
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret, at least 32 bytes.
    pub secret: Option<String>,
    /// RS256/ES256 public key, PEM file.
    pub public_key_file: Option<PathBuf>,
    /// Previous HS256 secret, still accepted during a key rotation.
    pub previous_secret: Option<String>,
    /// Previous RS256/ES256 public key (PEM file), still accepted during a key rotation.
    pub previous_public_key_file: Option<PathBuf>,
    /// HS256 secret as raw bytes (any bytes, not only UTF-8), instead of `secret`: an
    /// embedder's way to hand a binary key over (the Python package's `jwt_secret`), not a
    /// configuration-file key.
    #[serde(skip)]
    pub secret_bytes: Option<Vec<u8>>,
    /// Previous HS256 secret as raw bytes, instead of `previous_secret` (embedders).
    #[serde(skip)]
    pub previous_secret_bytes: Option<Vec<u8>>,
    /// RS256/ES256 public key as PEM text, instead of `public_key_file`: an embedder's way to
    /// hand the key over (the Python package's `jwt_secret`), not a configuration-file key.
    #[serde(skip)]
    pub public_key_pem: Option<String>,
    /// Previous public key as PEM text, instead of `previous_public_key_file` (embedders).
    #[serde(skip)]
    pub previous_public_key_pem: Option<String>,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Accepted `aud` values (the token's `aud` may be a string or an array), when non-empty.
    pub audience: Vec<String>,
    /// Required `kid` header, when set.
    pub kid: Option<String>,
    /// Cookie that carries the token (first token source; then `Authorization: Bearer`, then `?token=`).
    pub cookie_name: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Topics (globs) a connection may publish to when its token has no `wse_publish` claim,
    /// and what anonymous connections may publish to when auth is off. Empty = none.
    pub default_publish: Vec<String>,
    /// Queue groups (globs on the group name) a connection may join when its token has no
    /// `wse_queue_groups` claim, and what anonymous connections may join when auth is off.
    /// Empty = none: a group is a share of a topic's publications and one of a topic's
    /// `QUEUE_GROUPS_PER_TOPIC_MAX` slots, so joining one is a right, as publishing is.
    pub default_queue_groups: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            algorithm: JwtAlgorithm::HS256,
            secret: None,
            public_key_file: None,
            previous_secret: None,
            previous_public_key_file: None,
            secret_bytes: None,
            previous_secret_bytes: None,
            public_key_pem: None,
            previous_public_key_pem: None,
            issuer: None,
            audience: Vec::new(),
            kid: None,
            cookie_name: "access_token".to_owned(),
            leeway: Duration::from_secs(30),
            default_publish: Vec::new(),
            default_queue_groups: Vec::new(),
        }
    }
}

/// Message recovery (protocol.md §5): every publication is stamped with its topic, the topic
/// history's epoch and its offset, and kept in a bounded history on the topic's owner shard so
/// reconnecting clients can replay what they missed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecoveryConfig {
    /// Stamp publications and keep their history.
    pub enabled: bool,
    /// Publications remembered per topic (a power of two). Older ones are forgotten first.
    pub buffer_size: usize,
    /// Publications older than this are not replayed.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Most publications one recovery reply replays; a larger gap answers `recovered: false`.
    pub max_messages: usize,
    /// Bytes of replays one connection may have queued and not yet read beyond
    /// `limits.max_outbound_queue_bytes`. A replay past it answers `recovered: false` (the client
    /// re-baselines) and is counted in `wse_dropped_total{reason="replay_over_budget"}`.
    pub max_replay_bytes: usize,
    /// Bytes of publication history across the server, split evenly between shards,
    /// allocated (and touched) at start. When full, the oldest publications are overwritten.
    pub memory_budget: usize,
    /// Topics with a history across the server, split evenly between shards. Each costs
    /// `buffer_size` × 16 bytes, allocated at start; past it the least recently published
    /// topic's history is dropped (its next publication starts a new epoch).
    pub max_topics: usize,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            buffer_size: 256,
            ttl: Duration::from_secs(300),
            max_messages: 1000,
            max_replay_bytes: 16 << 20,
            memory_budget: 64 << 20,
            max_topics: 4096,
        }
    }
}

/// Presence (protocol.md §8): who is subscribed to a topic, with data they chose.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// Track members and send `presence_join` / `presence_leave` / `presence_update`.
    pub enabled: bool,
    /// Largest presence data (JSON) a member may attach, bytes. Past it the subscription of that
    /// topic fails with `PRESENCE_DATA_TOO_LARGE`.
    pub max_data_size: usize,
    /// Members (distinct users) per topic; 0 = unlimited. Past it the subscription of that topic
    /// fails with `PRESENCE_LIMIT`. Finite by default: every join and leave is sent to every
    /// member, so an unbounded room costs O(members²) frames to fill.
    pub max_members: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_data_size: 4096,
            max_members: 10_000,
        }
    }
}

/// The control plane: HTTP server API, health and metrics on their own listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Serve the control plane at all.
    pub enabled: bool,
    /// Control listener; keep it on a private address.
    pub listen: SocketAddr,
    /// Key required (as `Authorization: Bearer <key>` or `X-API-Key`) by the `/api/v1/` routes.
    /// Unset: those routes answer 403. `/health` and `/metrics` need no key.
    pub api_key: Option<String>,
    /// Open HTTP connections on the control listener (event-stream sockets past their upgrade
    /// not included). Past it a new connection is closed at once, unanswered, and counted in
    /// `wse_control_rejected_total{reason="max_connections"}`.
    pub max_connections: usize,
    /// Time a control connection has to send a request's headers, counted from the accept or
    /// from the end of the previous response (so it is also the keep-alive idle timeout). Past
    /// it the connection is closed, counted in `wse_control_rejected_total{reason="header_timeout"}`.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time from a request's headers to its response, the body's upload included. Past it: 408
    /// and the connection is closed, counted in `wse_control_rejected_total{reason="request_timeout"}`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 5008)),
            api_key: None,
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The application event stream (docs/API.md): what clients do, delivered to the application's
/// backend over `GET /api/v1/events` (WebSocket) or, with `webhook_url`, by HTTP POSTs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Events queued for one event-stream consumer that it has not read yet. Past it the oldest
    /// is dropped and counted in `wse_inbound_dropped_total{reason="consumer_slow"}`.
    pub consumer_queue_capacity: usize,
    /// Bytes of event JSON queued for one event-stream consumer that it has not read yet (also
    /// the bound on what is held while no consumer is connected). Past it the oldest events are
    /// dropped and counted like `consumer_queue_capacity`; one event larger than the budget is
    /// still kept, alone.
    pub consumer_queue_bytes: usize,
    /// Largest event-stream frame (a JSON array of events) or webhook body, bytes. Events go in
    /// order, as many as fit; one event larger than this goes alone in its frame.
    pub max_frame_bytes: usize,
    /// Deliver events by POSTing JSON arrays to this `http://` URL instead of to event-stream
    /// consumers. Unset: off.
    pub webhook_url: Option<String>,
    /// Events per webhook POST, at most.
    pub webhook_batch_size: usize,
    /// Longest wait for a webhook batch to fill before it is sent anyway.
    #[serde(with = "humantime_serde")]
    pub webhook_batch_interval: Duration,
    /// Retries of a failed webhook POST (after the first attempt), with doubling backoff from
    /// 100 ms; after the last the batch is dropped and counted in
    /// `wse_inbound_dropped_total{reason="webhook_failed"}`.
    pub webhook_max_retries: u32,
    /// Time one webhook POST may take (connect, send, response headers).
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// Events queued for the webhook. Past it the oldest is dropped and counted in
    /// `wse_inbound_dropped_total{reason="consumer_slow"}`.
    pub webhook_queue_capacity: usize,
    /// Bytes of event JSON queued for the webhook. Past it the oldest events are dropped and
    /// counted like `webhook_queue_capacity`.
    pub webhook_queue_bytes: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            consumer_queue_capacity: 65_536,
            consumer_queue_bytes: 16 << 20,
            max_frame_bytes: 256 << 10,
            webhook_url: None,
            webhook_batch_size: 256,
            webhook_batch_interval: Duration::from_millis(100),
            webhook_max_retries: 5,
            webhook_timeout: Duration::from_secs(10),
            webhook_queue_capacity: 65_536,
            webhook_queue_bytes: 32 << 20,
        }
    }
}

/// Shortest `log.attack_summary_interval`: the summary is a rate limit on the log, not a feed.
pub const ATTACK_SUMMARY_INTERVAL_MIN: Duration = Duration::from_millis(100);

/// How cluster links are authenticated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterSecurity {
    /// TLS 1.3 with certificates from a private CA; the certificate's SAN holds the node name.
    #[default]
    Tls,
    /// A pre-shared key (HMAC challenge–response; frames sealed).
    Psk,
    /// Plaintext, unauthenticated: refused unless `listen` is a loopback address.
    None,
}

/// Batch compression between nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterCompression {
    /// Never.
    Off,
    /// Every batch of at least 4 KiB.
    On,
    /// Batches of at least 4 KiB when the link is bandwidth-bound (RTT ≥ 5 ms or a backlog).
    #[default]
    Auto,
}

/// Largest cluster frame, bytes (the wire format's bound, `wse_cluster::wire::MAX_FRAME`).
pub const CLUSTER_FRAME_MAX: usize = 4 << 20;
/// Most nodes in one cluster (peer sets are 64-bit masks).
pub const CLUSTER_MEMBERS_MAX: usize = 64;
/// Most `cluster.dlq_entries`: each keeps a topic and 64 payload bytes, so this bounds the
/// queue to a few tens of MiB whatever is configured.
pub const CLUSTER_DLQ_ENTRIES_MAX: usize = 65_536;

/// The cluster (docs/CLUSTER.md): a full mesh of nodes on a dedicated cluster core. So far the
/// core runs the membership mesh and carries publications; links are `tls`, `psk` or `none`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Join a cluster: start the cluster core (the cluster mesh (docs/CLUSTER.md)).
    pub enabled: bool,
    /// This node's name, unique and stable across restarts. Empty: the host name.
    pub node_name: String,
    /// Cluster listener, ip:port; its own port, never the WebSocket or control one.
    pub listen: SocketAddr,
    /// Address other nodes dial, host:port. Unset: `listen`, which must then be a specific address
    /// and port (refused with `enabled` otherwise).
    pub advertised: Option<String>,
    /// Seed nodes, host:port, re-resolved on each attempt; one reachable seed is enough to join.
    pub seeds: Vec<String>,
    /// How links are authenticated: `tls`, `psk` or `none` (loopback only).
    pub security: ClusterSecurity,
    /// TLS: the private CA certificate (PEM) both ends verify against.
    pub tls_ca: Option<PathBuf>,
    /// TLS: this node's certificate chain (PEM); its SAN must hold `node_name`.
    pub tls_cert: Option<PathBuf>,
    /// TLS: this node's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// PSK: the shared key, at least 32 bytes.
    pub psk: Option<String>,
    /// PSK: the previous key, still accepted during a rotation.
    pub psk_previous: Option<String>,
    /// Core the cluster thread is pinned to. Unset: not pinned.
    pub core: Option<usize>,
    /// Batch compression: `off`, `on` or `auto`.
    pub compression: ClusterCompression,
    /// Largest data batch to one peer, bytes.
    pub batch_max: usize,
    /// Bytes queued to one peer and not yet written, past which publications for it are dropped
    /// (counted, kept in the dead letter queue).
    pub peer_queue_bytes: usize,
    /// Publications held for a new peer until its interest is known, bytes.
    pub hold_bytes: usize,
    /// Dropped publications kept for diagnosis (`GET /api/v1/cluster/dlq`), entries; the oldest
    /// goes first.
    pub dlq_entries: usize,
    /// Nodes in the cluster, this one included; further joins are refused with CLUSTER_FULL.
    pub max_members: usize,
    /// Time an inbound cluster connection has to authenticate before it is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A link sends a PING after this long without sending anything.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A link that received nothing (or wrote nothing) for this long is dead.
    #[serde(with = "humantime_serde")]
    pub link_timeout: Duration,
    /// Time other nodes have to answer an indirect probe.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Time from suspicion to death without confirmations from other nodes.
    #[serde(with = "humantime_serde")]
    pub suspect_timeout: Duration,
    /// Time from suspicion to death once half of the other nodes confirm it.
    #[serde(with = "humantime_serde")]
    pub suspect_min: Duration,
    /// Dead nodes' addresses are redialled this often (jittered), so healed partitions rejoin.
    #[serde(with = "humantime_serde")]
    pub rejoin_interval: Duration,
    /// Longest wait for other nodes to confirm a new subscription before it is acknowledged anyway.
    #[serde(with = "humantime_serde")]
    pub sub_ack_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            node_name: String::new(),
            listen: SocketAddr::from(([0, 0, 0, 0], 9999)),
            advertised: None,
            seeds: Vec::new(),
            security: ClusterSecurity::Tls,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            psk: None,
            psk_previous: None,
            core: None,
            compression: ClusterCompression::Auto,
            batch_max: 64 * 1024,
            peer_queue_bytes: 16 << 20,
            hold_bytes: 4 << 20,
            dlq_entries: 1024,
            max_members: 32,
            handshake_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(1),
            link_timeout: Duration::from_secs(3),
            probe_timeout: Duration::from_millis(500),
            suspect_timeout: Duration::from_secs(4),
            suspect_min: Duration::from_secs(1),
            rejoin_interval: Duration::from_secs(5),
            sub_ack_timeout: Duration::from_millis(250),
        }
    }
}

impl ClusterConfig {
    /// Checks the section; `ws` and `control` are the other listeners it must not share.
    fn validate(&self, ws: SocketAddr, control: SocketAddr) -> Result<(), ConfigError> {
        let overlaps = |a: SocketAddr, b: SocketAddr| {
            a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        };
        if overlaps(self.listen, ws) {
            return Err(bad(
                "cluster.listen",
                "must not share the WebSocket listener's port",
            ));
        }
        if overlaps(self.listen, control) {
            return Err(bad(
                "cluster.listen",
                "must not share the control listener's port",
            ));
        }
        if self.node_name.len() > 255 || self.node_name.contains(char::is_whitespace) {
            return Err(bad(
                "cluster.node_name",
                "at most 255 bytes, without whitespace",
            ));
        }
        let host_port = |s: &str| {
            s.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
        };
        if let Some(a) = &self.advertised
            && !host_port(a)
        {
            return Err(bad("cluster.advertised", "must be host:port"));
        }
        if let Some(s) = self.seeds.iter().find(|s| !host_port(s)) {
            return Err(bad("cluster.seeds", format!("{s:?} is not host:port")));
        }
        match self.security {
            ClusterSecurity::None if !self.listen.ip().is_loopback() => {
                return Err(bad(
                    "cluster.security",
                    "none (no authentication) is only allowed on a loopback listen address",
                ));
            }
            ClusterSecurity::Psk => {
                for (key, psk) in [
                    ("cluster.psk", &self.psk),
                    ("cluster.psk_previous", &self.psk_previous),
                ] {
                    match psk {
                        Some(k) if k.len() < 32 => {
                            return Err(bad(key, "must be at least 32 bytes"));
                        }
                        None if key == "cluster.psk" && self.enabled => {
                            return Err(bad(key, "required with security = psk"));
                        }
                        _ => {}
                    }
                }
            }
            // The files must be there; whether they parse and the key goes with the certificate
            // is checked when the cluster core loads them (exit 1, one line naming the key).
            ClusterSecurity::Tls if self.enabled => {
                for (key, path) in [
                    ("cluster.tls_ca", &self.tls_ca),
                    ("cluster.tls_cert", &self.tls_cert),
                    ("cluster.tls_key", &self.tls_key),
                ] {
                    match path {
                        None => return Err(bad(key, "required with security = tls")),
                        Some(p) if !p.is_file() => {
                            return Err(bad(key, format!("{}: no such file", p.display())));
                        }
                        Some(_) => {}
                    }
                }
            }
            _ => {}
        }
        // Peers dial the advertised address (learnt from gossip too): a wildcard would make
        // them dial themselves.
        if self.enabled
            && self.advertised.is_none()
            && (self.listen.ip().is_unspecified() || self.listen.port() == 0)
        {
            return Err(bad(
                "cluster.advertised",
                "required when cluster.listen is a wildcard address or port 0: the address other \
                 nodes dial to reach this one, host:port",
            ));
        }
        if self.batch_max < 4096 || self.batch_max > CLUSTER_FRAME_MAX - 1024 {
            return Err(bad("cluster.batch_max", "must be 4 KiB..=4 MiB - 1 KiB"));
        }
        if self.peer_queue_bytes < self.batch_max {
            return Err(bad(
                "cluster.peer_queue_bytes",
                "must be at least cluster.batch_max",
            ));
        }
        if !(1..=CLUSTER_DLQ_ENTRIES_MAX).contains(&self.dlq_entries) {
            return Err(bad(
                "cluster.dlq_entries",
                format!("must be 1..={CLUSTER_DLQ_ENTRIES_MAX}"),
            ));
        }
        if !(2..=CLUSTER_MEMBERS_MAX).contains(&self.max_members) {
            return Err(bad(
                "cluster.max_members",
                format!("must be 2..={CLUSTER_MEMBERS_MAX}"),
            ));
        }
        let ms = Duration::from_millis(10);
        if [
            self.handshake_timeout,
            self.ping_interval,
            self.probe_timeout,
            self.suspect_min,
            self.rejoin_interval,
            self.sub_ack_timeout,
        ]
        .iter()
        .any(|d| *d < ms)
        {
            return Err(bad(
                "cluster.ping_interval",
                "cluster timers must be at least 10ms",
            ));
        }
        if self.ping_interval >= self.link_timeout {
            return Err(bad(
                "cluster.link_timeout",
                "must exceed cluster.ping_interval",
            ));
        }
        if self.probe_timeout >= self.link_timeout {
            return Err(bad(
                "cluster.probe_timeout",
                "must be below cluster.link_timeout",
            ));
        }
        if self.suspect_min > self.suspect_timeout {
            return Err(bad(
                "cluster.suspect_min",
                "must not exceed cluster.suspect_timeout",
            ));
        }
        Ok(())
    }
}

/// Logging.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `wse_shards=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
    /// How often each shard logs what it refused meanwhile: one `warn!` per kind whose count
    /// moved (target `wse_shards::alarms`), so an attack shows in the log at a bounded rate.
    #[serde(with = "humantime_serde")]
    pub attack_summary_interval: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            attack_summary_interval: Duration::from_secs(10),
        }
    }
}

/// A configuration that cannot run, with the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// The config key at fault, as written in wse.toml (e.g. `auth.secret`).
    pub key: &'static str,
    /// What is wrong with its value, for the operator.
    pub problem: String,
}

fn bad(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        problem: problem.into(),
    }
}

impl Config {
    /// Checks what serde cannot: ranges, relations between fields, required companions.
    ///
    /// # Errors
    /// The first problem found, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.cores > SHARDS_MAX {
            return Err(bad("server.cores", format!("at most {SHARDS_MAX}")));
        }
        if s.max_connections == 0 {
            return Err(bad("server.max_connections", "must be at least 1"));
        }
        if !crate::close::RECONNECT_CODES.contains(&s.shutdown_close_code) {
            return Err(bad(
                "server.shutdown_close_code",
                "must be in 4000..=4999 so clients reconnect",
            ));
        }
        if let Some(p) = &s.echo_path
            && !p.starts_with('/')
        {
            return Err(bad("server.echo_path", "must start with '/'"));
        }
        for origin in &s.allowed_origins {
            if origin.is_empty()
                || origin.len() > ORIGIN_ENTRY_MAX
                || !origin.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(bad(
                    "server.allowed_origins",
                    format!(
                        "{origin:?}: each entry is an origin such as https://app.example.com \
                         (printable ASCII, no spaces, at most {ORIGIN_ENTRY_MAX} bytes) or \"*\""
                    ),
                ));
            }
        }
        let l = &self.limits;
        if l.max_message_size < 1024 || l.max_message_size > 64 << 20 {
            return Err(bad("limits.max_message_size", "must be 1 KiB..=64 MiB"));
        }
        if l.max_handshake_bytes < 1024 {
            return Err(bad("limits.max_handshake_bytes", "must be at least 1024"));
        }
        if l.handshake_timeout < TIMER_TICK || l.close_timeout < TIMER_TICK {
            return Err(bad(
                "limits.handshake_timeout",
                "timeouts must be at least the timer tick (50ms)",
            ));
        }
        if l.app_event_queue_bytes == 0 {
            return Err(bad("limits.app_event_queue_bytes", "must be at least 1"));
        }
        if l.max_pending_handshakes == 0 {
            return Err(bad("limits.max_pending_handshakes", "must be at least 1"));
        }
        if l.max_outbound_queue_bytes < 64 * 1024 {
            return Err(bad(
                "limits.max_outbound_queue_bytes",
                "must be at least 64 KiB",
            ));
        }
        if l.fabric_queue_capacity < crate::fabric_plan::QUEUE_CAPACITY_MIN {
            return Err(bad("limits.fabric_queue_capacity", "must be at least 64"));
        }
        if l.fabric_memory_per_shard < 2 * l.max_message_size {
            return Err(bad(
                "limits.fabric_memory_per_shard",
                "must be at least twice limits.max_message_size",
            ));
        }
        if let Err(e) = self.fabric_plan() {
            return Err(bad("limits.fabric_memory_per_shard", e.to_string()));
        }
        let p = &self.protocol;
        if p.ping_interval < TIMER_TICK {
            return Err(bad("protocol.ping_interval", "must be at least 50ms"));
        }
        if p.idle_timeout <= p.ping_interval {
            return Err(bad(
                "protocol.idle_timeout",
                "must be longer than protocol.ping_interval",
            ));
        }
        if p.rate_limit_capacity == 0 || p.rate_limit_refill == 0 {
            return Err(bad(
                "protocol.rate_limit_capacity",
                "capacity and refill must be positive",
            ));
        }
        if p.rate_limit_abuse_window < Duration::from_secs(1) {
            return Err(bad(
                "protocol.rate_limit_abuse_window",
                "must be at least 1s",
            ));
        }
        let r = &self.recovery;
        if r.enabled {
            if !r.buffer_size.is_power_of_two() || r.buffer_size < 2 || r.buffer_size > 1 << 20 {
                return Err(bad(
                    "recovery.buffer_size",
                    "must be a power of two in 2..=1048576",
                ));
            }
            if r.max_messages == 0 {
                return Err(bad("recovery.max_messages", "must be at least 1"));
            }
            if r.max_topics == 0 {
                return Err(bad("recovery.max_topics", "must be at least 1"));
            }
            if r.memory_budget < 1 << 20 {
                return Err(bad("recovery.memory_budget", "must be at least 1 MiB"));
            }
            if r.ttl < Duration::from_secs(1) {
                return Err(bad("recovery.ttl", "must be at least 1s"));
            }
        }
        if self.presence.max_data_size > PRESENCE_DATA_CEILING {
            return Err(bad("presence.max_data_size", "must be at most 64 KiB"));
        }
        let a = &self.auth;
        if a.enabled {
            match a.algorithm {
                JwtAlgorithm::HS256 => match a
                    .secret
                    .as_deref()
                    .map(str::as_bytes)
                    .or(a.secret_bytes.as_deref())
                {
                    None => return Err(bad("auth.secret", "required for HS256")),
                    Some(s) if s.len() < 32 => {
                        return Err(bad("auth.secret", "must be at least 32 bytes"));
                    }
                    Some(_) => {}
                },
                JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                    if a.public_key_file.is_none() && a.public_key_pem.is_none() {
                        return Err(bad("auth.public_key_file", "required for RS256/ES256"));
                    }
                }
            }
            if let Some(s) = &a.previous_secret
                && s.len() < 32
            {
                return Err(bad("auth.previous_secret", "must be at least 32 bytes"));
            }
        }
        if a.cookie_name.is_empty() {
            return Err(bad("auth.cookie_name", "must not be empty"));
        }
        if self
            .control
            .api_key
            .as_deref()
            .is_some_and(|k| k.len() < 16)
        {
            return Err(bad("control.api_key", "must be at least 16 characters"));
        }
        let c = &self.control;
        if c.max_connections == 0 {
            return Err(bad("control.max_connections", "must be at least 1"));
        }
        if c.header_timeout.is_zero() || c.request_timeout.is_zero() {
            return Err(bad(
                "control.header_timeout",
                "control timeouts must be positive",
            ));
        }
        let e = &self.events;
        if e.consumer_queue_capacity == 0 || e.webhook_queue_capacity == 0 {
            return Err(bad(
                "events.consumer_queue_capacity",
                "queue capacities must be at least 1",
            ));
        }
        if e.consumer_queue_bytes == 0 || e.webhook_queue_bytes == 0 {
            return Err(bad(
                "events.consumer_queue_bytes",
                "queue budgets must be at least 1 byte",
            ));
        }
        if e.max_frame_bytes < 1024 {
            return Err(bad("events.max_frame_bytes", "must be at least 1024"));
        }
        if e.webhook_batch_size == 0 || e.webhook_batch_size > 100_000 {
            return Err(bad("events.webhook_batch_size", "must be 1..=100000"));
        }
        if e.webhook_timeout.is_zero() {
            return Err(bad("events.webhook_timeout", "must be positive"));
        }
        if let Some(url) = &e.webhook_url
            && !(url.starts_with("http://") && url.len() > "http://".len())
        {
            return Err(bad(
                "events.webhook_url",
                "must be an http:// URL (terminate TLS in a local proxy)",
            ));
        }
        self.centrifuge
            .validate(&self.recovery, self.server.echo_path.as_deref())?;
        if self.log.attack_summary_interval < ATTACK_SUMMARY_INTERVAL_MIN {
            return Err(bad("log.attack_summary_interval", "must be at least 100ms"));
        }
        self.cluster
            .validate(self.server.listen, self.control.listen)?;
        Ok(())
    }

    /// What a running server with this configuration applies when asked to reload `next`:
    /// `next`, except that the [`RESTART_KEYS`] keep their running value; those that differ are
    /// listed in `needs_restart`.
    pub fn reloaded(&self, next: &Config) -> Reloaded {
        let mut config = next.clone();
        let mut needs_restart = Vec::new();
        let mut keep = Keep(&mut needs_restart);
        // No `..` in these patterns: a new field does not compile until it is classified here
        // (and, if it needs a restart, listed in RESTART_KEYS, which a test checks).
        let ServerConfig {
            cores,
            listen,
            pin_threads,
            echo_path: _,
            max_connections: _,
            drain_timeout: _,
            shutdown_close_code: _,
            // Read at each upgrade.
            allowed_origins: _,
        } = &mut config.server;
        keep.key("server.cores", &self.server.cores, cores);
        keep.key("server.listen", &self.server.listen, listen);
        keep.key("server.pin_threads", &self.server.pin_threads, pin_threads);
        let LimitsConfig {
            max_message_size,
            max_handshake_bytes: _,
            handshake_timeout: _,
            max_pending_handshakes: _,
            max_outbound_queue_bytes: _,
            max_subscriptions_per_connection: _,
            app_event_queue_capacity: _,
            app_event_queue_bytes: _,
            close_timeout: _,
            fabric_queue_capacity,
            fabric_memory_per_shard,
        } = &mut config.limits;
        let running = &self.limits;
        keep.key(
            "limits.max_message_size",
            &running.max_message_size,
            max_message_size,
        );
        keep.key(
            "limits.fabric_queue_capacity",
            &running.fabric_queue_capacity,
            fabric_queue_capacity,
        );
        keep.key(
            "limits.fabric_memory_per_shard",
            &running.fabric_memory_per_shard,
            fabric_memory_per_shard,
        );
        // The limits are read per connection and per request.
        let ControlConfig {
            enabled,
            listen,
            api_key: _,
            max_connections: _,
            header_timeout: _,
            request_timeout: _,
        } = &mut config.control;
        keep.key("control.enabled", &self.control.enabled, enabled);
        keep.key("control.listen", &self.control.listen, listen);
        let RecoveryConfig {
            enabled,
            buffer_size,
            ttl,
            max_messages,
            max_replay_bytes: _,
            memory_budget,
            max_topics,
        } = &mut config.recovery;
        let running = &self.recovery;
        keep.key("recovery.enabled", &running.enabled, enabled);
        keep.key("recovery.buffer_size", &running.buffer_size, buffer_size);
        keep.key("recovery.ttl", &running.ttl, ttl);
        keep.key("recovery.max_messages", &running.max_messages, max_messages);
        keep.key(
            "recovery.memory_budget",
            &running.memory_budget,
            memory_budget,
        );
        keep.key("recovery.max_topics", &running.max_topics, max_topics);
        let PresenceConfig {
            enabled,
            max_data_size: _,
            max_members: _,
        } = &mut config.presence;
        keep.key("presence.enabled", &self.presence.enabled, enabled);
        // Read per consumer, per batch or per attempt, except what the webhook sender was built
        // with.
        let EventsConfig {
            consumer_queue_capacity: _,
            consumer_queue_bytes: _,
            max_frame_bytes: _,
            webhook_url,
            webhook_batch_size: _,
            webhook_batch_interval: _,
            webhook_max_retries: _,
            webhook_timeout: _,
            webhook_queue_capacity,
            webhook_queue_bytes,
        } = &mut config.events;
        let running = &self.events;
        keep.key("events.webhook_url", &running.webhook_url, webhook_url);
        keep.key(
            "events.webhook_queue_capacity",
            &running.webhook_queue_capacity,
            webhook_queue_capacity,
        );
        keep.key(
            "events.webhook_queue_bytes",
            &running.webhook_queue_bytes,
            webhook_queue_bytes,
        );
        let ClusterConfig {
            enabled,
            node_name,
            listen,
            advertised,
            seeds,
            security,
            tls_ca,
            tls_cert,
            tls_key,
            psk,
            psk_previous,
            core,
            compression,
            batch_max,
            peer_queue_bytes,
            hold_bytes,
            dlq_entries,
            max_members,
            handshake_timeout,
            ping_interval,
            link_timeout,
            probe_timeout,
            suspect_timeout,
            suspect_min,
            rejoin_interval,
            sub_ack_timeout,
        } = &mut config.cluster;
        let running = &self.cluster;
        keep.key("cluster.enabled", &running.enabled, enabled);
        keep.key("cluster.node_name", &running.node_name, node_name);
        keep.key("cluster.listen", &running.listen, listen);
        keep.key("cluster.core", &running.core, core);
        keep.key("cluster.advertised", &running.advertised, advertised);
        keep.key("cluster.seeds", &running.seeds, seeds);
        keep.key("cluster.security", &running.security, security);
        keep.key("cluster.tls_ca", &running.tls_ca, tls_ca);
        keep.key("cluster.tls_cert", &running.tls_cert, tls_cert);
        keep.key("cluster.tls_key", &running.tls_key, tls_key);
        keep.key("cluster.psk", &running.psk, psk);
        keep.key("cluster.psk_previous", &running.psk_previous, psk_previous);
        keep.key("cluster.compression", &running.compression, compression);
        keep.key("cluster.batch_max", &running.batch_max, batch_max);
        keep.key(
            "cluster.peer_queue_bytes",
            &running.peer_queue_bytes,
            peer_queue_bytes,
        );
        keep.key("cluster.hold_bytes", &running.hold_bytes, hold_bytes);
        keep.key("cluster.dlq_entries", &running.dlq_entries, dlq_entries);
        keep.key("cluster.max_members", &running.max_members, max_members);
        keep.key(
            "cluster.handshake_timeout",
            &running.handshake_timeout,
            handshake_timeout,
        );
        keep.key(
            "cluster.ping_interval",
            &running.ping_interval,
            ping_interval,
        );
        keep.key("cluster.link_timeout", &running.link_timeout, link_timeout);
        keep.key(
            "cluster.probe_timeout",
            &running.probe_timeout,
            probe_timeout,
        );
        keep.key(
            "cluster.suspect_timeout",
            &running.suspect_timeout,
            suspect_timeout,
        );
        keep.key("cluster.suspect_min", &running.suspect_min, suspect_min);
        keep.key(
            "cluster.rejoin_interval",
            &running.rejoin_interval,
            rejoin_interval,
        );
        keep.key(
            "cluster.sub_ack_timeout",
            &running.sub_ack_timeout,
            sub_ack_timeout,
        );
        // Every key of [protocol], [auth], [centrifuge] and [log] is live: the shards read the
        // first three per use (auth through a new Authenticator), the binary applies the log
        // filter.
        Reloaded {
            config,
            needs_restart,
        }
    }

    /// The dotted keys whose values differ between `self` and `other`, sorted.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self).unwrap_or_default(),
            serde_json::to_value(other).unwrap_or_default(),
        );
        let mut keys = Vec::new();
        for (section, fields) in a.as_object().into_iter().flatten() {
            for (field, value) in fields.as_object().into_iter().flatten() {
                if b.get(section).and_then(|s| s.get(field)) != Some(value) {
                    keys.push(format!("{section}.{field}"));
                }
            }
        }
        keys
    }

    /// The shard count this configuration asks for, resolving 0 to the online cores.
    pub fn shard_count(&self) -> usize {
        if self.server.cores == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.server.cores
        }
    }

    /// How the cross-shard fabric's memory is split for [`Config::shard_count`] shards.
    ///
    /// # Errors
    /// When `limits.fabric_memory_per_shard` is too small for that many shards.
    pub fn fabric_plan(&self) -> Result<crate::fabric_plan::Plan, crate::fabric_plan::PlanError> {
        crate::fabric_plan::Plan::new(
            self.shard_count(),
            self.limits.fabric_memory_per_shard,
            self.limits.fabric_queue_capacity,
        )
    }
}

/// What [`Config::reloaded`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Reloaded {
    /// The configuration to run with from now on.
    pub config: Config,
    /// Keys of [`RESTART_KEYS`] whose new value differs from the running one; not applied.
    pub needs_restart: Vec<&'static str>,
}

/// Puts a restart key back to its running value, noting it when the new one differs.
struct Keep<'a>(&'a mut Vec<&'static str>);

impl Keep<'_> {
    fn key<T: PartialEq + Clone>(&mut self, key: &'static str, running: &T, next: &mut T) {
        if next != running {
            self.0.push(key);
            *next = running.clone();
        }
    }
}

// ------------------------------------------------------------------------------------------------
// [centrifuge]: the Centrifuge client protocol's endpoint, timing, channel limits and namespaces
// (the Centrifugo options users know). Here rather than in `centrifuge/`, so that the protocol
// module depends on the configuration and not the other way round (layering.rs).
// ------------------------------------------------------------------------------------------------

/// Longest namespace name, bytes (a namespace is a channel's prefix, so it is bounded by the
/// channel's length anyway; this keeps configuration mistakes short).
pub const NAMESPACE_NAME_MAX: usize = 64;

/// The Centrifuge endpoint and its channels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CentrifugeConfig {
    /// Speak the Centrifuge client protocol v2 on `path` of the WebSocket listener, on the
    /// same topics as WSE clients (docs/CENTRIFUGO.md says which commands are served).
    pub enabled: bool,
    /// The endpoint's path (Centrifugo's default). Both encodings share it: JSON, and protobuf
    /// with the `centrifuge-protobuf` subprotocol.
    pub path: String,
    /// Interval between the server's pings (`{}`); sent in the connect reply as `ping`, in
    /// whole seconds.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Time a client has to answer a ping; past it the connection is closed with 3012.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Time after a connection's token expired (not refreshed) before it is closed with 3005.
    #[serde(with = "humantime_serde")]
    pub expired_close_delay: Duration,
    /// Longest channel name, bytes; a longer one is refused with error 107.
    pub channel_max_length: usize,
    /// Channels one connection may be subscribed to (server-side subscriptions included);
    /// past it a subscribe gets error 106.
    pub channel_limit: usize,
    /// Most publications one history reply or recovery returns; a larger recovery answers
    /// `recovered: false`.
    pub history_limit_max: usize,
    /// Time the application's backend has to answer a client's `rpc` (an `rpc` event, answered
    /// by `POST /api/v1/connections/{id}/rpc_reply`); past it the client gets error 100
    /// (temporary). Shorter than the clients' own 5 s command timeout, so they get the error.
    #[serde(with = "humantime_serde")]
    pub rpc_timeout: Duration,
    /// Channel namespaces: the part of a channel name before the first `:` picks one; a
    /// channel without `:` uses the namespace named `""` (all off when there is none). A
    /// channel in a namespace that is not listed is refused with error 102.
    pub namespaces: Vec<NamespaceConfig>,
}

impl Default for CentrifugeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/connection/websocket".to_owned(),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(8),
            expired_close_delay: Duration::from_secs(25),
            channel_max_length: 255,
            channel_limit: 128,
            history_limit_max: 300,
            rpc_timeout: Duration::from_secs(3),
            namespaces: Vec::new(),
        }
    }
}

/// One namespace's options, named as in Centrifugo v5/v6. Unknown keys are refused: the
/// v3-era names (`history_recover`, `publish`, `subscribe_to_publish`) that Centrifugo v5
/// silently ignores are errors here.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    /// The namespace: channels `name:...`. `""` = channels without a namespace.
    pub name: String,
    /// Publications kept per channel (its recovery ring; at most `recovery.buffer_size`).
    /// 0 = no history: no recovery, no positioning, `history` answers 108.
    pub history_size: usize,
    /// How long publications are kept (at most `recovery.ttl`). 0 = no history.
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    /// Every subscription is recoverable, whatever the client asked.
    pub force_recovery: bool,
    /// Every subscription is positioned, whatever the client asked.
    pub force_positioning: bool,
    /// Clients may subscribe without a subscription token.
    pub allow_subscribe_for_client: bool,
    /// Clients may publish.
    pub allow_publish_for_client: bool,
    /// Clients may ask for history (and so recover when they ask to).
    pub allow_history_for_client: bool,
    /// Clients may ask for presence and presence stats.
    pub allow_presence_for_client: bool,
    /// Track who is subscribed (presence); off: presence requests answer 108.
    pub presence: bool,
    /// Send join/leave pushes to subscribers who ask for them (`join_leave` in subscribe).
    pub join_leave: bool,
    /// Send join/leave pushes to every subscriber.
    pub force_push_join_leave: bool,
}

impl NamespaceConfig {
    /// Whether channels of this namespace keep a history (a stream with offsets and an epoch).
    pub fn has_history(&self) -> bool {
        self.history_size > 0 && !self.history_ttl.is_zero()
    }
}

impl CentrifugeConfig {
    /// Checks ranges and the namespaces against the recovery rings they map onto.
    ///
    /// # Errors
    /// The first key at fault.
    pub fn validate(
        &self,
        recovery: &RecoveryConfig,
        echo_path: Option<&str>,
    ) -> Result<(), ConfigError> {
        if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
            return Err(bad("centrifuge.path", "must be a path starting with /"));
        }
        if echo_path == Some(self.path.as_str()) {
            return Err(bad("centrifuge.path", "must differ from server.echo_path"));
        }
        if self.pong_timeout < TIMER_TICK {
            return Err(bad("centrifuge.pong_timeout", "must be at least 50ms"));
        }
        if self.ping_interval < Duration::from_secs(1) || self.ping_interval <= self.pong_timeout {
            return Err(bad(
                "centrifuge.ping_interval",
                "must be at least 1s and longer than centrifuge.pong_timeout",
            ));
        }
        if self.rpc_timeout < TIMER_TICK {
            return Err(bad("centrifuge.rpc_timeout", "must be at least 50ms"));
        }
        if self.channel_max_length == 0 || self.channel_max_length > TOPIC_LEN_MAX {
            return Err(bad(
                "centrifuge.channel_max_length",
                format!("must be 1..={TOPIC_LEN_MAX}"),
            ));
        }
        if self.channel_limit == 0 {
            return Err(bad("centrifuge.channel_limit", "must be at least 1"));
        }
        if self.history_limit_max == 0 {
            return Err(bad("centrifuge.history_limit_max", "must be at least 1"));
        }
        let mut names: Vec<&str> = Vec::with_capacity(self.namespaces.len());
        for ns in &self.namespaces {
            let name = ns.name.as_str();
            let valid = name.is_empty()
                || (name.len() >= 2
                    && name.len() <= NAMESPACE_NAME_MAX
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')));
            if !valid {
                return Err(bad(
                    "centrifuge.namespaces",
                    format!(
                        "namespace {name:?}: a name is \"\" or 2..={NAMESPACE_NAME_MAX} of A-Z a-z 0-9 - _ ."
                    ),
                ));
            }
            if names.contains(&name) {
                return Err(bad(
                    "centrifuge.namespaces",
                    format!("namespace {name:?} is listed twice"),
                ));
            }
            names.push(name);
            if ns.has_history() {
                if !recovery.enabled {
                    return Err(bad(
                        "centrifuge.namespaces",
                        format!(
                            "namespace {name:?} keeps history: it needs recovery.enabled = true"
                        ),
                    ));
                }
                if ns.history_size > recovery.buffer_size || ns.history_ttl > recovery.ttl {
                    return Err(bad(
                        "centrifuge.namespaces",
                        format!(
                            "namespace {name:?}: history_size and history_ttl must be at most \
                             recovery.buffer_size ({}) and recovery.ttl ({})",
                            recovery.buffer_size,
                            humantime_serde::re::humantime::format_duration(recovery.ttl)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_round_trips_through_toml_shape() {
        let c = Config::default();
        c.validate().unwrap();
        let json = serde_json::to_string(&c).unwrap();
        let back: Config = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn idle_must_exceed_ping() {
        let mut c = Config::default();
        c.protocol.idle_timeout = c.protocol.ping_interval;
        assert_eq!(c.validate().unwrap_err().key, "protocol.idle_timeout");
    }

    #[test]
    fn cluster_section_is_validated_and_tls_needs_its_files() {
        let mut c = Config::default();
        c.cluster.listen = "0.0.0.0:5007".parse().unwrap();
        assert_eq!(c.validate().unwrap_err().key, "cluster.listen");
        c.cluster.listen = "127.0.0.1:5008".parse().unwrap();
        assert_eq!(c.validate().unwrap_err().key, "cluster.listen");
        c.cluster.listen = "10.0.0.1:9999".parse().unwrap();
        c.cluster.security = ClusterSecurity::None;
        assert_eq!(c.validate().unwrap_err().key, "cluster.security");
        c.cluster.listen = "127.0.0.2:9999".parse().unwrap();
        c.validate().unwrap();
        c.cluster.seeds = vec!["10.0.0.2".into()];
        assert_eq!(c.validate().unwrap_err().key, "cluster.seeds");
        c.cluster.seeds = vec!["node2.example:9999".into(), "[::1]:9999".into()];
        c.validate().unwrap();
        c.cluster.security = ClusterSecurity::Psk;
        c.cluster.psk = Some("short".into());
        assert_eq!(c.validate().unwrap_err().key, "cluster.psk");
        c.cluster.psk = Some("k".repeat(32));
        c.cluster.ping_interval = Duration::from_secs(3);
        assert_eq!(c.validate().unwrap_err().key, "cluster.link_timeout");
        c.cluster.ping_interval = Duration::from_secs(1);
        c.validate().unwrap();
        // PSK enables.
        c.cluster.enabled = true;
        c.validate().unwrap();
        // A wildcard listener needs an address peers can dial.
        c.cluster.listen = "0.0.0.0:9999".parse().unwrap();
        assert_eq!(c.validate().unwrap_err().key, "cluster.advertised");
        c.cluster.advertised = Some("node1.example:9999".into());
        c.validate().unwrap();
        c.cluster.advertised = None;
        c.cluster.listen = "127.0.0.2:9999".parse().unwrap();
        c.cluster.security = ClusterSecurity::Tls;
        assert_eq!(c.validate().unwrap_err().key, "cluster.tls_ca");
        let here = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        c.cluster.tls_ca = Some(here.clone());
        c.cluster.tls_cert = Some(here.clone());
        assert_eq!(c.validate().unwrap_err().key, "cluster.tls_key");
        c.cluster.tls_key = Some(here.with_file_name("no-such-key.pem"));
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "cluster.tls_key");
        assert!(e.to_string().contains("no such file"), "{e}");
        c.cluster.tls_key = Some(here);
        c.validate().unwrap();
    }

    #[test]
    fn hs256_needs_a_long_secret() {
        let mut c = Config::default();
        c.auth.enabled = true;
        assert_eq!(c.validate().unwrap_err().key, "auth.secret");
        c.auth.secret = Some("short".into());
        assert_eq!(c.validate().unwrap_err().key, "auth.secret");
        c.auth.secret = Some("x".repeat(32));
        c.validate().unwrap();
    }

    #[test]
    fn reload_keeps_exactly_the_restart_keys() {
        let running = Config::default();
        let mut next = Config::default();
        next.server.cores = 3;
        next.server.listen = "127.0.0.1:1".parse().unwrap();
        next.server.pin_threads = false;
        next.limits.max_message_size = 4096;
        next.limits.fabric_queue_capacity = 128;
        next.limits.fabric_memory_per_shard = 5 << 20;
        next.control.enabled = false;
        next.control.listen = "127.0.0.1:2".parse().unwrap();
        next.recovery.enabled = true;
        next.recovery.buffer_size = 8;
        next.recovery.ttl = Duration::from_secs(1);
        next.recovery.max_messages = 1;
        next.recovery.memory_budget = 1 << 20;
        next.recovery.max_topics = 1;
        next.presence.enabled = true;
        next.events.webhook_url = Some("http://127.0.0.1:9/hook".into());
        next.events.webhook_queue_capacity = 7;
        next.events.webhook_queue_bytes = 7;
        next.cluster.enabled = true;
        next.cluster.node_name = "n2".into();
        next.cluster.listen = "127.0.0.1:3".parse().unwrap();
        next.cluster.core = Some(1);
        next.cluster.advertised = Some("n2:9999".into());
        next.cluster.seeds = vec!["n1:9999".into()];
        next.cluster.security = ClusterSecurity::Psk;
        next.cluster.tls_ca = Some("ca.pem".into());
        next.cluster.tls_cert = Some("cert.pem".into());
        next.cluster.tls_key = Some("key.pem".into());
        next.cluster.psk = Some("k".repeat(32));
        next.cluster.psk_previous = Some("j".repeat(32));
        next.cluster.compression = ClusterCompression::Off;
        next.cluster.batch_max = 8192;
        next.cluster.peer_queue_bytes = 1 << 20;
        next.cluster.hold_bytes = 1 << 20;
        next.cluster.dlq_entries = 16;
        next.cluster.max_members = 8;
        next.cluster.handshake_timeout = Duration::from_secs(1);
        next.cluster.ping_interval = Duration::from_millis(500);
        next.cluster.link_timeout = Duration::from_secs(2);
        next.cluster.probe_timeout = Duration::from_millis(200);
        next.cluster.suspect_timeout = Duration::from_secs(3);
        next.cluster.suspect_min = Duration::from_millis(500);
        next.cluster.rejoin_interval = Duration::from_secs(1);
        next.cluster.sub_ack_timeout = Duration::from_millis(100);
        let r = running.reloaded(&next);
        assert_eq!(r.needs_restart, RESTART_KEYS);
        assert_eq!(
            r.config, running,
            "every restart key keeps its running value"
        );
        let mut keys = RESTART_KEYS;
        keys.sort_unstable();
        assert_eq!(running.changed_keys(&next), keys);
    }

    #[test]
    fn reload_applies_every_other_key() {
        let running = Config::default();
        let mut next = Config::default();
        next.server.max_connections = 7;
        next.server.echo_path = Some("/echo".into());
        next.server.drain_timeout = Duration::from_secs(1);
        next.server.shutdown_close_code = 4001;
        next.limits.max_outbound_queue_bytes = 1 << 16;
        next.limits.close_timeout = Duration::from_secs(1);
        next.protocol.idle_timeout = Duration::from_secs(90);
        next.protocol.rate_limit_capacity = 3;
        next.auth.enabled = true;
        next.auth.secret = Some("s".repeat(32));
        next.auth.previous_secret = Some("p".repeat(32));
        next.control.api_key = Some("k".repeat(16));
        next.log.level = "debug".into();
        next.events.consumer_queue_capacity = 9;
        next.events.webhook_batch_size = 3;
        let r = running.reloaded(&next);
        assert!(r.needs_restart.is_empty(), "{:?}", r.needs_restart);
        assert_eq!(r.config, next);
        let changed = running.changed_keys(&next);
        assert_eq!(changed.len(), 15, "{changed:?}");
        assert!(changed.contains(&"auth.previous_secret".to_owned()));
    }
}

#[cfg(test)]
mod centrifuge_section_tests {
    use super::*;
    use crate::Config;

    fn with(namespaces: Vec<NamespaceConfig>) -> Config {
        let mut c = Config::default();
        c.recovery.enabled = true;
        c.centrifuge.namespaces = namespaces;
        c
    }

    fn ns(name: &str) -> NamespaceConfig {
        NamespaceConfig {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn namespaces_are_checked_by_name_and_against_the_recovery_rings() {
        with(vec![ns("room"), ns("user"), ns("")])
            .validate()
            .unwrap();
        for bad in [
            "a",
            "no:colon",
            "sp ace",
            &"x".repeat(NAMESPACE_NAME_MAX + 1),
        ] {
            let e = with(vec![ns(bad)]).validate().unwrap_err();
            assert_eq!(e.key, "centrifuge.namespaces", "{bad}");
        }
        let e = with(vec![ns("room"), ns("room")]).validate().unwrap_err();
        assert!(e.problem.contains("twice"), "{e}");

        let history = NamespaceConfig {
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            ..ns("room")
        };
        with(vec![history.clone()]).validate().unwrap();
        let mut off = with(vec![history.clone()]);
        off.recovery.enabled = false;
        assert!(
            off.validate()
                .unwrap_err()
                .problem
                .contains("recovery.enabled")
        );
        let too_big = NamespaceConfig {
            history_size: 257,
            ..history.clone()
        };
        assert!(
            with(vec![too_big])
                .validate()
                .unwrap_err()
                .problem
                .contains("recovery.buffer_size (256)")
        );
        let too_long = NamespaceConfig {
            history_ttl: Duration::from_secs(301),
            ..history
        };
        with(vec![too_long]).validate().unwrap_err();
    }

    #[test]
    fn timing_and_path_are_checked() {
        let mut c = Config::default();
        c.centrifuge.ping_interval = c.centrifuge.pong_timeout;
        assert_eq!(c.validate().unwrap_err().key, "centrifuge.ping_interval");
        let mut c = Config::default();
        c.centrifuge.path = "connection".into();
        assert_eq!(c.validate().unwrap_err().key, "centrifuge.path");
        let mut c = Config::default();
        c.server.echo_path = Some(c.centrifuge.path.clone());
        assert_eq!(c.validate().unwrap_err().key, "centrifuge.path");
        let mut c = Config::default();
        c.centrifuge.channel_max_length = crate::config::TOPIC_LEN_MAX + 1;
        assert_eq!(
            c.validate().unwrap_err().key,
            "centrifuge.channel_max_length"
        );
    }
}
