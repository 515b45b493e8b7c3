//! Per-shard counters and gauges, written by their shard only and read by the control plane.
//!
//! Owns: the figures `/metrics` and `/health` report. Never: aggregates (the control plane sums
//! shards at scrape time) or formats.
//!
//! Each [`Counter`] has exactly one writer, its shard, so an increment is a plain load and store
//! (no locked read-modify-write on the hot path); readers on other threads see a recent value.
//! The struct is cache-line aligned so shards never share a line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::auth::AuthError;
use crate::close::CloseCode;

/// A single-writer counter or gauge.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning shard may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    /// Adds 1. Only the owning shard may call this.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    /// Sets a gauge. Only the owning shard may call this.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// The current value; any thread may read it.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why a message or connection was dropped; the `reason` label of `wse_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A subscriber's outbound queue overflowed; it was evicted with 4413.
    SlowConsumer,
    /// A cross-shard queue and its overflow were full.
    FabricOverflow,
    /// The inbound rate limit dropped a client message.
    RateLimited,
    /// The application event queue was full; the oldest event was dropped.
    AppEventOverflow,
    /// A message for a connection that had already gone.
    ConnectionGone,
    /// A queue-group publication reached the shard picked for it when that shard had no member
    /// of the group left (all left or were evicted after the owner picked).
    QueueGroupNoMember,
    /// A recovery replay refused (answered `recovered: false`) because the connection already
    /// had `recovery.max_replay_bytes` of replays queued and unread.
    ReplayOverBudget,
    /// A client message nested deeper than `protocol::JSON_DEPTH_MAX`; refused with
    /// `INVALID_MESSAGE`, relayed nowhere.
    JsonTooDeep,
}

impl DropReason {
    /// Every reason, in the order of [`ShardMetrics::dropped`]'s slots.
    pub const ALL: [DropReason; 8] = [
        DropReason::SlowConsumer,
        DropReason::FabricOverflow,
        DropReason::RateLimited,
        DropReason::AppEventOverflow,
        DropReason::ConnectionGone,
        DropReason::QueueGroupNoMember,
        DropReason::ReplayOverBudget,
        DropReason::JsonTooDeep,
    ];
    /// The `reason` label value in `wse_dropped_total`.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::FabricOverflow => "fabric_overflow",
            DropReason::RateLimited => "rate_limited",
            DropReason::AppEventOverflow => "app_event_overflow",
            DropReason::ConnectionGone => "connection_gone",
            DropReason::QueueGroupNoMember => "queue_group_no_member",
            DropReason::ReplayOverBudget => "replay_over_budget",
            DropReason::JsonTooDeep => "json_too_deep",
        }
    }
}

/// Why a connection attempt was refused; the `reason` label of `wse_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// Over `server.max_connections` (closed with 1013 after the upgrade).
    MaxConnections,
    /// Over `limits.max_pending_handshakes` (HTTP 503).
    PendingHandshakes,
    /// Not a valid WebSocket upgrade (HTTP 4xx).
    BadHandshake,
    /// The upgrade did not complete within `limits.handshake_timeout`.
    HandshakeTimeout,
    /// `accept` failed for lack of file descriptors.
    FdLimit,
    /// A browser `Origin` that `server.allowed_origins` does not list (HTTP 403).
    Origin,
}

impl RejectReason {
    /// Every reason, in the order of [`ShardMetrics::rejected`]'s slots.
    pub const ALL: [RejectReason; 6] = [
        RejectReason::MaxConnections,
        RejectReason::PendingHandshakes,
        RejectReason::BadHandshake,
        RejectReason::HandshakeTimeout,
        RejectReason::FdLimit,
        RejectReason::Origin,
    ];
    /// The `reason` label value in `wse_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::MaxConnections => "max_connections",
            RejectReason::PendingHandshakes => "pending_handshakes",
            RejectReason::BadHandshake => "bad_handshake",
            RejectReason::HandshakeTimeout => "handshake_timeout",
            RejectReason::FdLimit => "fd_limit",
            RejectReason::Origin => "origin",
        }
    }
}

/// Close codes we count separately in `wse_closes_total{code}`; others count as `other`.
pub const COUNTED_CLOSE_CODES: [u16; 12] = [
    CloseCode::Normal.code(),
    CloseCode::GoingAway.code(),
    CloseCode::ProtocolError.code(),
    CloseCode::InvalidPayload.code(),
    CloseCode::MessageTooBig.code(),
    CloseCode::InternalError.code(),
    CloseCode::TryAgainLater.code(),
    CloseCode::Shutdown.code(),
    CloseCode::Unauthorized.code(),
    CloseCode::IdleTimeout.code(),
    CloseCode::SlowConsumer.code(),
    CloseCode::RateLimited.code(),
];

/// Upper bounds (seconds) of the handshake latency histogram buckets.
pub const HANDSHAKE_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

/// A fixed-bucket latency histogram with single-writer buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts; the last slot is +Inf.
    pub buckets: [Counter; HANDSHAKE_BUCKETS.len() + 1],
    /// Sum of the observed durations, in microseconds.
    pub sum_micros: Counter,
    /// How many durations were observed.
    pub count: Counter,
}

impl Histogram {
    /// Records one duration in its bucket, the sum and the count.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = HANDSHAKE_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(HANDSHAKE_BUCKETS.len());
        self.buckets[i].inc();
        self.sum_micros.add(d.as_micros() as u64);
        self.count.inc();
    }
}

/// Everything one shard reports.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// Gauge: WebSocket connections past the upgrade and not yet released.
    pub connections: Counter,
    /// Gauge: sockets this shard holds (any phase); what connection balancing compares.
    pub sockets: Counter,
    /// Fresh sockets this shard accepted and handed to a less loaded shard.
    pub handed_off_total: Counter,
    /// Gauge: sockets still in the HTTP upgrade.
    pub handshakes_pending: Counter,
    /// Sockets accepted by this shard's listener.
    pub connections_accepted_total: Counter,
    /// Connections released by this shard, whatever the reason.
    pub connections_closed_total: Counter,
    /// Inbound data messages (after reassembly), and their bytes.
    pub messages_in_total: Counter,
    /// Bytes read from sockets.
    pub bytes_in_total: Counter,
    /// Frames queued to connections (any kind), and bytes written to sockets.
    pub messages_out_total: Counter,
    /// Bytes written to sockets.
    pub bytes_out_total: Counter,
    /// Topic publications queued to subscribers (one per subscriber per publication).
    pub deliveries_total: Counter,
    /// Publications sequenced by this shard as a topic owner.
    pub publications_total: Counter,
    /// Connections refused because their token did not verify.
    pub auth_failures_total: Counter,
    /// `auth_failures_total` by why, in [`AuthError::ALL`] order (for the attack summary).
    pub auth_failures: [Counter; AuthError::ALL.len()],
    /// Inbound messages dropped by the rate limit.
    pub rate_limited_total: Counter,
    /// Client messages of application types, queued for the event stream.
    pub app_events_total: Counter,
    /// Gauge: application events waiting in this shard's queue.
    pub app_event_queue_depth: Counter,
    /// Gauge: topics this shard owns that have a recovery history ring (sampled each turn).
    pub recovery_topics: Counter,
    /// Gauge: bytes this shard holds for recovery history (allocated and touched at start).
    pub recovery_bytes: Counter,
    /// Gauge: topics this shard owns with at least one presence member.
    pub presence_topics: Counter,
    /// Gauge: presence members (distinct users per topic) over the topics this shard owns.
    pub presence_users: Counter,
    /// Gauge: cross-shard entries waiting in this shard's inbound queues (sampled each turn).
    pub fabric_inbound_depth: Counter,
    /// Gauge: entries held back because a destination's queue was full.
    pub fabric_overflow_depth: Counter,
    /// Gauge: bytes this shard has sent across the fabric that their destination has not taken
    /// yet (bounded by `limits.fabric_memory_per_shard` less the shard's queue slots).
    pub fabric_inflight_bytes: Counter,
    /// Drops by [`DropReason`], in [`DropReason::ALL`] order.
    pub dropped: [Counter; DropReason::ALL.len()],
    /// Refused connection attempts by [`RejectReason`], in [`RejectReason::ALL`] order.
    pub rejected: [Counter; RejectReason::ALL.len()],
    /// By [`COUNTED_CLOSE_CODES`], the last slot for any other code.
    pub closes: [Counter; COUNTED_CLOSE_CODES.len() + 1],
    /// Accept to `server_ready` queued.
    pub handshake_latency: Histogram,
    /// Loop turns completed: the shard's heartbeat, which the binary's watchdog reads.
    pub loop_turns: Counter,
}

impl ShardMetrics {
    /// The counter for `reason`.
    pub fn dropped(&self, reason: DropReason) -> &Counter {
        &self.dropped[DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0)]
    }
    /// The counter for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> &Counter {
        &self.rejected[RejectReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0)]
    }
    /// Counts one connection closed with `code`.
    pub fn closed_with(&self, code: u16) {
        self.closes(code).inc();
    }
    /// Connections closed with `code` (the `other` slot for codes not in
    /// [`COUNTED_CLOSE_CODES`]).
    pub fn closes(&self, code: u16) -> &Counter {
        let i = COUNTED_CLOSE_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(COUNTED_CLOSE_CODES.len());
        &self.closes[i]
    }
    /// A connection refused for failed authentication: the total and the reason's count.
    pub fn auth_failed(&self, why: &AuthError) {
        self.auth_failures_total.inc();
        if let Some(i) = AuthError::ALL.iter().position(|e| e == why) {
            self.auth_failures[i].inc();
        }
    }
}
