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
//! The rules live in submodules, each owning its own state (private fields, changed only
//! through its methods): `subscriptions` (a subscriber's shard, and the acknowledgements it
//! waits to send), `owner` (turns the topic owner's decisions — [`crate::topic_owner`] keeps
//! that state — into frames and fabric entries), `cluster` (the owner's adverts to the cluster
//! core and the joins waiting for them), `publications` (routing and local fan-out),
//! `commands` (the application's commands), `presence_events` and `app_events` (the event
//! stream), `drain`, `running` (the configuration in force), `turn` (what a loop turn's end
//! writes, evicts and reuses), `users` and `dedup`. This module owns the connection slots and
//! the loop turn itself; it is the only one that writes a slot's fields.
//!
//! Layering: the shard sits above the building blocks (`conn`, `topics`, `topic_owner`,
//! `fabric`, ...) and below `runtime` and `server`; none of them names it
//! (`layering.rs` checks).

mod app_events;
mod cluster;
mod commands;
mod dedup;
mod drain;
mod owner;
mod presence_events;
mod publications;
mod running;
mod subscriptions;
mod turn;
mod users;

pub use dedup::SEND_DEDUP_WINDOW;
pub use drain::{DRAIN_BATCH_INTERVAL, DRAIN_CLOSE_SPREAD_PERCENT};
pub use presence_events::PRESENCE_LEAVE_WAIT;

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use slab::Slab;

use crate::admission::Admission;
use crate::alarms::{AUTH_REFUSAL_LINES_PER_SEC, AttackSummary, LineBudget};
use crate::auth::AuthError;
use crate::auth::Authenticator;
use crate::close::CloseCode;
use crate::command::Command;
use crate::config::Config;
use crate::conn::ConnKey;
use crate::conn::{Conn, ConnEvent, ConnId, Cx};
use crate::dialect::Delivery;
use crate::fabric::{
    Endpoint, FabricMsg, HistoryReply, HistoryRequest, PresenceReply, PresenceRequest, Reload, Sent,
};
use crate::handshake;
use crate::inbound::{AppEvent, AppEventKind};
use crate::metrics::{DropReason, RejectReason, ShardMetrics};
use crate::protocol::Clock;
use crate::timer::{Tick, TimerWheel};
use crate::topic_owner::TopicOwner;
use crate::topics::Topics;

/// Frames handed to one `writev`. Linux accepts 1024; 64 covers any realistic backlog per turn
/// while keeping the slice array on the stack.
const IOV_PER_WRITE: usize = 64;
/// Cross-shard entries taken from one sender per turn, so one busy peer cannot starve others.
const FABRIC_BATCH_PER_SOURCE: usize = 4096;
/// A shard holding this many more sockets than the least loaded one hands fresh connections to
/// it. The kernel spreads connections by hash (or, with SO_INCOMING_CPU, by the core that handled
/// the packets, which on loopback is the client's), so imbalance is the rule for few clients.
pub const BALANCE_SLACK: u64 = 8;

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
    /// An application answers Centrifuge `rpc`s: it consumes the event stream or a webhook is
    /// set ([`crate::Server::set_rpc_handler`]); otherwise they are answered 108.
    pub app_rpc: AtomicBool,
    /// How many shards run.
    pub shards: usize,
    /// Every shard's metrics, in shard order; a shard reads the others' socket gauges to
    /// balance connections (on accept only).
    pub metrics: Vec<Arc<ShardMetrics>>,
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

/// One core's state: its connections, topic table, timers, fabric endpoint and queues.
/// Driven by `runtime` through a [`Transport`] that does the actual socket I/O.
///
/// Each field has one owner: this module (the connection slots and the loop turn), or the
/// submodule or building block named on it, which alone changes it, through its methods.
pub struct Shard<T: Transport> {
    /// This shard's index.
    me: usize,
    /// What every shard reads (the connection cap, the shutdown flag, every shard's metrics).
    shared: Arc<Shared>,
    /// The running configuration and verifier (`running`): `shared`'s at start, then each
    /// reload's.
    run: running::Running,
    /// This shard's single-writer counters.
    metrics: Arc<ShardMetrics>,
    /// Connection slots, with their bookkeeping (this module).
    conns: Slab<Slot<T>>,
    slots: SlotCounts,
    /// One deadline per connection (this module arms them).
    timers: TimerWheel,
    /// This shard's end of the fabric, and the sockets it hands over and adopts.
    fabric: Endpoint,
    handoff: Handoff,
    /// Which local connections are on which topic (`topics`, through `subscriptions`).
    topics: Topics,
    /// The owner's role for the topics this shard owns (`topic_owner`, through `owner`):
    /// sequencing, history, interested shards, presence, queue-group counts.
    owner: TopicOwner,
    /// Subscribe acknowledgements waiting for topic owners (`subscriptions`).
    acks: subscriptions::PendingAcks,
    /// The owned topics' interest as advertised to the other nodes, and the joins waiting for
    /// it (`cluster`).
    cluster: cluster::ClusterSide,
    /// What the shard keeps for the application: the event stream's queue, held
    /// `disconnect`s, the user index, `send_event` dedup (`app_events`).
    app: app_events::AppSide,
    /// The drain, once one has started (`drain`).
    drain: drain::Drain,
    /// What the turn's end has to do: connections to write, blocked, to evict (`turn`).
    turn: turn::Turn,
    /// Buffers reused from call to call (`turn`).
    scratch: turn::Scratch,
    /// What this shard logs about refusals (this module).
    logs: RefusalLogs,
}

/// The connection slots' bookkeeping.
struct SlotCounts {
    /// The serial of the last connection accepted (part of its [`ConnId`]).
    serial: u32,
    /// Connections still in the upgrade.
    handshakes: usize,
    /// Connections refused after the upgrade and not yet released (see `conn::REFUSED_LINGER`).
    refused_lingering: usize,
}

/// Sockets moved between shards to balance them.
struct Handoff {
    /// Sockets other shards handed over, for the I/O layer to adopt.
    adopted: Vec<OwnedFd>,
    /// Sockets handed to each shard since the last flush (their gauges lag by a turn).
    handed: Vec<u64>,
}

/// The log lines about what this shard refused.
struct RefusalLogs {
    /// What was refused, once per kind and `log.attack_summary_interval`.
    attacks: AttackSummary,
    /// Authentication refusals logged one by one, at most `AUTH_REFUSAL_LINES_PER_SEC`.
    auth_refusals: LineBudget,
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
        let run = running::Running::new(cfg.clone(), shared.auth.clone());
        let shards = shared.shards;
        let alarms = AttackSummary::new(now, cfg.log.attack_summary_interval, &metrics);
        let owner = TopicOwner::new(me, shards, &cfg.recovery);
        let mut topics = Topics::new(me, shards);
        topics.set_owner_interest(cfg.cluster.enabled);
        Self {
            me,
            topics,
            cluster: cluster::ClusterSide::new(cfg.cluster.enabled, shards),
            shared,
            run,
            metrics,
            conns: Slab::new(),
            slots: SlotCounts {
                serial: 0,
                handshakes: 0,
                refused_lingering: 0,
            },
            timers: TimerWheel::new(now),
            fabric,
            handoff: Handoff {
                adopted: Vec::new(),
                handed: vec![0; shards],
            },
            owner,
            acks: Default::default(),
            app: Default::default(),
            drain: Default::default(),
            turn: Default::default(),
            scratch: Default::default(),
            logs: RefusalLogs {
                attacks: alarms,
                auth_refusals: LineBudget::new(AUTH_REFUSAL_LINES_PER_SEC),
            },
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
        self.drain.is_draining()
    }

    /// Draining and either every connection is gone (its `disconnect` reported) or the drain
    /// deadline has passed.
    pub fn is_drained(&self, now: Instant) -> bool {
        self.drain.until().is_some_and(|until| {
            (self.conns.is_empty() && !self.app.leaves.holds_disconnects()) || now >= until
        })
    }

    /// When the shard next needs `handle_timers`.
    pub fn next_deadline(&self) -> Option<Instant> {
        let t = self.timers.next_expiry();
        let drain = self.drain.next_batch_at();
        let leaves = self.app.leaves.poll_timeout();
        let t = [t, self.drain.until(), drain, leaves]
            .into_iter()
            .flatten()
            .min();
        let alarms = self.logs.attacks.poll_timeout();
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
        self.app.events.queued()
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
        let load = |s: usize, me: &Self| me.shared.metrics[s].sockets.get() + me.handoff.handed[s];
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
                self.handoff.handed[target] += 1;
                self.metrics.handed_off_total.inc();
            }
            Sent::Dropped => self.metrics.dropped(DropReason::FabricOverflow).inc(),
        }
        None
    }

    /// Sockets handed over by other shards since the last call, to be accepted here.
    pub fn take_adopted(&mut self, into: &mut Vec<OwnedFd>) {
        into.append(&mut self.handoff.adopted);
    }

    /// Takes a freshly accepted socket. `None` when refused (too many handshakes in flight); the
    /// refusal has been written and the socket should be dropped.
    pub fn accept(&mut self, io: T, clock: Clock) -> Option<ConnKey> {
        self.metrics.connections_accepted_total.inc();
        if self.slots.handshakes >= self.run.cfg().limits.max_pending_handshakes
            || self.is_draining()
        {
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
        self.slots.serial = self.slots.serial.wrapping_add(1);
        let conn = Conn::new(ConnId::new(self.me, self.slots.serial, key), clock.now);
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
        self.slots.handshakes += 1;
        self.metrics
            .handshakes_pending
            .set(self.slots.handshakes as u64);
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

    /// Lists connection `key` for the next flush (once).
    fn mark_dirty(&mut self, key: ConnKey) {
        if let Some(slot) = self.conns.get_mut(key as usize) {
            self.turn.mark_dirty(&mut slot.dirty, key);
        }
    }

    /// The socket of `key` can take more bytes.
    pub fn handle_writable(&mut self, key: ConnKey) {
        if let Some(slot) = self.conns.get_mut(key as usize) {
            slot.write_blocked = false;
            self.turn.mark_dirty(&mut slot.dirty, key);
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
            self.turn.unlist(key);
        }
        if slot.conn.is_handshaking() {
            self.slots.handshakes -= 1;
            self.metrics
                .handshakes_pending
                .set(self.slots.handshakes as u64);
        }
        if slot.conn.admitted {
            self.shared.admission.release();
        }
        if slot.conn.was_refused() {
            self.slots.refused_lingering -= 1;
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
        let code = self.run.cfg().server.shutdown_close_code;
        let until = clock.now + self.run.cfg().server.drain_timeout;
        self.begin_drain_with(code, CloseCode::Shutdown.reason(), until, clock);
    }

    /// Starts a drain with this close code and reason, ending at `until` at the latest: the
    /// first batch of close frames goes now, the others one per [`DRAIN_BATCH_INTERVAL`] (from
    /// `handle_timers`). A drain already under way keeps its own.
    pub fn begin_drain_with(&mut self, code: u16, reason: &str, until: Instant, clock: Clock) {
        if self.drain.is_draining() {
            return;
        }
        let keys: Vec<ConnKey> = self.conns.iter().map(|(k, _)| k as ConnKey).collect();
        self.drain.begin(code, reason, keys, clock.now, until);
        self.close_drain_batch(clock);
    }

    /// Sends the drain's close frames that are due.
    fn close_drain_batch(&mut self, clock: Clock) {
        let Some((code, reason, keys)) = self.drain.due(clock.now) else {
            return;
        };
        for key in keys {
            self.with_conn(key, clock, |c, cx| c.close(code, &reason, cx));
        }
    }

    // --------------------------------------------------------------------------------------------
    // Once per loop turn
    // --------------------------------------------------------------------------------------------

    /// Handles what other shards and the control plane sent. Returns how many entries.
    pub fn handle_fabric(&mut self, clock: Clock) -> usize {
        let mut inbox = std::mem::take(&mut self.scratch.inbox);
        let n = self
            .fabric
            .receive(FABRIC_BATCH_PER_SOURCE, |from, m| inbox.push((from, m)));
        for (from, m) in inbox.drain(..) {
            self.handle_fabric_msg(from, m, clock);
        }
        self.scratch.inbox = inbox;
        self.evict_pending(clock);
        n
    }

    /// The shard is about to exit: its last application events (the drain's `disconnect`s)
    /// answer the event request waiting or queued, whatever their number; everything else still
    /// queued to it is dropped (a command's responder answers "not running").
    pub fn close_fabric(&mut self) {
        self.report_awaited_disconnects();
        let mut last = self.app.events.take_waiter();
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
            reply.send(self.app.events.take(usize::MAX));
        }
    }

    /// Runs due deadlines: pings, idle closes, handshake and close timeouts, the attack summary.
    pub fn handle_timers(&mut self, clock: Clock) {
        self.scratch.ping = None;
        let interval = self.run.cfg().log.attack_summary_interval;
        let mut lines = std::mem::take(&mut self.scratch.alarm_lines);
        self.logs
            .attacks
            .handle_timeout(clock.now, interval, &self.metrics, &mut lines);
        for line in lines.drain(..) {
            tracing::warn!(target: "wse_shards::alarms", shard = self.me, "{line}");
        }
        self.scratch.alarm_lines = lines;
        self.close_drain_batch(clock);
        self.expire_awaited_leaves(clock.now);
        let mut expired = std::mem::take(&mut self.scratch.expired);
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
                if clock.now >= slot.conn.poll_timeout(self.run.cfg()) {
                    slot.io.shutdown(Shutdown::Both);
                } else {
                    self.rearm(key);
                }
                continue;
            }
            self.with_conn(key, clock, |c, cx| c.handle_timeout(cx));
        }
        self.scratch.expired = expired;
    }

    /// Writes every connection with queued output (one `writev` each), shuts down the write side
    /// of finished connections, and pushes cross-shard entries. Keys whose socket is full are
    /// added to `blocked`: the I/O layer waits for them to drain and calls `handle_writable`.
    pub fn flush(&mut self, blocked: &mut Vec<ConnKey>, clock: Clock) {
        self.turn.take_blocked(blocked);
        let mut broken = Vec::new();
        for key in self.turn.take_dirty() {
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
            match slot.write_out(&self.metrics) {
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
        self.app.events.answer_waiter();
        let held = self.fabric.flush();
        self.handoff.handed.iter_mut().for_each(|h| *h = 0);
        let m = &self.metrics;
        m.fabric_overflow_depth.set(held as u64);
        m.fabric_inflight_bytes.set(self.fabric.inflight_bytes());
        m.fabric_inbound_depth
            .set(self.fabric.inbound_depth() as u64);
        m.app_event_queue_depth
            .set(self.app.events.queued().len() as u64);
        let presence = self.owner.presence_counts();
        m.presence_topics.set(presence.topics as u64);
        m.presence_users.set(presence.users as u64);
        if let Some((topics, bytes)) = self.owner.history_footprint() {
            m.recovery_topics.set(topics as u64);
            m.recovery_bytes.set(bytes as u64);
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
        let was_refused = slot.conn.was_refused();
        let mut cx = Cx {
            clock,
            cfg: self.run.cfg(),
            rate: self.run.rate(),
            auth: self.run.auth(),
            default_publish: self.run.default_publish(),
            centrifuge: self.run.centrifuge(),
            admission: &self.shared.admission,
            metrics: &self.metrics,
            app_rpc: self.shared.app_rpc.load(Ordering::Relaxed),
            events: &mut self.scratch.events,
            ping: &mut self.scratch.ping,
            refused_lingering: self.slots.refused_lingering,
        };
        f(&mut slot.conn, &mut cx);
        if slot
            .conn
            .out
            .over(self.run.cfg().limits.max_outbound_queue_bytes)
        {
            // A reply queued outside the read path (a subscription or publish acknowledgement,
            // an error) crossed the cap: the client is not reading what it asks for.
            slot.conn.evict(&mut cx);
        }
        if was_handshaking && !slot.conn.is_handshaking() {
            self.slots.handshakes -= 1;
            self.metrics
                .handshakes_pending
                .set(self.slots.handshakes as u64);
        }
        if !was_refused && slot.conn.was_refused() {
            self.slots.refused_lingering += 1;
        }
        let mut events = std::mem::take(&mut self.scratch.events);
        for ev in events.drain(..) {
            self.handle_event(key, ev, clock);
        }
        self.scratch.events = events;
        if let Some(slot) = self.conns.get_mut(key as usize)
            && (!slot.conn.out.is_empty() || slot.conn.is_closed())
        {
            self.turn.mark_dirty(&mut slot.dirty, key);
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
                let routed = self.route_publication(&topic, body, origin.filter(|_| ack), clock);
                if !routed && ack {
                    // No acknowledgement will come: the connection hears it now.
                    self.with_conn(key, clock, |c, cx| c.publish_lost(&topic, cx));
                }
            }
            ConnEvent::History {
                request,
                topic,
                after,
                limit,
                reverse,
                keep,
            } => {
                let Some(conn) = self.conns.get(key as usize).map(|s| s.conn.id()) else {
                    return;
                };
                let h = HistoryRequest {
                    topic: Arc::from(topic.as_str()),
                    conn,
                    request,
                    after,
                    limit,
                    reverse,
                    keep,
                };
                let owner = self.topics.owner_of(&topic);
                if owner == self.me {
                    self.handle_history(h, clock);
                } else if self.fabric.send(owner, FabricMsg::History(Box::new(h))) == Sent::Dropped
                {
                    self.metrics.dropped(DropReason::FabricOverflow).inc();
                    // No answer will come: the connection hears it now.
                    self.with_conn(key, clock, |c, cx| c.history_lost(request, cx));
                }
            }
            ConnEvent::Presence {
                request,
                topic,
                list,
            } => {
                let Some(conn) = self.conns.get(key as usize).map(|s| s.conn.id()) else {
                    return;
                };
                let owner = self.topics.owner_of(&topic);
                let p = PresenceRequest {
                    topic: Arc::from(topic.as_str()),
                    conn,
                    request,
                    list,
                };
                if owner == self.me {
                    self.handle_presence(p, clock);
                } else if self.fabric.send(owner, FabricMsg::Presence(Box::new(p))) == Sent::Dropped
                {
                    self.metrics.dropped(DropReason::FabricOverflow).inc();
                    // No answer will come: the connection hears it now.
                    self.with_conn(key, clock, |c, cx| c.presence_lost(request, cx));
                }
            }
            ConnEvent::App { user, payload } => {
                self.conn_event(key, AppEventKind::Msg, &user, payload);
            }
            ConnEvent::Rpc {
                user,
                request,
                method,
                data,
            } => {
                let payload = rpc_event_payload(request, &method, &data);
                self.conn_event(key, AppEventKind::Rpc, &user, payload);
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
                self.app.users.remove(&user, key);
                // Its presence departures are reported before its `disconnect`.
                self.begin_disconnect(conn, &user, clock.now);
                self.leave_all(conn, subs, Some(&user), clock);
                self.settle_disconnect(conn);
            }
        }
    }

    /// Logs a refused token: why, and from where (never the token), within the shard's line
    /// budget; the attack summary counts every one.
    fn log_auth_refusal(&mut self, key: ConnKey, e: &AuthError, clock: Clock) {
        let Some(suppressed) = self.logs.auth_refusals.admit(clock.now) else {
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
        self.app.users.insert(user, key);
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
        self.app
            .events
            .push(ev, &self.run.cfg().limits, &self.metrics);
    }

    fn handle_fabric_msg(&mut self, from: usize, m: FabricMsg, clock: Clock) {
        match m {
            FabricMsg::Publish { topic, body, ack } => {
                let origin = self.cluster.origin(from, false);
                self.sequence(&topic, &body, ack, origin, clock);
            }
            FabricMsg::PublishLocal { topic, body } => {
                let origin = self.cluster.origin(from, true);
                self.sequence(&topic, &body, None, origin, clock);
            }
            FabricMsg::ClusterInterestAcked {
                topic,
                group,
                ticket,
            } => self.handle_cluster_acked(&topic, group.as_deref(), ticket, clock),
            FabricMsg::PublishGroup { group, body } => {
                self.publish_group(&group.0, &group.1, &body)
            }
            FabricMsg::ClusterPublish { .. } | FabricMsg::ClusterInterest { .. } => {
                debug_assert!(false, "an entry for the cluster core reached a shard");
            }
            FabricMsg::Deliver { topic, frame } => {
                // The owner queues its own subscribers directly; the fabric carries the rest.
                debug_assert!(!self.owner.owns(&topic), "delivery to the owner");
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
            FabricMsg::History(h) => self.handle_history(*h, clock),
            FabricMsg::HistoryRead(r) => self.handle_history_read(*r, clock),
            FabricMsg::Presence(p) => self.handle_presence(*p, clock),
            FabricMsg::JoinLeave(j) => self.deliver_join_leave(&j.topic, j.joined, &j.client),
            FabricMsg::PresenceRead(r) => self.handle_presence_read(*r, clock),
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
                self.handle_leave(&topic, conn, interest_off, user.as_deref(), group, clock);
            }
            FabricMsg::PresenceLeft(answer) => self.handle_presence_left(*answer),
            FabricMsg::PresenceUpdate(u) => self.handle_presence_update(&u.topic, &u.user, u.data),
            FabricMsg::Query(q) => self.handle_query(*q, clock),
            FabricMsg::Adopt { fd } => self.handoff.adopted.push(fd),
            FabricMsg::Reload(reload) => self.apply_reload(&reload),
            FabricMsg::Command(cmd) => self.handle_command(*cmd, clock),
        }
        self.evict_pending(clock);
    }

    /// Runs with the reloaded configuration from the next connection event on.
    /// On the topic's owner: reads the history a connection asked for and answers its shard.
    fn handle_history(&mut self, h: HistoryRequest, clock: Clock) {
        let read = self
            .owner
            .history(&h.topic, h.after, h.limit, h.reverse, h.keep, clock.wall_ms);
        self.release_owned(&h.topic);
        let reply = HistoryReply {
            conn: h.conn,
            request: h.request,
            read,
        };
        let shard = h.conn.shard();
        if shard == self.me {
            self.handle_history_read(reply, clock);
        } else {
            let m = FabricMsg::HistoryRead(Box::new(reply));
            send(&mut self.fabric, &self.metrics, shard, m);
        }
    }

    fn handle_history_read(&mut self, r: HistoryReply, clock: Clock) {
        let key = r.conn.key();
        if self
            .conns
            .get(key as usize)
            .is_some_and(|s| s.conn.id() == r.conn)
        {
            self.with_conn(key, clock, |c, cx| c.history_read(r.request, r.read, cx));
        }
    }

    /// On the topic's owner: counts the topic's presence members (none when it has no entry),
    /// lists their connections when asked, and answers the connection's shard.
    fn handle_presence(&mut self, p: PresenceRequest, clock: Clock) {
        let (users, connections) = self.owner.presence(&p.topic).map_or((0, 0), |m| m.stats());
        let reply = PresenceReply {
            conn: p.conn,
            request: p.request,
            // Bounded by presence.max_members and the connection limit, far below u32::MAX;
            // saturate rather than wrap should that ever change.
            users: u32::try_from(users).unwrap_or(u32::MAX),
            connections: u32::try_from(connections).unwrap_or(u32::MAX),
            clients: if p.list {
                self.owner.clients(&p.topic).cloned().collect()
            } else {
                Vec::new()
            },
        };
        let shard = p.conn.shard();
        if shard == self.me {
            self.handle_presence_read(reply, clock);
        } else {
            let m = FabricMsg::PresenceRead(Box::new(reply));
            send(&mut self.fabric, &self.metrics, shard, m);
        }
    }

    fn handle_presence_read(&mut self, r: PresenceReply, clock: Clock) {
        let key = r.conn.key();
        if self
            .conns
            .get(key as usize)
            .is_some_and(|s| s.conn.id() == r.conn)
        {
            self.with_conn(key, clock, |c, cx| {
                c.presence_read(r.request, (r.users, r.connections), r.clients, cx)
            });
        }
    }

    fn apply_reload(&mut self, reload: &Reload) {
        self.run.apply(reload);
        reload.confirm(self.me);
    }

    /// Arms the connection's timer when its next deadline is earlier than the armed one.
    fn rearm(&mut self, key: ConnKey) {
        let Some(slot) = self.conns.get_mut(key as usize) else {
            return;
        };
        let at = slot.conn.poll_timeout(self.run.cfg());
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

fn send(fabric: &mut Endpoint, metrics: &ShardMetrics, to: usize, m: FabricMsg) {
    if fabric.send(to, m) == Sent::Dropped {
        metrics.dropped(DropReason::FabricOverflow).inc();
    }
}

impl<T: Transport> Slot<T> {
    /// Queues a shared `frame` to this connection (`key`) under the outbound cap `max`. When
    /// it does not fit, the connection is written first (the cap measures what the socket will
    /// not take, not what one turn queued) and offered the frame again; `false` means it is
    /// still over the cap and the caller evicts it. A connection that is not live takes (and
    /// discards) anything.
    fn offer(
        &mut self,
        key: ConnKey,
        frame: &mut Delivery<'_>,
        max: usize,
        metrics: &ShardMetrics,
        turn: &mut turn::Turn,
    ) -> bool {
        let mut queued = self.conn.push_delivery(frame, max);
        if !queued && !self.write_blocked {
            match self.write_out(metrics) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.write_blocked = true;
                    turn.block(key);
                }
                Err(_) => {} // the read side sees the failure and releases the slot
            }
            queued = self.conn.push_delivery(frame, max);
        }
        if queued {
            turn.mark_dirty(&mut self.dirty, key);
        }
        queued
    }

    /// Writes as much of the queue as the socket takes.
    fn write_out(&mut self, metrics: &ShardMetrics) -> io::Result<()> {
        while !self.conn.out.is_empty() {
            let mut iov = [IoSlice::new(&[]); IOV_PER_WRITE];
            let n = self.conn.out.slices(&mut iov);
            match self.io.write_vectored(&iov[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    metrics.bytes_out_total.add(written as u64);
                    self.conn.out.advance(written);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// An `rpc` event's payload: `{"request":n,"method":"..","data":..}` (`data` `null` when the
/// client sent none).
fn rpc_event_payload(request: u64, method: &str, data: &[u8]) -> Bytes {
    let data = std::str::from_utf8(data)
        .ok()
        .and_then(|s| serde_json::from_str::<&serde_json::value::RawValue>(s).ok());
    #[derive(serde::Serialize)]
    struct Payload<'a> {
        request: u64,
        method: &'a str,
        data: Option<&'a serde_json::value::RawValue>,
    }
    let payload = Payload {
        request,
        method,
        data,
    };
    Bytes::from(serde_json::to_vec(&payload).expect("an rpc event serialises"))
}
