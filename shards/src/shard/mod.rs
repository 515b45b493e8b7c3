//! One shard: everything one core owns — its connections, its topic table, its timer wheel, its
//! end of the fabric and its application event queue — and the rules that tie them together.
//!
//! Owns: connection slots, subscribe/publish routing, fan-out to local subscribers, pending
//! subscribe acknowledgements, deadlines, drain. Never: reads sockets or clocks, or blocks; the
//! I/O layer (`runtime`) feeds it bytes, readiness and the time, and calls [`Shard::flush`] once
//! per loop turn, which writes each connection with pending output once (all its queued frames
//! in one `writev`).
//!
//! Calling order per loop turn: any number of `accept` / `handle_bytes` / `handle_eof` /
//! `release` / `handle_writable` (as I/O completes), then `handle_fabric`, `handle_timers`,
//! `flush`.
//!
//! The rules live in submodules: `subscriptions` (a subscriber's shard), `owner` (a topic's
//! owner: sequencing, history, interest, presence, queue-group picks) and `publications`
//! (routing and fan-out).

mod commands;
mod dedup;
mod drain;
mod owner;
mod presence_events;
mod publications;
mod subscriptions;
mod users;

pub use dedup::SEND_DEDUP_WINDOW;
pub use drain::{DRAIN_BATCH_INTERVAL, DRAIN_CLOSE_SPREAD_PERCENT};
pub use presence_events::PRESENCE_LEAVE_WAIT;

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use bytes::Bytes;
use slab::Slab;

use crate::alarms::{AUTH_REFUSAL_LINES_PER_SEC, AttackSummary, LineBudget};
use crate::auth::AuthError;
use crate::auth::{Acl, Authenticator};
use crate::command::{Command, CommandError, SubscribeOutcome};
use crate::config::{Config, ProtocolConfig};
use crate::conn::{Conn, ConnEvent, ConnId, Cx};
use crate::fabric::{Endpoint, FabricMsg, Responder, Sent};
use crate::handshake;
use crate::inbound::{AppEvent, AppEventKind};
use crate::metrics::{DropReason, RejectReason, ShardMetrics};
use crate::protocol::{self, Clock};
use crate::queue_groups::GroupName;
use crate::ratelimit::RateLimits;
use crate::recovery::History;
use crate::timer::{Tick, TimerWheel};
use crate::topics::{ConnKey, Topics};

/// Frames handed to one `writev`. Linux accepts 1024; 64 covers any realistic backlog per turn
/// while keeping the slice array on the stack.
const IOV_PER_WRITE: usize = 64;
/// Cross-shard entries taken from one sender per turn, so one busy peer cannot starve others.
const FABRIC_BATCH_PER_SOURCE: usize = 4096;
/// A shard holding this many more sockets than the least loaded one hands fresh connections to
/// it. The kernel spreads connections by hash (or, with SO_INCOMING_CPU, by the core that handled
/// the packets, which on loopback is the client's), so imbalance is the rule for few clients.
pub const BALANCE_SLACK: u64 = 8;

/// The global cap on live connections (`server.max_connections`). Touched on upgrade and release
/// only, never per message.
#[derive(Debug)]
pub struct Admission {
    live: AtomicUsize,
    /// Changed by a reload; lowering it closes no connection, it only refuses new ones.
    max: AtomicUsize,
}

impl Admission {
    /// A budget of `max` live connections, none taken.
    pub fn new(max: usize) -> Self {
        Self {
            live: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }
    /// Changes the cap (reload); connections over a lowered cap stay.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }
    /// Takes a place if one is free.
    pub fn try_admit(&self) -> bool {
        if self.live.fetch_add(1, Ordering::AcqRel) >= self.max.load(Ordering::Relaxed) {
            self.live.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }
    /// Gives a place back; exactly once per successful [`Admission::try_admit`].
    pub fn release(&self) {
        let before = self.live.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "admission released more often than taken");
    }
    /// Places taken now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

/// State every shard reads; built once at start.
#[derive(Debug)]
pub struct Shared {
    /// The configuration and verifier at start. Each shard keeps its own current copies, which a
    /// reload replaces ([`FabricMsg::Reload`]); only boot reads these.
    pub cfg: Arc<Config>,
    /// The JWT verifier at start; `None` when authentication is off.
    pub auth: Option<Arc<Authenticator>>,
    /// The server-wide connection budget, shared by every shard.
    pub admission: Admission,
    /// Set once by a shutdown request; every shard then drains.
    pub shutdown: AtomicBool,
    /// How many shards run.
    pub shards: usize,
    /// Every shard's metrics, in shard order; a shard reads the others' socket gauges to
    /// balance connections (on accept only).
    pub metrics: Vec<Arc<ShardMetrics>>,
}

/// A new running configuration, sent by `Server::reload` to every shard in a
/// [`FabricMsg::Reload`]. A shard swaps it in between two connection events, so each event sees
/// one configuration; connections keep what they already derived (an authenticated identity, a
/// deadline already armed).
#[derive(Debug)]
pub struct Reload {
    /// The configuration to run with from now on.
    pub cfg: Arc<Config>,
    /// The verifier built from it (`None`: authentication off).
    pub auth: Option<Arc<Authenticator>>,
    /// Each shard sends its id once it runs with the new configuration.
    applied: mpsc::Sender<usize>,
}

impl Reload {
    /// The message, and the receiver on which the shards confirm.
    pub fn new(
        cfg: Arc<Config>,
        auth: Option<Arc<Authenticator>>,
    ) -> (Arc<Reload>, mpsc::Receiver<usize>) {
        let (tx, rx) = mpsc::channel();
        let reload = Reload {
            cfg,
            auth,
            applied: tx,
        };
        (Arc::new(reload), rx)
    }
}

/// The socket side of a connection, as the shard needs it.
pub trait Transport {
    /// One non-blocking `writev`.
    ///
    /// # Errors
    /// `WouldBlock` when the socket buffer is full; anything else means the socket is dead.
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// `shutdown(2)`; errors are irrelevant (the socket is going away either way).
    fn shutdown(&self, how: Shutdown);
    /// The peer's address, for the log (`None` when unknown: not a socket, or already gone).
    fn peer_addr(&self) -> Option<SocketAddr> {
        None
    }
}

struct Slot<T> {
    conn: Conn,
    io: T,
    /// The wheel tick of this connection's current timer entry.
    armed: Option<Tick>,
    /// Listed in `Shard::dirty`.
    dirty: bool,
    /// The socket returned `WouldBlock`; the I/O layer calls `handle_writable` when it drains.
    write_blocked: bool,
    /// `shutdown(Write)` done (after the final close frame).
    write_shut: bool,
    upgraded: bool,
}

/// A subscribe acknowledgement waiting for the owners of some of its topics.
struct PendingAck {
    conn: ConnId,
    /// Where the outcome goes when the application asked (else to the client, as a frame).
    reply: Option<Responder<Result<SubscribeOutcome, CommandError>>>,
    /// Owner replies (or interest confirmations) still awaited.
    remaining: u32,
    succeeded: Vec<String>,
    failed: Vec<protocol::FailedTopic>,
    recovery: Vec<(String, protocol::RecoveryInfo)>,
}

/// One core's state: its connections, topic table, timers, fabric endpoint and queues.
/// Driven by `runtime` through a [`Transport`] that does the actual socket I/O.
pub struct Shard<T: Transport> {
    me: usize,
    shared: Arc<Shared>,
    /// The running configuration and verifier: `shared`'s at start, then each reload's.
    cfg: Arc<Config>,
    auth: Option<Arc<Authenticator>>,
    rate: RateLimits,
    default_publish: Acl,
    metrics: Arc<ShardMetrics>,
    conns: Slab<Slot<T>>,
    serial: u32,
    topics: Topics,
    timers: TimerWheel,
    fabric: Endpoint,
    /// Connections with output queued this turn (each listed once).
    dirty: Vec<ConnKey>,
    events: Vec<ConnEvent>,
    inbox: Vec<(usize, FabricMsg)>,
    expired: Vec<(u32, Tick)>,
    evict: Vec<ConnKey>,
    ping: Option<Bytes>,
    /// The history of the topics this shard owns (recovery on).
    history: Option<History>,
    pending_acks: HashMap<u64, PendingAck>,
    next_request: u64,
    /// Scratch for the queue-group picks of one publication (kept to reuse its allocation).
    group_picks: Vec<(usize, Arc<GroupName>)>,
    /// Application events for the event stream, oldest first. Bounded by
    /// `limits.app_event_queue_capacity` events and `limits.app_event_queue_bytes` bytes; past
    /// either the oldest is dropped and counted (`app_event_overflow`).
    app_events: VecDeque<AppEvent>,
    app_event_bytes: usize,
    /// A `TakeEvents` waiting for events: (max, responder). At most one (one consumer).
    event_waiter: Option<(usize, Responder<Vec<AppEvent>>)>,
    /// Live connections by user, for `send_user`.
    users: users::Users,
    /// Presence departures awaited from topic owners, and the `disconnect`s waiting for them.
    awaited_leaves: presence_events::AwaitedLeaves,
    /// Event ids recently sent per connection, for `send_event` deduplication.
    recent_ids: dedup::RecentIds,
    /// Connections whose socket filled up outside `flush`, reported by the next `flush`.
    blocked: Vec<ConnKey>,
    /// Sockets other shards handed over, for the I/O layer to adopt.
    adopted: Vec<OwnedFd>,
    /// Sockets handed to each shard since the last flush (their gauges lag by a turn).
    handed: Vec<u64>,
    handshakes: usize,
    /// Connections refused after the upgrade and not yet released (see `conn::REFUSED_LINGER`).
    refused_lingering: usize,
    draining_until: Option<Instant>,
    /// The close frames a drain has still to send, in batches (see `drain`).
    drain_closes: Option<drain::DrainCloses>,
    /// Logs what this shard refused, once per kind and `log.attack_summary_interval`.
    alarms: AttackSummary,
    /// Scratch for the summary's lines (kept to reuse its allocation).
    alarm_lines: Vec<String>,
    /// Authentication refusals logged one by one, at most `AUTH_REFUSAL_LINES_PER_SEC`.
    auth_refusal_log: LineBudget,
}

impl<T: Transport> Shard<T> {
    /// A shard with no connections, its history allocated when recovery is on.
    pub fn new(
        me: usize,
        shared: Arc<Shared>,
        fabric: Endpoint,
        metrics: Arc<ShardMetrics>,
        now: Instant,
    ) -> Self {
        let cfg = shared.cfg.clone();
        let auth = shared.auth.clone();
        let rate = rate_limits(&cfg.protocol);
        let default_publish = Acl::new(cfg.auth.default_publish.clone(), Vec::new());
        let shards = shared.shards;
        let history = cfg
            .recovery
            .enabled
            .then(|| History::new(&cfg.recovery, shards));
        let alarms = AttackSummary::new(now, cfg.log.attack_summary_interval, &metrics);
        Self {
            me,
            topics: Topics::new(me, shared.shards),
            shared,
            cfg,
            auth,
            rate,
            default_publish,
            metrics,
            conns: Slab::new(),
            serial: 0,
            timers: TimerWheel::new(now),
            fabric,
            dirty: Vec::new(),
            events: Vec::new(),
            inbox: Vec::new(),
            expired: Vec::new(),
            evict: Vec::new(),
            ping: None,
            history,
            pending_acks: HashMap::new(),
            next_request: 0,
            group_picks: Vec::new(),
            app_events: VecDeque::new(),
            app_event_bytes: 0,
            event_waiter: None,
            users: users::Users::default(),
            recent_ids: dedup::RecentIds::default(),
            awaited_leaves: Default::default(),
            blocked: Vec::new(),
            adopted: Vec::new(),
            handed: vec![0; shards],
            handshakes: 0,
            refused_lingering: 0,
            draining_until: None,
            drain_closes: None,
            alarms,
            alarm_lines: Vec::new(),
            auth_refusal_log: LineBudget::new(AUTH_REFUSAL_LINES_PER_SEC),
        }
    }

    /// This shard's index.
    pub fn id(&self) -> usize {
        self.me
    }

    /// Connections this shard holds (any phase).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// A drain has started: no new connections, existing ones are being closed.
    pub fn is_draining(&self) -> bool {
        self.draining_until.is_some()
    }

    /// Draining and either every connection is gone (its `disconnect` reported) or the drain
    /// deadline has passed.
    pub fn is_drained(&self, now: Instant) -> bool {
        self.draining_until.is_some_and(|until| {
            (self.conns.is_empty() && !self.awaited_leaves.holds_disconnects()) || now >= until
        })
    }

    /// When the shard next needs `handle_timers`.
    pub fn next_deadline(&self) -> Option<Instant> {
        let t = self.timers.next_expiry();
        let drain = self.drain_closes.as_ref().and_then(|d| d.poll_timeout());
        let leaves = self.awaited_leaves.poll_timeout();
        let t = [t, self.draining_until, drain, leaves]
            .into_iter()
            .flatten()
            .min();
        let alarms = self.alarms.poll_timeout();
        Some(t.map_or(alarms, |t| t.min(alarms)))
    }

    /// Whether cross-shard entries are waiting (the loop should not park).
    pub fn has_fabric_work(&self) -> bool {
        self.fabric.inbound_depth() > 0 || self.fabric.overflow_depth() > 0
    }

    /// The socket of connection `key`.
    pub fn socket(&self, key: ConnKey) -> Option<T>
    where
        T: Clone,
    {
        self.conns.get(key as usize).map(|s| s.io.clone())
    }

    /// The application events waiting for the event stream (oldest first).
    pub fn app_events(&self) -> &VecDeque<AppEvent> {
        &self.app_events
    }

    // --------------------------------------------------------------------------------------------
    // Input from the I/O layer
    // --------------------------------------------------------------------------------------------

    /// Decides where a freshly accepted socket is served: `Some(fd)` here, `None` when it was
    /// handed to a less loaded shard.
    pub fn place(&mut self, fd: OwnedFd) -> Option<OwnedFd> {
        if self.is_draining() || self.shared.shards == 1 {
            return Some(fd);
        }
        let load = |s: usize, me: &Self| me.shared.metrics[s].sockets.get() + me.handed[s];
        let mine = self.conns.len() as u64;
        let (target, least) = (0..self.shared.shards)
            .filter(|&s| s != self.me)
            .map(|s| (s, load(s, self)))
            .min_by_key(|&(_, l)| l)
            .expect("more than one shard");
        if mine <= least + BALANCE_SLACK {
            return Some(fd);
        }
        match self.fabric.send(target, FabricMsg::Adopt { fd }) {
            Sent::Queued => {
                self.handed[target] += 1;
                self.metrics.handed_off_total.inc();
            }
            Sent::Dropped => self.metrics.dropped(DropReason::FabricOverflow).inc(),
        }
        None
    }

    /// Sockets handed over by other shards since the last call, to be accepted here.
    pub fn take_adopted(&mut self, into: &mut Vec<OwnedFd>) {
        into.append(&mut self.adopted);
    }

    /// Takes a freshly accepted socket. `None` when refused (too many handshakes in flight); the
    /// refusal has been written and the socket should be dropped.
    pub fn accept(&mut self, io: T, clock: Clock) -> Option<ConnKey> {
        self.metrics.connections_accepted_total.inc();
        if self.handshakes >= self.cfg.limits.max_pending_handshakes || self.is_draining() {
            self.metrics.rejected(RejectReason::PendingHandshakes).inc();
            let reply = handshake::response_reject(&handshake::Reject {
                status: 503,
                reason: "Service Unavailable",
            });
            let _ = io.write_vectored(&[IoSlice::new(&reply)]);
            io.shutdown(Shutdown::Both);
            return None;
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key() as ConnKey;
        self.serial = self.serial.wrapping_add(1);
        let conn = Conn::new(ConnId::new(self.me, self.serial, key), clock.now);
        tracing::debug!(shard = self.me, conn = %conn.id(), peer = %Peer(io.peer_addr()), "accepted");
        entry.insert(Slot {
            conn,
            io,
            armed: None,
            dirty: false,
            write_blocked: false,
            write_shut: false,
            upgraded: false,
        });
        self.handshakes += 1;
        self.metrics.handshakes_pending.set(self.handshakes as u64);
        self.metrics.sockets.set(self.conns.len() as u64);
        self.rearm(key);
        Some(key)
    }

    /// Bytes read from connection `key`.
    pub fn handle_bytes(&mut self, key: ConnKey, data: &mut [u8], clock: Clock) {
        self.with_conn(key, clock, |c, cx| c.handle_bytes(data, cx));
    }

    /// The peer closed, or the socket failed.
    pub fn handle_eof(&mut self, key: ConnKey, clock: Clock) {
        self.with_conn(key, clock, |c, cx| c.handle_eof(cx));
    }

    /// The socket of `key` can take more bytes.
    pub fn handle_writable(&mut self, key: ConnKey) {
        if let Some(slot) = self.conns.get_mut(key as usize) {
            slot.write_blocked = false;
            mark_dirty(&mut self.dirty, slot, key);
        }
    }

    /// The I/O task of `key` has finished: the slot and everything it holds go.
    pub fn release(&mut self, key: ConnKey, clock: Clock) {
        if self
            .conns
            .get(key as usize)
            .is_some_and(|s| !s.conn.is_closed())
        {
            // Released without passing through Closed (socket error): tidy up as for EOF.
            self.handle_eof(key, clock);
        }
        let Some(slot) = self.conns.try_remove(key as usize) else {
            return;
        };
        if slot.dirty {
            // Unlisted, so a successor in the slot is not listed twice ("each listed once").
            self.dirty.retain(|&k| k != key);
        }
        if slot.conn.is_handshaking() {
            self.handshakes -= 1;
            self.metrics.handshakes_pending.set(self.handshakes as u64);
        }
        if slot.conn.admitted {
            self.shared.admission.release();
        }
        if slot.conn.was_refused() {
            self.refused_lingering -= 1;
        }
        if slot.upgraded {
            self.metrics
                .connections
                .set(self.metrics.connections.get().saturating_sub(1));
        }
        match slot.conn.close_code() {
            Some(code) => tracing::debug!(shard = self.me, conn = %slot.conn.id(), code, "closed"),
            None => {
                tracing::debug!(shard = self.me, conn = %slot.conn.id(), "closed without a close frame")
            }
        }
        self.metrics.connections_closed_total.inc();
        self.metrics.sockets.set(self.conns.len() as u64);
    }

    /// Starts a graceful shutdown: every connection gets `server.shutdown_close_code` and
    /// `server.drain_timeout` to go; the close frames are spread over part of it (see
    /// [`DRAIN_CLOSE_SPREAD_PERCENT`]).
    pub fn begin_drain(&mut self, clock: Clock) {
        let code = self.cfg.server.shutdown_close_code;
        let until = clock.now + self.cfg.server.drain_timeout;
        self.begin_drain_with(code, "server shutting down", until, clock);
    }

    /// Starts a drain with this close code and reason, ending at `until` at the latest: the
    /// first batch of close frames goes now, the others one per [`DRAIN_BATCH_INTERVAL`] (from
    /// `handle_timers`). A drain already under way keeps its own.
    pub fn begin_drain_with(&mut self, code: u16, reason: &str, until: Instant, clock: Clock) {
        if self.draining_until.is_some() {
            return;
        }
        self.draining_until = Some(until);
        let keys: Vec<ConnKey> = self.conns.iter().map(|(k, _)| k as ConnKey).collect();
        let timeout = until.saturating_duration_since(clock.now);
        let plan = drain::DrainCloses::new(code, reason, keys, clock.now, timeout);
        self.drain_closes = Some(plan);
        self.close_drain_batch(clock);
    }

    /// Sends the drain's close frames that are due.
    fn close_drain_batch(&mut self, clock: Clock) {
        let Some(plan) = self.drain_closes.as_mut() else {
            return;
        };
        let (code, reason) = (plan.code, plan.reason.clone());
        for key in plan.handle_timeout(clock.now) {
            self.with_conn(key, clock, |c, cx| c.close(code, &reason, cx));
        }
    }

    // --------------------------------------------------------------------------------------------
    // Once per loop turn
    // --------------------------------------------------------------------------------------------

    /// Handles what other shards and the control plane sent. Returns how many entries.
    pub fn handle_fabric(&mut self, clock: Clock) -> usize {
        let mut inbox = std::mem::take(&mut self.inbox);
        let n = self
            .fabric
            .receive(FABRIC_BATCH_PER_SOURCE, |from, m| inbox.push((from, m)));
        for (_, m) in inbox.drain(..) {
            self.handle_fabric_msg(m, clock);
        }
        self.inbox = inbox;
        self.evict_pending(clock);
        n
    }

    /// The shard is about to exit: its last application events (the drain's `disconnect`s)
    /// answer the event request waiting or queued, whatever their number; everything else still
    /// queued to it is dropped (a command's responder answers "not running").
    pub fn close_fabric(&mut self) {
        self.report_awaited_disconnects();
        let mut last = self.event_waiter.take().map(|(_, reply)| reply);
        let mut inbox = Vec::new();
        self.fabric.receive(usize::MAX, |_, m| inbox.push(m));
        for m in inbox {
            if let FabricMsg::Command(cmd) = m
                && let Command::TakeEvents { reply, .. } = *cmd
            {
                // The newest request is the one its asker still waits on.
                last = Some(reply);
            }
        }
        if let Some(reply) = last {
            reply.send(self.take_events(usize::MAX));
        }
    }

    /// Runs due deadlines: pings, idle closes, handshake and close timeouts, the attack summary.
    pub fn handle_timers(&mut self, clock: Clock) {
        self.ping = None;
        let interval = self.cfg.log.attack_summary_interval;
        let mut lines = std::mem::take(&mut self.alarm_lines);
        self.alarms
            .handle_timeout(clock.now, interval, &self.metrics, &mut lines);
        for line in lines.drain(..) {
            tracing::warn!(target: "wse_shards::alarms", shard = self.me, "{line}");
        }
        self.alarm_lines = lines;
        self.close_drain_batch(clock);
        self.expire_awaited_leaves(clock.now);
        let mut expired = std::mem::take(&mut self.expired);
        self.timers.expire(clock.now, &mut expired);
        for (key, tick) in expired.drain(..) {
            let Some(slot) = self.conns.get_mut(key as usize) else {
                continue;
            };
            if slot.armed != Some(tick) {
                continue; // stale: re-armed since
            }
            slot.armed = None;
            if slot.conn.is_closed() {
                // Past the close deadline: stop waiting for the peer's FIN.
                if clock.now >= slot.conn.poll_timeout(&self.cfg) {
                    slot.io.shutdown(Shutdown::Both);
                } else {
                    self.rearm(key);
                }
                continue;
            }
            self.with_conn(key, clock, |c, cx| c.handle_timeout(cx));
        }
        self.expired = expired;
    }

    /// Writes every connection with queued output (one `writev` each), shuts down the write side
    /// of finished connections, and pushes cross-shard entries. Keys whose socket is full are
    /// added to `blocked`: the I/O layer waits for them to drain and calls `handle_writable`.
    pub fn flush(&mut self, blocked: &mut Vec<ConnKey>, clock: Clock) {
        blocked.append(&mut self.blocked);
        let mut broken = Vec::new();
        for key in std::mem::take(&mut self.dirty) {
            let Some(slot) = self.conns.get_mut(key as usize) else {
                continue;
            };
            debug_assert!(
                slot.dirty,
                "connection {key} listed as dirty without its flag"
            );
            slot.dirty = false;
            if slot.write_blocked {
                continue;
            }
            match write_out(slot, &self.metrics) {
                Ok(()) => {
                    if slot.conn.wants_shutdown() && !slot.write_shut {
                        slot.write_shut = true;
                        slot.io.shutdown(Shutdown::Write);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    slot.write_blocked = true;
                    blocked.push(key);
                }
                Err(_) => broken.push(key),
            }
        }
        for key in broken {
            self.handle_eof(key, clock);
            if let Some(slot) = self.conns.get(key as usize) {
                slot.io.shutdown(Shutdown::Both);
            }
        }
        self.answer_event_waiter();
        let held = self.fabric.flush();
        self.handed.iter_mut().for_each(|h| *h = 0);
        let m = &self.metrics;
        m.fabric_overflow_depth.set(held as u64);
        m.fabric_inflight_bytes.set(self.fabric.inflight_bytes());
        m.fabric_inbound_depth
            .set(self.fabric.inbound_depth() as u64);
        m.app_event_queue_depth.set(self.app_events.len() as u64);
        if let Some(h) = &self.history {
            m.recovery_topics.set(h.topic_count() as u64);
            m.recovery_bytes.set(h.footprint() as u64);
        }
    }

    // --------------------------------------------------------------------------------------------
    // Connection events
    // --------------------------------------------------------------------------------------------

    /// Runs `f` on connection `key` with a context borrowed from the shard, then applies what
    /// the connection asked for.
    fn with_conn(&mut self, key: ConnKey, clock: Clock, f: impl FnOnce(&mut Conn, &mut Cx<'_>)) {
        let Some(slot) = self.conns.get_mut(key as usize) else {
            return;
        };
        let was_handshaking = slot.conn.is_handshaking();
        let mut cx = Cx {
            clock,
            cfg: &self.cfg,
            rate: &self.rate,
            auth: self.auth.as_deref(),
            default_publish: &self.default_publish,
            admission: &self.shared.admission,
            metrics: &self.metrics,
            events: &mut self.events,
            ping: &mut self.ping,
            refused_lingering: &mut self.refused_lingering,
        };
        f(&mut slot.conn, &mut cx);
        if slot.conn.out.over(self.cfg.limits.max_outbound_queue_bytes) {
            // A reply queued outside the read path (a subscription or publish acknowledgement,
            // an error) crossed the cap: the client is not reading what it asks for.
            slot.conn.evict(&mut cx);
        }
        if was_handshaking && !slot.conn.is_handshaking() {
            self.handshakes -= 1;
            self.metrics.handshakes_pending.set(self.handshakes as u64);
        }
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            self.handle_event(key, ev, clock);
        }
        self.events = events;
        if let Some(slot) = self.conns.get_mut(key as usize)
            && (!slot.conn.out.is_empty() || slot.conn.is_closed())
        {
            mark_dirty(&mut self.dirty, slot, key);
        }
        self.rearm(key);
    }

    fn handle_event(&mut self, key: ConnKey, ev: ConnEvent, clock: Clock) {
        match ev {
            ConnEvent::Upgraded => {
                if let Some(slot) = self.conns.get_mut(key as usize) {
                    slot.upgraded = true;
                    self.metrics.connections.inc();
                    tracing::debug!(shard = self.me, conn = %slot.conn.id(), "upgraded");
                }
            }
            ConnEvent::AuthRefused(e) => self.log_auth_refusal(key, &e, clock),
            ConnEvent::Connected { user, claims } => self.connected(key, &user, claims),
            ConnEvent::Subscribe(req) => self.subscribe(key, req, None, clock),
            ConnEvent::PresenceUpdate { data } => self.presence_update(key, data),
            ConnEvent::Unsubscribe { topics } => self.unsubscribe(key, topics, clock),
            ConnEvent::Publish { topic, body, ack } => {
                let origin = self.conns.get(key as usize).map(|s| s.conn.id());
                self.route_publication(&topic, body, origin.filter(|_| ack), clock);
            }
            ConnEvent::App { user, payload } => {
                self.conn_event(key, AppEventKind::Msg, &user, payload);
            }
            ConnEvent::Unparsed {
                user,
                binary,
                payload,
            } => {
                let kind = if binary {
                    AppEventKind::Bin
                } else {
                    AppEventKind::Raw
                };
                self.conn_event(key, kind, &user, payload);
            }
            ConnEvent::Left { subs, user } => {
                let Some(conn) = self.conns.get(key as usize).map(|s| s.conn.id()) else {
                    return;
                };
                self.users.remove(&user, key);
                // Its presence departures are reported before its `disconnect`.
                self.begin_disconnect(conn, &user, clock.now);
                self.leave_all(conn, subs, Some(&user));
                self.settle_disconnect(conn);
            }
        }
    }

    /// Logs a refused token: why, and from where (never the token), within the shard's line
    /// budget; the attack summary counts every one.
    fn log_auth_refusal(&mut self, key: ConnKey, e: &AuthError, clock: Clock) {
        let Some(suppressed) = self.auth_refusal_log.admit(clock.now) else {
            return;
        };
        let peer = Peer(self.conns.get(key as usize).and_then(|s| s.io.peer_addr()));
        if suppressed == 0 {
            tracing::info!(shard = self.me, %peer, reason = %e, "authentication refused (closed 4401)");
        } else {
            tracing::info!(
                shard = self.me,
                %peer,
                reason = %e,
                suppressed,
                "authentication refused (closed 4401); {suppressed} more refusals were not logged"
            );
        }
    }

    /// A WSE session started: index it by user and tell the application.
    fn connected(&mut self, key: ConnKey, user: &str, claims: Option<Bytes>) {
        let Some(slot) = self.conns.get(key as usize) else {
            return;
        };
        let conn = slot.conn.id();
        tracing::debug!(shard = self.me, %conn, user, "session started");
        self.users.insert(user, key);
        let kind = if claims.is_some() {
            AppEventKind::AuthConnect
        } else {
            AppEventKind::Connect
        };
        self.push_app_event(kind, Some(conn), user, claims.unwrap_or_else(empty));
    }

    /// An application event about connection `key`.
    fn conn_event(&mut self, key: ConnKey, kind: AppEventKind, user: &str, payload: Bytes) {
        let Some(slot) = self.conns.get(key as usize) else {
            return;
        };
        let conn = slot.conn.id();
        self.push_app_event(kind, Some(conn), user, payload);
    }

    /// Queues an application event; past the queue's bounds the oldest goes (counted).
    fn push_app_event(
        &mut self,
        kind: AppEventKind,
        conn: Option<ConnId>,
        user: &str,
        payload: Bytes,
    ) {
        let ev = AppEvent {
            kind,
            shard: self.me as u16,
            conn,
            user: user.into(),
            payload,
        };
        self.metrics.app_events_total.inc();
        self.app_event_bytes += ev.size();
        self.app_events.push_back(ev);
        while self.app_events.len() > self.cfg.limits.app_event_queue_capacity
            || self.app_event_bytes > self.cfg.limits.app_event_queue_bytes
        {
            let Some(old) = self.app_events.pop_front() else {
                break;
            };
            self.app_event_bytes -= old.size();
            self.metrics.dropped(DropReason::AppEventOverflow).inc();
        }
    }

    /// Queues a per-connection JSON message to `key`.
    fn send_json(&mut self, key: ConnKey, json: Vec<u8>, clock: Clock) {
        self.with_conn(key, clock, |c, cx| c.send_json(json, cx));
    }

    fn handle_fabric_msg(&mut self, m: FabricMsg, clock: Clock) {
        match m {
            FabricMsg::Publish { topic, body, ack } => self.sequence(&topic, &body, ack, clock),
            FabricMsg::Deliver { topic, frame } => {
                // The owner queues its own subscribers directly; the fabric carries the rest.
                debug_assert_ne!(
                    self.topics.owner_of(&topic),
                    self.me,
                    "delivery to the owner"
                );
                // A private copy per shard: cloning the sender's buffer for every local subscriber
                // would bounce its reference count between cores.
                let local = Bytes::copy_from_slice(&frame);
                drop(frame);
                self.deliver_local(&topic, &local);
            }
            FabricMsg::DeliverGroup { group, frame } => {
                // One recipient: the buffer is queued as it came (a private copy would cost an
                // allocation to save one reference-count decrement here).
                self.deliver_group(&group.topic, &group.group, frame);
            }
            FabricMsg::PublishAcked {
                conn,
                topic,
                offset,
                epoch,
            } => self.send_publish_ack(conn, &topic, epoch, offset, clock),
            FabricMsg::Join(j) => self.handle_join(*j, clock),
            FabricMsg::Joined(r) => self.handle_joined(*r, clock),
            FabricMsg::Leave {
                topic,
                conn,
                interest_off,
                group_members,
                user,
                group,
            } => {
                let group = group.as_deref().map(|g| (g, group_members));
                self.handle_leave(&topic, conn, interest_off, user.as_deref(), group);
            }
            FabricMsg::PresenceLeft(answer) => self.handle_presence_left(*answer),
            FabricMsg::PresenceUpdate(u) => self.handle_presence_update(&u.topic, &u.user, u.data),
            FabricMsg::Query(q) => self.handle_query(*q),
            FabricMsg::Adopt { fd } => self.adopted.push(fd),
            FabricMsg::Reload(reload) => self.apply_reload(&reload),
            FabricMsg::Command(cmd) => self.handle_command(*cmd, clock),
        }
        self.evict_pending(clock);
    }

    /// Runs with the reloaded configuration from the next connection event on.
    fn apply_reload(&mut self, reload: &Reload) {
        self.cfg = reload.cfg.clone();
        self.auth = reload.auth.clone();
        self.rate = rate_limits(&self.cfg.protocol);
        self.default_publish = Acl::new(self.cfg.auth.default_publish.clone(), Vec::new());
        // An error means the reloader stopped waiting; the new configuration applies regardless.
        let _ = reload.applied.send(self.me);
    }

    /// Arms the connection's timer when its next deadline is earlier than the armed one.
    fn rearm(&mut self, key: ConnKey) {
        let Some(slot) = self.conns.get_mut(key as usize) else {
            return;
        };
        let at = slot.conn.poll_timeout(&self.cfg);
        let wanted = self.timers.arm_tick_for(at);
        if slot.armed.is_some_and(|t| t <= wanted) {
            return;
        }
        slot.armed = Some(self.timers.arm(key, at));
    }
}

/// A peer address in the log: the address, or `unknown`.
struct Peer(Option<SocketAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

/// The payload of events that carry nothing: `{}`.
fn empty() -> Bytes {
    Bytes::from_static(b"{}")
}

fn rate_limits(p: &ProtocolConfig) -> RateLimits {
    RateLimits {
        capacity: p.rate_limit_capacity,
        refill_per_sec: p.rate_limit_refill,
        abuse_drops: p.rate_limit_abuse_drops,
        abuse_window_ms: p.rate_limit_abuse_window.as_millis() as u64,
    }
}

fn mark_dirty<T>(dirty: &mut Vec<ConnKey>, slot: &mut Slot<T>, key: ConnKey) {
    if !slot.dirty {
        slot.dirty = true;
        dirty.push(key);
    }
}

fn send(fabric: &mut Endpoint, metrics: &ShardMetrics, to: usize, m: FabricMsg) {
    if fabric.send(to, m) == Sent::Dropped {
        metrics.dropped(DropReason::FabricOverflow).inc();
    }
}

/// Writes as much of the slot's queue as the socket takes.
fn write_out<T: Transport>(slot: &mut Slot<T>, metrics: &ShardMetrics) -> io::Result<()> {
    while !slot.conn.out.is_empty() {
        let mut iov = [IoSlice::new(&[]); IOV_PER_WRITE];
        let n = slot.conn.out.slices(&mut iov);
        match slot.io.write_vectored(&iov[..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => {
                metrics.bytes_out_total.add(written as u64);
                slot.conn.out.advance(written);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
