//! One node's protocol core: sessions, pair rules, membership and failure detection, interest
//! and the data lane, with no I/O. The caller (the cluster core thread, or the simulation)
//! feeds socket events and a clock in microseconds, calls [`Node::flush`] at the end of each
//! loop turn, and carries out the [`Action`]s it polls.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::handshake::{self, Handshake, HandshakeError, Identity, PeerInfo, Role, Security, Step};
use crate::interest::{LocalInterest, PatternSet, RemoteInterest};
use crate::membership::{Breaker, jitter, supersedes, suspicion_timeout};
use crate::seal::{Opener, Sealer};
use crate::wire::{
    self, CtrlRecord, FrameDecoder, FrameType, Goodbye, MemberRecord, MemberState, Pattern,
    PubRecord, RawFrame, Reason,
};

/// A connection, named by the node (for dials) or returned by [`Node::accept`].
pub type ConnId = u64;

/// Indirect probes this node runs for others at once; past it it answers "no" at once (a
/// member asks at most one per lost link, so only a misbehaving peer gets here).
pub const MAX_RELAYS: usize = 256;

/// Batch compression policy (`cluster.compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Never.
    Off,
    /// Every batch of at least [`Limits::compress_min`] bytes.
    On,
    /// Such batches only when the link is bandwidth-bound (RTT ≥ 5 ms or a backlog).
    #[default]
    Auto,
}

/// Timers, all in microseconds of the caller's clock.
#[derive(Debug, Clone)]
pub struct Timing {
    /// An unauthenticated session is closed after this long.
    pub handshake_timeout: u64,
    /// PING after this long without sending anything.
    pub ping_interval: u64,
    /// A session that received nothing for this long is dead.
    pub link_timeout: u64,
    /// Indirect probes must be answered within this.
    pub probe_timeout: u64,
    /// Suspect → Dead without confirmations.
    pub suspect_timeout: u64,
    /// Suspect → Dead with enough confirmations.
    pub suspect_min: u64,
    /// A higher-named node waits this long for the lower one to dial before dialling itself.
    pub dial_grace: u64,
    /// Dead members' addresses (and seeds, when isolated) are redialled this often (jittered).
    pub rejoin_interval: u64,
    /// Dead tombstones are kept this long.
    pub tombstone: u64,
    /// A subscription is acknowledged after this long even without every peer's ACK.
    pub sub_ack_timeout: u64,
    /// Publications for a peer whose snapshot is unknown are held at most this long.
    pub hold_timeout: u64,
    /// A pattern whose last local subscriber left stays advertised this long (absorbs churn).
    pub unsub_linger: u64,
    /// Each link sends a DIGEST of this node's interest this often (anti-entropy).
    pub digest_interval: u64,
    /// A session closed as a duplicate is read until the peer's GOODBYE, at most this long.
    pub closing_timeout: u64,
}

impl Default for Timing {
    fn default() -> Self {
        const MS: u64 = 1_000;
        Self {
            handshake_timeout: 5_000 * MS,
            ping_interval: 1_000 * MS,
            link_timeout: 3_000 * MS,
            probe_timeout: 500 * MS,
            suspect_timeout: 4_000 * MS,
            suspect_min: 1_000 * MS,
            dial_grace: 2_000 * MS,
            rejoin_interval: 5_000 * MS,
            tombstone: 300_000 * MS,
            sub_ack_timeout: 250 * MS,
            hold_timeout: 500 * MS,
            unsub_linger: 2_000 * MS,
            digest_interval: 30_000 * MS,
            closing_timeout: 3_000 * MS,
        }
    }
}

/// Size limits, in bytes or counts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest data batch before it is cut, in bytes.
    pub batch_max: usize,
    /// Smallest batch worth compressing, in bytes.
    pub compress_min: usize,
    /// Bytes handed to a session's socket and not yet written, past which publications for that
    /// peer are dropped (counted, DLQ).
    pub peer_queue_bytes: usize,
    /// Publications held for a peer until its snapshot, in bytes; past it they go unfiltered.
    pub hold_bytes: usize,
    /// Unauthenticated inbound sessions at once.
    pub max_unauthenticated: usize,
    /// Unauthenticated inbound sessions from one IP at once.
    pub max_unauthenticated_per_ip: usize,
    /// Members (this node included).
    pub max_members: usize,
    /// Indirect probers asked when a link dies.
    pub indirect_probes: usize,
    /// Dead letter queue entries.
    pub dlq_entries: usize,
    /// Payload bytes kept per DLQ entry.
    pub dlq_prefix: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            batch_max: 64 * 1024,
            compress_min: 4 * 1024,
            peer_queue_bytes: 16 * 1024 * 1024,
            hold_bytes: 4 * 1024 * 1024,
            max_unauthenticated: 64,
            max_unauthenticated_per_ip: 8,
            max_members: 32,
            indirect_probes: 3,
            dlq_entries: 1024,
            dlq_prefix: 64,
        }
    }
}

/// A node's cluster configuration (the protocol part of `[cluster]`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Cluster name.
    pub cluster: String,
    /// Node name.
    pub name: String,
    /// Address peers dial (`host:port`).
    pub advertised: String,
    /// Seed addresses (`host:port`; the I/O layer resolves them on each attempt).
    pub seeds: Vec<String>,
    /// Authentication.
    pub security: Security,
    /// Fingerprint of what must agree cluster-wide.
    pub fingerprint: u64,
    /// Batch compression.
    pub compression: Compression,
    /// Timers.
    pub timing: Timing,
    /// Limits.
    pub limits: Limits,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to `addr`; report [`Node::connected`] or [`Node::dial_failed`].
    Dial {
        /// The connection's id.
        conn: ConnId,
        /// Where.
        addr: String,
    },
    /// Write these bytes, in order, then report progress with [`Node::transmitted`].
    Send {
        /// Connection.
        conn: ConnId,
        /// Bytes.
        bytes: Vec<u8>,
    },
    /// Close after writing what was sent before; the node already forgot the connection.
    Close {
        /// Connection.
        conn: ConnId,
    },
    /// A publication from a peer that local subscribers want.
    Deliver {
        /// The peer it came from.
        from: String,
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A publication for a local queue group: hand it to one of the group's members.
    DeliverGroup {
        /// The peer it came from.
        from: String,
        /// Topic.
        topic: String,
        /// The queue group.
        group: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A subscription's remote interest is confirmed (or the bounded wait ran out).
    SubscribeAcked {
        /// The ticket [`Node::subscribe`] returned.
        ticket: u64,
        /// True if some peer had not acknowledged in time.
        timed_out: bool,
    },
    /// Something to log.
    Event(Event),
}

/// Membership and link changes, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member changed state.
    Member {
        /// Name.
        name: String,
        /// Incarnation.
        incarnation: u64,
        /// New state.
        state: MemberState,
    },
    /// A session to a peer became its single link.
    LinkUp {
        /// Peer.
        peer: String,
    },
    /// A peer's link went away.
    LinkDown {
        /// Peer.
        peer: String,
    },
    /// Another process claims a name in use (an operator error; alarm).
    NameConflict {
        /// The name.
        name: String,
        /// The newcomer's advertised address.
        addr: String,
    },
    /// This node refuted a suspicion by bumping its incarnation.
    Refuted {
        /// New incarnation.
        incarnation: u64,
    },
    /// A handshake failed.
    HandshakeFailed {
        /// Remote address.
        addr: String,
        /// Why.
        error: String,
    },
}

/// A dropped publication, kept for diagnosis (`GET /api/v1/cluster/dlq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqEntry {
    /// Peer it was for.
    pub peer: String,
    /// Topic.
    pub topic: String,
    /// Payload length.
    pub bytes: usize,
    /// Why.
    pub reason: &'static str,
    /// When (caller's clock, µs).
    pub at: u64,
    /// The payload's first bytes.
    pub prefix: Vec<u8>,
}

/// Counters (read by the `wse_cluster_*` metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Publications dropped for a peer over its queue cap.
    pub dropped_queue: u64,
    /// Publications dropped for being larger than a frame.
    pub dropped_too_large: u64,
    /// Received publications nobody here wanted (a peer sent before knowing our interest).
    pub unwanted: u64,
    /// Sessions closed as duplicates.
    pub duplicates_closed: u64,
    /// Suspicions raised here.
    pub suspicions: u64,
    /// Refutations of our own suspicion.
    pub refutations: u64,
    /// Subscriptions acknowledged after the bounded wait.
    pub sub_ack_timeouts: u64,
    /// Held publications sent unfiltered (hold buffer overflow or timeout).
    pub hold_overflows: u64,
    /// Fresh snapshots asked for because a peer's DIGEST disagreed with its table here.
    pub resyncs: u64,
    /// Inbound sockets refused over the unauthenticated caps.
    pub refused_unauthenticated: u64,
    /// Batch bytes before compression.
    pub batch_bytes_raw: u64,
    /// Batch bytes on the wire.
    pub batch_bytes_wire: u64,
    /// Entries ever put in the dead letter queue (its readers see from this that it changed).
    pub dead_lettered: u64,
}

/// Where a dial was going.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Seed(String),
    Member(String),
    Inbound,
}

struct Session {
    peer: String,
    incarnation: u64,
    capabilities: u64,
    /// (dialled by the lower name ? 0 : 1, dial counter): the lower key survives a duplicate.
    keep_key: (u8, u64),
    decoder: FrameDecoder,
    next_gen: u64,
    acked_gen: u64,
    remote: RemoteInterest,
    hold: Vec<PubRecord>,
    hold_bytes: usize,
    hold_since: Option<u64>,
    forward_all: bool,
    ctrl: Vec<CtrlRecord>,
    ack_due: bool,
    batch: Vec<u8>,
    batch_records: usize,
    rtt_us: Option<u64>,
    next_digest: u64,
    /// Data frames received while an older session of this pair is still draining: processed
    /// once it has, so one publisher's publications never overtake each other.
    deferred: VecDeque<RawFrame>,
    deferred_bytes: usize,
}

enum Phase {
    Dialing,
    Handshake(Box<Handshake>),
    Session(Box<Session>),
    /// Closed as a duplicate: read (and deliver) until the peer's GOODBYE, then close.
    Closing(FrameDecoder, u64, String),
}

struct Conn {
    addr: String,
    role: Role,
    target: Target,
    phase: Phase,
    last_recv: u64,
    last_sent: u64,
    outstanding: usize,
    /// Last time the socket took bytes (or had none pending): enqueueing is not progress.
    last_progress: u64,
    /// PSK sessions after AUTH: every byte each way is sealed.
    sealer: Option<Sealer>,
    opener: Option<Opener>,
}

struct Member {
    incarnation: u64,
    addr: String,
    state: MemberState,
    since: u64,
    primary: Option<ConnId>,
    no_session_since: u64,
    breaker: Breaker,
    confirmations: BTreeSet<String>,
    no_reconnect: bool,
    /// Publications for this peer taken off a session closed as a duplicate before its
    /// survivor was up here; the survivor sends them, filtered by its snapshot.
    carried: Vec<PubRecord>,
    /// What crossed this member's sessions, over every session it has had.
    traffic: Traffic,
}

/// Bytes exchanged with one member over its sessions (handshakes excluded), as the sockets see
/// them (sealed, framed), and its data batches before and after compression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes handed to its sockets.
    pub sent: u64,
    /// Bytes read from its sockets.
    pub received: u64,
    /// Data batch bytes sent, before compression.
    pub batch_raw: u64,
    /// The same batches' bytes on the wire (frame bodies, compressed or not).
    pub batch_wire: u64,
}

struct Probe {
    target: String,
    incarnation: u64,
    asked: usize,
    nacks: usize,
    deadline: u64,
}

struct Relay {
    requester: ConnId,
    id: u64,
    target: String,
    since: u64,
    deadline: u64,
}

struct Ticket {
    waiting: BTreeMap<ConnId, u64>,
    deadline: u64,
}

/// One node's cluster protocol state.
pub struct Node {
    cfg: Config,
    incarnation: u64,
    state: MemberState,
    rng: StdRng,
    now: u64,
    conns: BTreeMap<ConnId, Conn>,
    members: BTreeMap<String, Member>,
    seeds: BTreeMap<String, Breaker>,
    self_addrs: BTreeSet<String>,
    local: LocalInterest,
    probes: BTreeMap<u64, Probe>,
    relays: Vec<Relay>,
    tickets: BTreeMap<u64, Ticket>,
    /// Round-robin position for queue-group picks.
    group_turn: u64,
    /// Patterns without local subscribers, withdrawn at the time given.
    lingering: BTreeMap<Pattern, u64>,
    actions: VecDeque<Action>,
    dlq: VecDeque<DlqEntry>,
    stats: Stats,
    next_conn: ConnId,
    next_id: u64,
    dial_seq: u64,
    next_rejoin: u64,
}

/// A member as seen from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Name.
    pub name: String,
    /// Incarnation.
    pub incarnation: u64,
    /// State.
    pub state: MemberState,
    /// The connection carrying its link, if up.
    pub link: Option<ConnId>,
    /// Smoothed RTT of that link, µs.
    pub rtt_us: Option<u64>,
    /// What crossed its sessions.
    pub traffic: Traffic,
}

/// PING/PONG bodies and PROBE ids are u64s.
fn u64_body(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

impl Node {
    /// A node at `incarnation` (choose it larger than any earlier start's, e.g. from the wall
    /// clock; a peer that knows a higher one says so and this node jumps past it), with a seeded
    /// RNG (jitter, nonces) so that simulations replay exactly.
    pub fn new(cfg: Config, incarnation: u64, seed: u64, now: u64) -> Self {
        let mut seeds = BTreeMap::new();
        for s in &cfg.seeds {
            if *s != cfg.advertised {
                seeds.insert(s.clone(), Breaker::default());
            }
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let next_rejoin = now + jitter(cfg.timing.rejoin_interval, &mut rng);
        Self {
            self_addrs: BTreeSet::from([cfg.advertised.clone()]),
            cfg,
            incarnation,
            state: MemberState::Alive,
            rng,
            now,
            conns: BTreeMap::new(),
            members: BTreeMap::new(),
            seeds,
            local: LocalInterest::default(),
            probes: BTreeMap::new(),
            relays: Vec::new(),
            tickets: BTreeMap::new(),
            group_turn: 0,
            lingering: BTreeMap::new(),
            actions: VecDeque::new(),
            dlq: VecDeque::new(),
            stats: Stats::default(),
            next_conn: 1,
            next_id: 1,
            dial_seq: 0,
            next_rejoin,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Introspection.

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }
    /// This node's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }
    /// Known members (not this node).
    pub fn members(&self) -> Vec<MemberView> {
        self.members
            .iter()
            .map(|(n, m)| MemberView {
                name: n.clone(),
                incarnation: m.incarnation,
                state: m.state,
                link: m.primary,
                rtt_us: m
                    .primary
                    .and_then(|c| self.session(c))
                    .and_then(|s| s.rtt_us),
                traffic: m.traffic,
            })
            .collect()
    }
    /// Established, non-closing sessions: (connection, peer).
    pub fn sessions(&self) -> Vec<(ConnId, String)> {
        self.conns
            .iter()
            .filter_map(|(id, c)| match &c.phase {
                Phase::Session(s) => Some((*id, s.peer.clone())),
                _ => None,
            })
            .collect()
    }
    /// Connections in any phase.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
    /// What `peer` wants as received on its link, if the link is up and synced.
    pub fn remote_interest(&self, peer: &str) -> Option<BTreeSet<Pattern>> {
        let c = self.members.get(peer)?.primary?;
        let s = self.session(c)?;
        s.remote.synced().then(|| s.remote.table().patterns())
    }
    /// What this node advertises.
    pub fn local_interest(&self) -> BTreeSet<Pattern> {
        self.local.set().patterns()
    }
    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    /// The limits this node runs with.
    pub fn limits(&self) -> &Limits {
        &self.cfg.limits
    }
    /// The dead letter queue, oldest first.
    pub fn dlq(&self) -> impl Iterator<Item = &DlqEntry> {
        self.dlq.iter()
    }
    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn session(&self, c: ConnId) -> Option<&Session> {
        match &self.conns.get(&c)?.phase {
            Phase::Session(s) => Some(s),
            _ => None,
        }
    }
    fn session_mut(&mut self, c: ConnId) -> Option<&mut Session> {
        match &mut self.conns.get_mut(&c)?.phase {
            Phase::Session(s) => Some(s),
            _ => None,
        }
    }
    fn identity(&self) -> Identity {
        Identity {
            cluster: self.cfg.cluster.clone(),
            name: self.cfg.name.clone(),
            incarnation: self.incarnation,
            advertised: self.cfg.advertised.clone(),
            fingerprint: self.cfg.fingerprint,
        }
    }
    fn own_record(&self) -> MemberRecord {
        MemberRecord {
            name: self.cfg.name.clone(),
            incarnation: self.incarnation,
            addr: self.cfg.advertised.clone(),
            state: self.state,
        }
    }
    fn record_of(&self, name: &str) -> Option<MemberRecord> {
        let m = self.members.get(name)?;
        Some(MemberRecord {
            name: name.to_owned(),
            incarnation: m.incarnation,
            addr: m.addr.clone(),
            state: m.state,
        })
    }
    fn send_raw(&mut self, conn: ConnId, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let mut bytes = bytes;
        if let Some(c) = self.conns.get_mut(&conn) {
            if let Some(s) = &mut c.sealer {
                let mut sealed = Vec::with_capacity(bytes.len() + 64);
                s.seal(&bytes, &mut sealed);
                bytes = sealed;
            }
            c.last_sent = self.now;
            if c.outstanding == 0 {
                c.last_progress = self.now;
            }
            c.outstanding += bytes.len();
        }
        let n = bytes.len() as u64;
        self.count_traffic(conn, |t| t.sent += n);
        self.actions.push_back(Action::Send { conn, bytes });
    }
    fn event(&mut self, e: Event) {
        self.actions.push_back(Action::Event(e));
    }
    /// Adds to the traffic of the member whose session `conn` carries, if it carries one.
    fn count_traffic(&mut self, conn: ConnId, add: impl FnOnce(&mut Traffic)) {
        if let Some(c) = self.conns.get(&conn)
            && let Phase::Session(s) = &c.phase
            && let Some(m) = self.members.get_mut(&s.peer)
        {
            add(&mut m.traffic);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Socket events.

    /// An inbound connection from `addr`; `None` if over the unauthenticated caps (close it).
    pub fn accept(&mut self, addr: &str, now: u64) -> Option<ConnId> {
        self.now = now;
        let unauth = |c: &&Conn| c.role == Role::Acceptor && matches!(c.phase, Phase::Handshake(_));
        let total = self.conns.values().filter(unauth).count();
        let same_ip = self
            .conns
            .values()
            .filter(unauth)
            .filter(|c| host_of(&c.addr) == host_of(addr))
            .count();
        if total >= self.cfg.limits.max_unauthenticated
            || same_ip >= self.cfg.limits.max_unauthenticated_per_ip
        {
            self.stats.refused_unauthenticated += 1;
            return None;
        }
        let id = self.new_conn(addr.to_owned(), Role::Acceptor, Target::Inbound);
        self.start_handshake(id);
        Some(id)
    }

    /// A dial completed.
    pub fn connected(&mut self, conn: ConnId, now: u64) {
        self.now = now;
        if matches!(
            self.conns.get(&conn).map(|c| &c.phase),
            Some(Phase::Dialing)
        ) {
            self.start_handshake(conn);
        }
    }

    /// With `tls`: the transport verified the peer's certificate of `conn` (inbound or dialled);
    /// `names` says which node names it is valid for, and the HELLO must carry one of them.
    /// Given before the connection's first input.
    pub fn certified(&mut self, conn: ConnId, names: handshake::CertifiedNames) {
        if let Some(Conn {
            phase: Phase::Handshake(h),
            ..
        }) = self.conns.get_mut(&conn)
        {
            h.certified(names);
        }
    }

    /// The peer address of `conn`, while it is open.
    pub fn conn_addr(&self, conn: ConnId) -> Option<String> {
        self.conns.get(&conn).map(|c| c.addr.clone())
    }

    /// A dial failed.
    pub fn dial_failed(&mut self, conn: ConnId, now: u64) {
        self.now = now;
        if let Some(c) = self.conns.remove(&conn) {
            self.target_failed(&c.target);
        }
    }

    /// The connection was closed or reset by the peer or the network.
    pub fn closed(&mut self, conn: ConnId, now: u64) {
        self.now = now;
        self.drop_conn(conn, false);
    }

    /// `n` bytes of what was sent on `conn` reached the socket.
    pub fn transmitted(&mut self, conn: ConnId, n: usize) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.outstanding = c.outstanding.saturating_sub(n);
            if n > 0 {
                c.last_progress = self.now;
            }
        }
    }

    /// Bytes received on `conn`.
    pub fn input(&mut self, conn: ConnId, bytes: &[u8], now: u64) {
        self.now = now;
        let n = bytes.len() as u64;
        self.count_traffic(conn, |t| t.received += n);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.last_recv = now;
        let opened;
        let bytes = match &mut c.opener {
            Some(o) => {
                let mut plain = Vec::new();
                if o.open(bytes, &mut plain).is_err() {
                    // Tampered, replayed or not ours: nothing from this socket is trusted.
                    return self.protocol_error(conn);
                }
                opened = plain;
                &opened[..]
            }
            None => bytes,
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        match &mut c.phase {
            Phase::Dialing => {}
            Phase::Handshake(h) => {
                let mut out = Vec::new();
                let step = h.feed(bytes, now, &mut out);
                self.send_raw(conn, out);
                match step {
                    Step::Continue => {}
                    Step::Failed(e) => self.handshake_failed(conn, e),
                    Step::Established(p) => {
                        let Some(Conn { phase, .. }) = self.conns.get_mut(&conn) else {
                            return;
                        };
                        let Phase::Handshake(h) = std::mem::replace(phase, Phase::Dialing) else {
                            return;
                        };
                        let keys = h.session_keys();
                        let mut decoder = h.into_decoder();
                        if let Some(k) = keys {
                            // From here on both directions are sealed; what followed AUTH in
                            // this read is already sealed.
                            let mut opener = Opener::new(&k.recv);
                            let mut plain = Vec::new();
                            let ok = opener.open(&decoder.take_buffered(), &mut plain).is_ok();
                            decoder.push(&plain);
                            let c = self.conns.get_mut(&conn).expect("live");
                            c.sealer = Some(Sealer::new(&k.send));
                            c.opener = Some(opener);
                            if !ok {
                                return self.protocol_error(conn);
                            }
                        }
                        self.established(conn, p, decoder);
                        // Frames that followed the handshake in the same read.
                        self.process_frames(conn);
                    }
                }
            }
            Phase::Session(s) => {
                s.decoder.push(bytes);
                self.process_frames(conn);
            }
            Phase::Closing(d, ..) => {
                d.push(bytes);
                self.process_closing(conn);
            }
        }
        self.relay_heard(conn);
    }

    fn new_conn(&mut self, addr: String, role: Role, target: Target) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        let now = self.now;
        self.conns.insert(
            id,
            Conn {
                addr,
                role,
                target,
                phase: Phase::Dialing,
                last_recv: now,
                last_sent: now,
                outstanding: 0,
                last_progress: now,
                sealer: None,
                opener: None,
            },
        );
        id
    }

    fn start_handshake(&mut self, conn: ConnId) {
        let ident = self.identity();
        let security = self.cfg.security.clone();
        let nonce: [u8; 32] = self.rng.random();
        let deadline = self.now + self.cfg.timing.handshake_timeout;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let mut out = Vec::new();
        let seq = if c.role == Role::Dialer {
            self.dial_seq += 1;
            self.dial_seq
        } else {
            0
        };
        let h = Handshake::start(c.role, ident, security, seq, nonce, deadline, &mut out);
        c.phase = Phase::Handshake(Box::new(h));
        c.last_recv = self.now;
        self.send_raw(conn, out);
    }

    fn dial(&mut self, addr: String, target: Target) {
        let id = self.new_conn(addr.clone(), Role::Dialer, target);
        self.actions.push_back(Action::Dial { conn: id, addr });
    }

    fn target_failed(&mut self, t: &Target) {
        let now = self.now;
        match t {
            Target::Seed(a) => {
                if let Some(b) = self.seeds.get_mut(a) {
                    b.failure(now, &mut self.rng);
                }
            }
            Target::Member(n) => {
                if let Some(m) = self.members.get_mut(n) {
                    m.breaker.failure(now, &mut self.rng);
                }
            }
            Target::Inbound => {}
        }
    }

    fn handshake_failed(&mut self, conn: ConnId, e: HandshakeError) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.actions.push_back(Action::Close { conn });
        match &e {
            HandshakeError::Refused(Reason::SelfDial)
            | HandshakeError::PeerGoodbye(Goodbye {
                reason: Reason::SelfDial,
                ..
            }) => {
                // Never dial this address again.
                self.seeds.remove(&c.addr);
                self.self_addrs.insert(c.addr.clone());
            }
            HandshakeError::Refused(Reason::NameConflict) => {
                self.event(Event::NameConflict {
                    name: self.cfg.name.clone(),
                    addr: c.addr.clone(),
                });
                self.target_failed(&c.target);
            }
            _ => self.target_failed(&c.target),
        }
        self.event(Event::HandshakeFailed {
            addr: c.addr,
            error: e.to_string(),
        });
    }

    // -----------------------------------------------------------------------------------------
    // Pair rules.

    fn established(&mut self, conn: ConnId, p: PeerInfo, decoder: FrameDecoder) {
        let now = self.now;
        let role = self.conns[&conn].role;
        let refuse = |node: &mut Self, reason: Reason, inc: u64| {
            let mut out = Vec::new();
            handshake::write_goodbye(&mut out, reason, false, inc);
            node.send_raw(conn, out);
            node.conns.remove(&conn);
            node.actions.push_back(Action::Close { conn });
        };
        let known = self
            .members
            .get(&p.name)
            .map(|m| (m.incarnation, m.state, m.addr.clone(), m.primary));
        if let Some((m_inc, m_state, m_addr, m_primary)) = known {
            if p.incarnation < m_inc {
                return refuse(self, Reason::StaleIncarnation, m_inc);
            }
            if m_state == MemberState::Left && p.incarnation == m_inc {
                return refuse(self, Reason::Left, m_inc);
            }
            if p.incarnation > m_inc {
                // A live old self elsewhere means two processes share the name.
                let old_live = m_primary.and_then(|c| self.conns.get(&c)).is_some_and(|c| {
                    now.saturating_sub(c.last_recv) < self.cfg.timing.link_timeout
                }) && m_addr != p.advertised;
                if old_live {
                    self.event(Event::NameConflict {
                        name: p.name.clone(),
                        addr: p.advertised.clone(),
                    });
                    return refuse(self, Reason::NameConflict, 0);
                }
                // A restart: the old incarnation is dead at once, its sessions closed.
                let old: Vec<ConnId> = self.conns_of(&p.name);
                for c in old {
                    self.drop_conn_quietly(c);
                }
                self.set_member(&p.name, p.incarnation, &p.advertised, MemberState::Alive);
            }
        } else {
            let live = self
                .members
                .values()
                .filter(|m| !matches!(m.state, MemberState::Dead | MemberState::Left))
                .count();
            if live + 1 >= self.cfg.limits.max_members {
                return refuse(self, Reason::ClusterFull, 0);
            }
            self.set_member(&p.name, p.incarnation, &p.advertised, MemberState::Alive);
        }
        let dialer = if role == Role::Dialer {
            self.cfg.name.as_str()
        } else {
            p.name.as_str()
        };
        let lower = self.cfg.name.as_str().min(p.name.as_str());
        let keep_key = (u8::from(dialer != lower), p.dial_seq);
        if let Some(Conn {
            target: Target::Seed(a),
            ..
        }) = self.conns.get(&conn)
            && let Some(b) = self.seeds.get_mut(&a.clone())
        {
            b.success();
        }
        let session = Session {
            peer: p.name.clone(),
            incarnation: p.incarnation,
            capabilities: p.capabilities,
            keep_key,
            decoder,
            next_gen: 1,
            acked_gen: 0,
            remote: RemoteInterest::default(),
            hold: Vec::new(),
            hold_bytes: 0,
            hold_since: Some(now),
            forward_all: false,
            ctrl: Vec::new(),
            ack_due: false,
            batch: Vec::new(),
            batch_records: 0,
            rtt_us: None,
            next_digest: now + self.cfg.timing.digest_interval,
            deferred: VecDeque::new(),
            deferred_bytes: 0,
        };
        self.conns.get_mut(&conn).expect("live").phase = Phase::Session(Box::new(session));
        // Rule 3: of two sessions of a pair, both ends keep the one dialled by the lower name
        // (then the older dial of that node), so both agree without looking at arrival order.
        let m = self.members.get_mut(&p.name).expect("inserted above");
        m.breaker.success();
        let existing = m.primary;
        match existing {
            Some(old) if old != conn => {
                let old_key = self.session(old).map(|s| s.keep_key);
                if old_key.is_some_and(|k| k < keep_key) {
                    self.close_duplicate(conn);
                    return;
                }
                // What was held for the peer on the old session moves to the survivor, which
                // filters it through the snapshot it will receive.
                let held = self.session_mut(old).map(|s| {
                    s.hold_bytes = 0;
                    std::mem::take(&mut s.hold)
                });
                self.close_duplicate(old);
                self.make_primary(conn, &p.name);
                if let Some(s) = self.session_mut(conn) {
                    for r in held.unwrap_or_default() {
                        s.hold_bytes += r.encoded_len();
                        s.hold.push(r);
                    }
                }
                return;
            }
            _ => {}
        }
        self.make_primary(conn, &p.name);
    }

    fn make_primary(&mut self, conn: ConnId, peer: &str) {
        let hold_max = self.cfg.limits.hold_bytes;
        let m = self.members.get_mut(peer).expect("member");
        m.primary = Some(conn);
        let carried = std::mem::take(&mut m.carried);
        // Full table push/pull at session start, then the interest snapshot.
        let mut table = vec![self.own_record()];
        table.extend(self.members.keys().filter_map(|n| self.record_of(n)));
        let snapshot = self.local.snapshot(1);
        let s = self.session_mut(conn).expect("session");
        s.ctrl.push(CtrlRecord::Members(table));
        s.ctrl.extend(snapshot);
        s.next_gen = 2;
        let mut over = Vec::new();
        for r in carried {
            if s.hold_bytes + r.encoded_len() > hold_max {
                over.push(r);
            } else {
                s.hold_bytes += r.encoded_len();
                s.hold.push(r);
            }
        }
        let now = self.now;
        for r in over {
            self.stats.dropped_queue += 1;
            self.dead_letter(peer.to_owned(), &r, "hold_full", now);
        }
        self.event(Event::LinkUp {
            peer: peer.to_owned(),
        });
    }

    fn close_duplicate(&mut self, conn: ConnId) {
        self.stats.duplicates_closed += 1;
        let mut out = Vec::new();
        // Pending control and data go first so nothing queued on it is lost.
        self.flush_conn(conn);
        handshake::write_goodbye(&mut out, Reason::Duplicate, false, 0);
        self.send_raw(conn, out);
        let deadline = self.now + self.cfg.timing.closing_timeout;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Phase::Session(s) = std::mem::replace(&mut c.phase, Phase::Dialing) else {
            return;
        };
        let peer = s.peer.clone();
        c.phase = Phase::Closing(s.decoder, deadline, peer.clone());
        if let Some(m) = self.members.get_mut(&peer)
            && m.primary == Some(conn)
        {
            m.primary = None;
        }
        self.ticket_conn_gone(conn);
    }

    fn conns_of(&self, peer: &str) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| matches!(&c.phase, Phase::Session(s) if s.peer == peer))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Forgets a connection whose loss says nothing about the peer's health (a restart replaced
    /// it, or the peer closed it as a duplicate of another session): no probe.
    fn drop_conn_quietly(&mut self, conn: ConnId) {
        self.drop_conn_inner(conn, true, false);
    }

    /// Forgets a connection; `close` = we close it (else the socket is already gone). Losing a
    /// member's link starts the indirect probe.
    fn drop_conn(&mut self, conn: ConnId, close: bool) {
        self.drop_conn_inner(conn, close, true);
    }

    fn drop_conn_inner(&mut self, conn: ConnId, close: bool, probe: bool) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if close {
            self.actions.push_back(Action::Close { conn });
        }
        self.ticket_conn_gone(conn);
        match c.phase {
            Phase::Dialing | Phase::Handshake(_) => self.target_failed(&c.target),
            Phase::Closing(_, _, peer) => self.release_deferred(&peer),
            Phase::Session(s) => {
                let Session {
                    peer, hold, batch, ..
                } = *s;
                let Some(m) = self.members.get_mut(&peer) else {
                    return;
                };
                if m.primary != Some(conn) {
                    return;
                }
                m.primary = None;
                if !probe {
                    // Closed as a duplicate (or replaced): what was waiting for the peer goes
                    // with the next session instead of being lost.
                    m.carried.extend(hold);
                    m.carried
                        .extend(wire::decode_batch(0, &batch).unwrap_or_default());
                }
                m.no_session_since = self.now;
                let (state, inc) = (m.state, m.incarnation);
                self.event(Event::LinkDown { peer: peer.clone() });
                // Probes relayed to it get their answer now rather than at the deadline.
                let mut i = 0;
                while i < self.relays.len() {
                    if self.relays[i].target == peer {
                        let r = self.relays.swap_remove(i);
                        if let Some(s) = self.session_mut(r.requester) {
                            s.ctrl.push(CtrlRecord::ProbeAck {
                                id: r.id,
                                alive: false,
                            });
                        }
                    } else {
                        i += 1;
                    }
                }
                if probe && matches!(state, MemberState::Alive | MemberState::Leaving) {
                    self.start_probe(&peer, inc);
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Frames on an established session.

    fn process_frames(&mut self, conn: ConnId) {
        loop {
            let Some(s) = self.session_mut(conn) else {
                return;
            };
            match s.decoder.next_frame() {
                Ok(Some(f)) => self.on_frame(conn, f),
                Ok(None) => return,
                Err(_) => return self.protocol_error(conn),
            }
        }
    }

    fn process_closing(&mut self, conn: ConnId) {
        loop {
            let Some(Conn {
                phase: Phase::Closing(d, ..),
                ..
            }) = self.conns.get_mut(&conn)
            else {
                return;
            };
            match d.next_frame() {
                Ok(Some(f)) => match f.ty {
                    // Data sent before the peer saw our GOODBYE is still delivered.
                    FrameType::Batch => self.on_batch(conn, &f),
                    FrameType::Goodbye => return self.drop_conn(conn, true),
                    _ => {}
                },
                Ok(None) => return,
                Err(_) => return self.drop_conn(conn, true),
            }
        }
    }

    fn protocol_error(&mut self, conn: ConnId) {
        let mut out = Vec::new();
        handshake::write_goodbye(&mut out, Reason::Protocol, false, 0);
        self.send_raw(conn, out);
        self.drop_conn(conn, true);
    }

    fn on_frame(&mut self, conn: ConnId, f: RawFrame) {
        match f.ty {
            FrameType::Ping => {
                let Ok(t) = wire::decode_u64(&f.body, "PING") else {
                    return self.protocol_error(conn);
                };
                let mut out = Vec::new();
                wire::encode_frame(&mut out, FrameType::Pong, 0, &u64_body(t));
                self.send_raw(conn, out);
            }
            FrameType::Pong => {
                let Ok(t) = wire::decode_u64(&f.body, "PONG") else {
                    return self.protocol_error(conn);
                };
                let now = self.now;
                if let Some(s) = self.session_mut(conn) {
                    let sample = now.saturating_sub(t);
                    s.rtt_us = Some(s.rtt_us.map_or(sample, |r| (r * 7 + sample) / 8));
                }
            }
            FrameType::Ctrl => match wire::decode_ctrl(&f.body) {
                Ok(recs) => {
                    for r in recs {
                        if self.session(conn).is_none() {
                            return;
                        }
                        self.on_ctrl(conn, r);
                    }
                }
                Err(_) => self.protocol_error(conn),
            },
            FrameType::Batch => {
                let hold_max = self.cfg.limits.hold_bytes;
                let Some(peer) = self.session(conn).map(|s| s.peer.clone()) else {
                    return;
                };
                let draining = self.closing_to(&peer);
                let Some(s) = self.session_mut(conn) else {
                    return;
                };
                if (draining || !s.deferred.is_empty())
                    && s.deferred_bytes + f.body.len() <= hold_max
                {
                    s.deferred_bytes += f.body.len();
                    s.deferred.push_back(f);
                } else {
                    self.on_batch(conn, &f);
                }
            }
            FrameType::Goodbye => {
                let g = Goodbye::decode(&f.body).ok();
                self.on_goodbye(conn, g);
            }
            FrameType::Hello | FrameType::Auth => self.protocol_error(conn),
        }
    }

    /// Whether a session to `peer` closed as a duplicate is still being read.
    fn closing_to(&self, peer: &str) -> bool {
        self.conns
            .values()
            .any(|c| matches!(&c.phase, Phase::Closing(_, _, p) if p == peer))
    }

    /// The older session to `peer` has drained: its successor's deferred data goes now.
    fn release_deferred(&mut self, peer: &str) {
        if self.closing_to(peer) {
            return;
        }
        let Some(c) = self.members.get(peer).and_then(|m| m.primary) else {
            return;
        };
        let Some(s) = self.session_mut(c) else {
            return;
        };
        let frames = std::mem::take(&mut s.deferred);
        s.deferred_bytes = 0;
        for f in frames {
            self.on_batch(c, &f);
        }
    }

    fn on_batch(&mut self, conn: ConnId, f: &RawFrame) {
        let peer = match &self.conns.get(&conn).map(|c| &c.phase) {
            Some(Phase::Session(s)) => s.peer.clone(),
            Some(Phase::Closing(_, _, peer)) => peer.clone(),
            _ => return,
        };
        match wire::decode_batch(f.flags, &f.body) {
            Ok(recs) => {
                for r in recs {
                    match r.group {
                        Some(group) if self.local.wanted_group(&r.topic, &group) => {
                            self.actions.push_back(Action::DeliverGroup {
                                from: peer.clone(),
                                topic: r.topic,
                                group,
                                payload: r.payload,
                            });
                        }
                        None if self.local.wanted(&r.topic) => {
                            self.actions.push_back(Action::Deliver {
                                from: peer.clone(),
                                topic: r.topic,
                                payload: r.payload,
                            });
                        }
                        // The member left meanwhile: at most once, counted.
                        _ => self.stats.unwanted += 1,
                    }
                }
            }
            Err(_) => self.protocol_error(conn),
        }
    }

    fn on_goodbye(&mut self, conn: ConnId, g: Option<Goodbye>) {
        let peer = self.session(conn).map(|s| (s.peer.clone(), s.incarnation));
        if let (Some(g), Some((peer, inc))) = (&g, &peer) {
            match g.reason {
                Reason::Left => {
                    self.set_member(peer, g.incarnation.max(*inc), "", MemberState::Left);
                    if let Some(m) = self.members.get_mut(peer) {
                        m.no_reconnect = true;
                    }
                }
                Reason::StaleIncarnation if g.incarnation >= self.incarnation => {
                    self.refute(g.incarnation);
                }
                _ => {}
            }
            if g.no_reconnect
                && let Some(m) = self.members.get_mut(peer)
            {
                m.no_reconnect = true;
            }
        }
        if matches!(
            g,
            Some(Goodbye {
                reason: Reason::Duplicate,
                ..
            })
        ) {
            // The peer closes this one as the duplicate; our own rule picked the same (or will
            // when the other session finishes its handshake), so this is no sign of failure.
            let mut out = Vec::new();
            handshake::write_goodbye(&mut out, Reason::Duplicate, false, 0);
            self.send_raw(conn, out);
            return self.drop_conn_quietly(conn);
        }
        self.drop_conn(conn, true);
    }

    fn on_ctrl(&mut self, conn: ConnId, r: CtrlRecord) {
        match r {
            CtrlRecord::Members(ms) => {
                let from = self
                    .session(conn)
                    .map(|s| s.peer.clone())
                    .unwrap_or_default();
                for m in ms {
                    self.merge_member(&m, &from);
                }
            }
            CtrlRecord::Probe {
                id,
                target,
                incarnation: _,
            } => {
                let target_conn = self.members.get(&target).and_then(|m| m.primary);
                match target_conn {
                    Some(tc) if self.relays.len() < MAX_RELAYS => {
                        let mut out = Vec::new();
                        wire::encode_frame(&mut out, FrameType::Ping, 0, &u64_body(self.now));
                        self.send_raw(tc, out);
                        let deadline = self.now + self.cfg.timing.probe_timeout;
                        self.relays.push(Relay {
                            requester: conn,
                            id,
                            target,
                            since: self.now,
                            deadline,
                        });
                    }
                    _ => {
                        if let Some(s) = self.session_mut(conn) {
                            s.ctrl.push(CtrlRecord::ProbeAck { id, alive: false });
                        }
                    }
                }
            }
            CtrlRecord::ProbeAck { id, alive } => {
                if alive {
                    // Only our link is down: the member stays, the breaker redials.
                    self.probes.remove(&id);
                } else if let Some(p) = self.probes.get_mut(&id) {
                    p.nacks += 1;
                    if p.nacks >= p.asked {
                        let p = self.probes.remove(&id).expect("present");
                        self.suspect(&p.target, p.incarnation);
                    }
                }
            }
            CtrlRecord::Ack { generation } => {
                if let Some(s) = self.session_mut(conn) {
                    s.acked_gen = s.acked_gen.max(generation);
                }
                self.check_tickets();
            }
            CtrlRecord::Digest {
                generation,
                count,
                digest,
            } => {
                let Some(s) = self.session_mut(conn) else {
                    return;
                };
                if !s.remote.agrees(generation, count, digest) {
                    s.ctrl.push(CtrlRecord::Resync);
                    self.stats.resyncs += 1;
                }
            }
            CtrlRecord::Resync => {
                let Some(generation) = self.session(conn).map(|s| s.next_gen) else {
                    return;
                };
                let snapshot = self.local.snapshot(generation);
                if let Some(s) = self.session_mut(conn) {
                    s.ctrl.extend(snapshot);
                    s.next_gen = generation + 1;
                }
            }
            CtrlRecord::Unknown(_) => {}
            rec => {
                let Some(s) = self.session_mut(conn) else {
                    return;
                };
                match s.remote.apply(&rec) {
                    Ok(ack) => {
                        s.ack_due |= ack;
                        if matches!(rec, CtrlRecord::SyncEnd { .. }) {
                            self.release_hold(conn);
                        }
                    }
                    Err(_) => self.protocol_error(conn),
                }
            }
        }
    }

    fn relay_heard(&mut self, conn: ConnId) {
        let Some(peer) = self.session(conn).map(|s| s.peer.clone()) else {
            return;
        };
        let now = self.now;
        let mut i = 0;
        while i < self.relays.len() {
            if self.relays[i].target == peer && now >= self.relays[i].since {
                let r = self.relays.swap_remove(i);
                if let Some(s) = self.session_mut(r.requester) {
                    s.ctrl.push(CtrlRecord::ProbeAck {
                        id: r.id,
                        alive: true,
                    });
                }
            } else {
                i += 1;
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Membership.

    fn set_member(&mut self, name: &str, incarnation: u64, addr: &str, state: MemberState) {
        let now = self.now;
        let m = self
            .members
            .entry(name.to_owned())
            .or_insert_with(|| Member {
                incarnation,
                addr: addr.to_owned(),
                state,
                since: now,
                primary: None,
                no_session_since: now,
                breaker: Breaker::default(),
                confirmations: BTreeSet::new(),
                no_reconnect: false,
                carried: Vec::new(),
                traffic: Traffic::default(),
            });
        let changed = (m.state, m.incarnation) != (state, incarnation);
        if incarnation > m.incarnation {
            m.no_reconnect = false;
        }
        m.incarnation = incarnation;
        m.state = state;
        if !addr.is_empty() {
            m.addr = addr.to_owned();
        }
        if changed || m.since == now {
            m.since = now;
            m.confirmations.clear();
        }
        let rec = MemberRecord {
            name: name.to_owned(),
            incarnation,
            addr: m.addr.clone(),
            state,
        };
        self.event(Event::Member {
            name: name.to_owned(),
            incarnation,
            state,
        });
        // Full mesh: every change is pushed on every link (no gossip rounds).
        for c in self.primaries() {
            if let Some(s) = self.session_mut(c) {
                s.ctrl.push(CtrlRecord::Members(vec![rec.clone()]));
            }
        }
        if matches!(state, MemberState::Dead | MemberState::Left) {
            for c in self.conns_of(name) {
                self.drop_conn(c, true);
            }
            self.probes.retain(|_, p| p.target != name);
            if let Some(m) = self.members.get_mut(name) {
                m.carried.clear();
            }
        }
    }

    fn primaries(&self) -> Vec<ConnId> {
        self.members.values().filter_map(|m| m.primary).collect()
    }

    fn merge_member(&mut self, r: &MemberRecord, from: &str) {
        if r.name == self.cfg.name {
            let threatened = matches!(r.state, MemberState::Suspect | MemberState::Dead)
                || r.state == MemberState::Left && self.state != MemberState::Left;
            if r.incarnation > self.incarnation || threatened && r.incarnation >= self.incarnation {
                self.refute(r.incarnation);
            }
            return;
        }
        match self.members.get_mut(&r.name) {
            None => {
                if matches!(r.state, MemberState::Dead | MemberState::Left) {
                    return; // nothing to forget
                }
                // A peer cannot grow the table past the cluster's size.
                let live = self
                    .members
                    .values()
                    .filter(|m| !matches!(m.state, MemberState::Dead | MemberState::Left))
                    .count();
                if live + 1 >= self.cfg.limits.max_members {
                    return;
                }
                self.set_member(&r.name, r.incarnation, &r.addr, r.state);
            }
            Some(m) => {
                if r.state == MemberState::Suspect
                    && m.state == MemberState::Suspect
                    && r.incarnation == m.incarnation
                {
                    m.confirmations.insert(from.to_owned());
                    return;
                }
                // A higher incarnation by gossip may be a refutation as well as a restart: only
                // a HELLO (a new session) proves a restart and replaces old sessions.
                if supersedes((r.state, r.incarnation), (m.state, m.incarnation)) {
                    self.set_member(&r.name, r.incarnation, &r.addr, r.state);
                    if r.state == MemberState::Suspect
                        && let Some(m) = self.members.get_mut(&r.name)
                    {
                        m.confirmations.insert(from.to_owned());
                    }
                }
            }
        }
    }

    fn refute(&mut self, heard: u64) {
        self.incarnation = self.incarnation.max(heard) + 1;
        self.stats.refutations += 1;
        if self.state == MemberState::Suspect || self.state == MemberState::Dead {
            self.state = MemberState::Alive;
        }
        self.event(Event::Refuted {
            incarnation: self.incarnation,
        });
        let rec = self.own_record();
        for c in self.primaries() {
            if let Some(s) = self.session_mut(c) {
                s.ctrl.push(CtrlRecord::Members(vec![rec.clone()]));
            }
        }
    }

    fn start_probe(&mut self, target: &str, incarnation: u64) {
        let helpers: Vec<ConnId> = self
            .members
            .iter()
            .filter(|(n, m)| {
                n.as_str() != target && m.state == MemberState::Alive && m.primary.is_some()
            })
            .filter_map(|(_, m)| m.primary)
            .take(self.cfg.limits.indirect_probes)
            .collect();
        if helpers.is_empty() {
            return self.suspect(target, incarnation);
        }
        let id = self.next_id;
        self.next_id += 1;
        for c in &helpers {
            if let Some(s) = self.session_mut(*c) {
                s.ctrl.push(CtrlRecord::Probe {
                    id,
                    target: target.to_owned(),
                    incarnation,
                });
            }
        }
        let deadline = self.now + self.cfg.timing.probe_timeout;
        self.probes.insert(
            id,
            Probe {
                target: target.to_owned(),
                incarnation,
                asked: helpers.len(),
                nacks: 0,
                deadline,
            },
        );
    }

    fn suspect(&mut self, name: &str, incarnation: u64) {
        let Some(m) = self.members.get(name) else {
            return;
        };
        if m.incarnation != incarnation
            || m.primary.is_some()
            || !matches!(m.state, MemberState::Alive | MemberState::Leaving)
        {
            return;
        }
        self.stats.suspicions += 1;
        let addr = m.addr.clone();
        self.set_member(name, incarnation, &addr, MemberState::Suspect);
    }

    // -----------------------------------------------------------------------------------------
    // Timers.

    /// Advances the clock: handshake deadlines, pings, link timeouts, probes, suspicion, dials.
    pub fn tick(&mut self, now: u64) {
        self.now = now;
        let t = self.cfg.timing.clone();
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let (last_recv, last_sent) = (c.last_recv, c.last_sent);
            let write_stalled =
                c.outstanding > 0 && now.saturating_sub(c.last_progress) >= t.link_timeout;
            match &mut c.phase {
                Phase::Handshake(h) => {
                    let mut out = Vec::new();
                    if let Some(e) = h.check_deadline(now, &mut out) {
                        self.send_raw(id, out);
                        self.handshake_failed(id, e);
                    }
                }
                Phase::Session(_) => {
                    // Silence, or a socket that takes nothing: the link is dead either way.
                    if now.saturating_sub(last_recv) >= t.link_timeout || write_stalled {
                        self.drop_conn(id, true);
                    } else if now.saturating_sub(last_sent) >= t.ping_interval {
                        let mut out = Vec::new();
                        wire::encode_frame(&mut out, FrameType::Ping, 0, &u64_body(now));
                        self.send_raw(id, out);
                    }
                }
                Phase::Closing(_, deadline, _) => {
                    if now >= *deadline {
                        self.drop_conn(id, true);
                    }
                }
                Phase::Dialing => {
                    if now.saturating_sub(last_recv) >= t.handshake_timeout {
                        self.dial_failed(id, now);
                        self.actions.push_back(Action::Close { conn: id });
                    }
                }
            }
        }
        // Anti-entropy: each link tells the peer what it should hold for us.
        let (count, digest) = self.local.set().digest();
        for c in self.primaries() {
            if let Some(s) = self.session_mut(c)
                && now >= s.next_digest
            {
                s.next_digest = now + t.digest_interval;
                let generation = s.next_gen - 1;
                s.ctrl.push(CtrlRecord::Digest {
                    generation,
                    count,
                    digest,
                });
            }
        }
        // Holds that waited too long go out unfiltered (the receiver filters; nothing is lost).
        for c in self.primaries() {
            if self
                .session(c)
                .and_then(|s| s.hold_since)
                .is_some_and(|h| now >= h + t.hold_timeout)
            {
                self.stats.hold_overflows += 1;
                self.release_hold(c);
            }
        }
        // Relays and probes.
        let mut expired = Vec::new();
        self.relays.retain(|r| {
            let keep = now < r.deadline;
            if !keep {
                expired.push((r.requester, r.id));
            }
            keep
        });
        for (c, id) in expired {
            if let Some(s) = self.session_mut(c) {
                s.ctrl.push(CtrlRecord::ProbeAck { id, alive: false });
            }
        }
        let due: Vec<u64> = self
            .probes
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let p = self.probes.remove(&id).expect("present");
            self.suspect(&p.target, p.incarnation);
        }
        // Suspicion → Dead; tombstones expire.
        let others = self
            .members
            .values()
            .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Leaving))
            .count();
        let mut dead = Vec::new();
        let mut gone = Vec::new();
        for (n, m) in &self.members {
            match m.state {
                // Connected again (a refutation is on its way): no verdict.
                MemberState::Suspect if m.primary.is_some() => {}
                MemberState::Suspect => {
                    let to = suspicion_timeout(
                        t.suspect_timeout,
                        t.suspect_min,
                        m.confirmations.len(),
                        others,
                    );
                    if now >= m.since + to {
                        dead.push((n.clone(), m.incarnation));
                    }
                }
                MemberState::Dead | MemberState::Left
                    if now >= m.since + t.tombstone && m.primary.is_none() =>
                {
                    gone.push(n.clone());
                }
                _ => {}
            }
        }
        for (n, inc) in dead {
            self.set_member(&n, inc, "", MemberState::Dead);
        }
        for n in gone {
            self.members.remove(&n);
        }
        self.withdraw_lingering();
        self.check_tickets();
        self.dials();
    }

    fn dialling(&self, name: &str, addr: &str) -> bool {
        self.conns.values().any(|c| match (&c.target, &c.phase) {
            (Target::Member(n), Phase::Dialing | Phase::Handshake(_)) => n == name,
            (_, Phase::Dialing | Phase::Handshake(_)) => c.addr == addr,
            _ => false,
        })
    }

    fn dials(&mut self) {
        if self.state == MemberState::Left {
            return;
        }
        let now = self.now;
        let rejoin = now >= self.next_rejoin;
        if rejoin {
            self.next_rejoin = now + jitter(self.cfg.timing.rejoin_interval, &mut self.rng);
        }
        let mut to_dial = Vec::new();
        for (n, m) in &self.members {
            if m.primary.is_some() || m.no_reconnect || m.addr.is_empty() || !m.breaker.ready(now) {
                continue;
            }
            if self.dialling(n, &m.addr) || self.self_addrs.contains(&m.addr) {
                continue;
            }
            let want = match m.state {
                MemberState::Alive | MemberState::Suspect | MemberState::Leaving => {
                    self.cfg.name < *n || now >= m.no_session_since + self.cfg.timing.dial_grace
                }
                MemberState::Dead => rejoin,
                MemberState::Left => false,
            };
            if want {
                to_dial.push((m.addr.clone(), Target::Member(n.clone())));
            }
        }
        // Seeds: at start, and again at each rejoin tick while isolated.
        let isolated = !self.members.values().any(|m| m.primary.is_some());
        let known: BTreeSet<&String> = self
            .members
            .values()
            .filter(|m| m.primary.is_some())
            .map(|m| &m.addr)
            .collect();
        for (a, b) in &self.seeds {
            let first = b.failures() == 0
                && !self.members.values().any(|m| m.primary.is_some())
                && self.dial_seq == 0;
            if !b.ready(now) || known.contains(a) || self.dialling("", a) {
                continue;
            }
            if first || isolated && (rejoin || b.failures() > 0) {
                to_dial.push((a.clone(), Target::Seed(a.clone())));
            }
        }
        for (a, t) in to_dial {
            self.dial(a, t);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Interest and data.

    /// A local subscriber to `pattern` (exact topic or glob). The returned ticket comes back in
    /// [`Action::SubscribeAcked`] once every linked peer has acknowledged the interest (bounded
    /// by `sub_ack_timeout`): after that, a publication anywhere reaches this node.
    pub fn subscribe(&mut self, pattern: &str, now: u64) -> u64 {
        self.subscribe_pattern(Pattern::parse(pattern), now)
    }

    /// [`Node::subscribe`] to exactly `topic`, even when it contains `*` or `?` (a server's
    /// topic names are never globs).
    pub fn subscribe_topic(&mut self, topic: &str, now: u64) -> u64 {
        self.subscribe_pattern(Pattern::exact(topic), now)
    }

    /// [`Node::unsubscribe`] of exactly `topic` (see [`Node::subscribe_topic`]).
    pub fn unsubscribe_topic(&mut self, topic: &str, now: u64) {
        self.unsubscribe_pattern(Pattern::exact(topic), now);
    }

    /// A local member of queue group `group` on `topic`: each publication on `topic` made
    /// anywhere goes to one member per group, cluster-wide (a local one when there is one).
    /// Acknowledged like [`Node::subscribe`].
    pub fn subscribe_group(&mut self, topic: &str, group: &str, now: u64) -> u64 {
        self.subscribe_pattern(Pattern::group(topic, group), now)
    }

    /// A local queue-group member left.
    pub fn unsubscribe_group(&mut self, topic: &str, group: &str, now: u64) {
        self.unsubscribe_pattern(Pattern::group(topic, group), now);
    }

    fn subscribe_pattern(&mut self, p: Pattern, now: u64) -> u64 {
        self.now = now;
        self.lingering.remove(&p);
        let ticket = self.next_id;
        self.next_id += 1;
        let mut waiting = BTreeMap::new();
        if self.local.add(&p) {
            for c in self.primaries() {
                let Some(s) = self.session_mut(c) else {
                    continue;
                };
                let generation = s.next_gen;
                s.next_gen += 1;
                s.ctrl.push(CtrlRecord::Sub {
                    generation,
                    pattern: p.clone(),
                });
                waiting.insert(c, generation);
            }
        } else {
            // Already advertised: wait for whatever earlier ticket is still pending.
            for t in self.tickets.values() {
                for (c, g) in &t.waiting {
                    let e = waiting.entry(*c).or_insert(0);
                    *e = (*e).max(*g);
                }
            }
        }
        self.tickets.insert(
            ticket,
            Ticket {
                waiting,
                deadline: now + self.cfg.timing.sub_ack_timeout,
            },
        );
        self.check_tickets();
        ticket
    }

    /// A local subscriber left.
    pub fn unsubscribe(&mut self, pattern: &str, now: u64) {
        self.unsubscribe_pattern(Pattern::parse(pattern), now);
    }

    fn unsubscribe_pattern(&mut self, p: Pattern, now: u64) {
        self.now = now;
        if self.local.remove(&p) {
            self.lingering.insert(p, now + self.cfg.timing.unsub_linger);
        }
    }

    fn withdraw_lingering(&mut self) {
        let now = self.now;
        let due: Vec<Pattern> = self
            .lingering
            .iter()
            .filter(|(_, t)| now >= **t)
            .map(|(p, _)| p.clone())
            .collect();
        for p in due {
            self.lingering.remove(&p);
            if !self.local.withdraw(&p) {
                continue;
            }
            for c in self.primaries() {
                let Some(s) = self.session_mut(c) else {
                    continue;
                };
                let generation = s.next_gen;
                s.next_gen += 1;
                s.ctrl.push(CtrlRecord::Unsub {
                    generation,
                    pattern: p.clone(),
                });
            }
        }
    }

    fn ticket_conn_gone(&mut self, conn: ConnId) {
        for t in self.tickets.values_mut() {
            t.waiting.remove(&conn);
        }
    }

    fn check_tickets(&mut self) {
        let now = self.now;
        let acked: BTreeMap<ConnId, u64> = self
            .conns
            .iter()
            .filter_map(|(id, c)| match &c.phase {
                Phase::Session(s) => Some((*id, s.acked_gen)),
                _ => None,
            })
            .collect();
        let mut done = Vec::new();
        for (id, t) in &mut self.tickets {
            t.waiting.retain(|c, g| acked.get(c).is_some_and(|a| a < g));
            if t.waiting.is_empty() {
                done.push((*id, false));
            } else if now >= t.deadline {
                done.push((*id, true));
            }
        }
        for (id, timed_out) in done {
            self.tickets.remove(&id);
            self.stats.sub_ack_timeouts += u64::from(timed_out);
            self.actions.push_back(Action::SubscribeAcked {
                ticket: id,
                timed_out,
            });
        }
    }

    /// A local publication: queued once for each linked peer that wants it (held for a peer
    /// whose snapshot is not known yet). Local fan-out is the shards' business.
    pub fn publish(&mut self, topic: &str, payload: &[u8], now: u64) {
        self.now = now;
        if payload.len() + topic.len() + 64 > wire::MAX_FRAME {
            self.stats.dropped_too_large += 1;
            return;
        }
        let rec = PubRecord::new(topic, payload);
        let hold_max = self.cfg.limits.hold_bytes;
        for c in self.primaries() {
            let Some(s) = self.session_mut(c) else {
                continue;
            };
            if s.remote.synced() {
                if s.remote.table().matches(topic) {
                    self.enqueue(c, &rec);
                }
            } else if s.forward_all {
                self.enqueue(c, &rec);
            } else {
                s.hold_bytes += rec.encoded_len();
                s.hold.push(rec.clone());
                if s.hold_bytes > hold_max {
                    self.stats.hold_overflows += 1;
                    self.release_hold(c);
                }
            }
        }
        self.publish_to_groups(topic, payload);
    }

    /// Queue groups: one member per group per publication, cluster-wide. A group with a member
    /// here is the shards' (local members first); otherwise one peer advertising the group gets
    /// the publication, in turn. Only peers whose interest is known are candidates (a group
    /// delivery is at most once: with no candidate it is dropped and counted).
    fn publish_to_groups(&mut self, topic: &str, payload: &[u8]) {
        let mut candidates: BTreeMap<String, Vec<ConnId>> = BTreeMap::new();
        for c in self.primaries() {
            let Some(s) = self.session(c) else { continue };
            if s.remote.synced() {
                for g in s.remote.table().groups_of(topic) {
                    candidates.entry(g.to_owned()).or_default().push(c);
                }
            }
        }
        for (group, conns) in candidates {
            if self.local.wanted_group(topic, &group) {
                continue;
            }
            self.group_turn = self.group_turn.wrapping_add(1);
            let c = conns[(self.group_turn % conns.len() as u64) as usize];
            let rec = PubRecord {
                topic: topic.to_owned(),
                group: Some(group),
                payload: payload.to_vec(),
            };
            self.enqueue(c, &rec);
        }
    }

    /// Sends what was held for a session: filtered through its snapshot if known, else all of
    /// it, and from then on everything until the snapshot arrives.
    fn release_hold(&mut self, c: ConnId) {
        let Some(s) = self.session_mut(c) else { return };
        let held = std::mem::take(&mut s.hold);
        s.hold_bytes = 0;
        s.hold_since = None;
        let filter: Option<PatternSet> = if s.remote.synced() {
            Some(s.remote.table().clone())
        } else {
            s.forward_all = true;
            None
        };
        if s.remote.synced() {
            s.forward_all = false;
        }
        for r in held {
            let wanted = |f: &PatternSet| match &r.group {
                Some(g) => f.has_group(&r.topic, g),
                None => f.matches(&r.topic),
            };
            if filter.as_ref().is_none_or(wanted) {
                self.enqueue(c, &r);
            }
        }
    }

    fn enqueue(&mut self, c: ConnId, rec: &PubRecord) {
        let (cap, batch_max) = (self.cfg.limits.peer_queue_bytes, self.cfg.limits.batch_max);
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let outstanding = conn.outstanding;
        let Phase::Session(s) = &mut conn.phase else {
            return;
        };
        if outstanding + s.batch.len() + rec.encoded_len() > cap {
            let peer = s.peer.clone();
            self.stats.dropped_queue += 1;
            self.dead_letter(peer, rec, "peer_queue_full", now);
            return;
        }
        if !s.batch.is_empty() && s.batch.len() + rec.encoded_len() > batch_max {
            self.flush_batch(c);
        }
        let Some(s) = self.session_mut(c) else { return };
        rec.encode(&mut s.batch);
        s.batch_records += 1;
    }

    fn dead_letter(&mut self, peer: String, rec: &PubRecord, reason: &'static str, at: u64) {
        self.stats.dead_lettered += 1;
        if self.dlq.len() >= self.cfg.limits.dlq_entries {
            self.dlq.pop_front();
        }
        let prefix = rec.payload[..rec.payload.len().min(self.cfg.limits.dlq_prefix)].to_vec();
        self.dlq.push_back(DlqEntry {
            peer,
            topic: rec.topic.clone(),
            bytes: rec.payload.len(),
            reason,
            at,
            prefix,
        });
    }

    /// Writes out pending control records (first) and data batches: call at the end of every
    /// loop turn, so an idle link adds no latency and a busy one sends full batches.
    pub fn flush(&mut self, now: u64) {
        self.now = now;
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in ids {
            self.flush_conn(c);
        }
    }

    fn flush_conn(&mut self, c: ConnId) {
        let Some(s) = self.session_mut(c) else { return };
        if s.ack_due || !s.ctrl.is_empty() {
            let mut recs = Vec::with_capacity(s.ctrl.len() + 1);
            if s.ack_due {
                recs.push(CtrlRecord::Ack {
                    generation: s.remote.applied(),
                });
                s.ack_due = false;
            }
            recs.append(&mut s.ctrl);
            // Cut into frames of about one batch so a large snapshot never nears MAX_FRAME.
            let mut out = Vec::new();
            let mut body = Vec::new();
            for r in &recs {
                r.encode(&mut body);
                if body.len() >= self.cfg.limits.batch_max {
                    wire::encode_frame(&mut out, FrameType::Ctrl, 0, &body);
                    body.clear();
                }
            }
            if !body.is_empty() {
                wire::encode_frame(&mut out, FrameType::Ctrl, 0, &body);
            }
            self.send_raw(c, out);
        }
        self.flush_batch(c);
    }

    fn flush_batch(&mut self, c: ConnId) {
        let (mode, min) = (self.cfg.compression, self.cfg.limits.compress_min);
        let batch_max = self.cfg.limits.batch_max;
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let outstanding = conn.outstanding;
        let Phase::Session(s) = &mut conn.phase else {
            return;
        };
        if s.batch.is_empty() {
            return;
        }
        let body = std::mem::take(&mut s.batch);
        s.batch_records = 0;
        let bandwidth_bound = s.rtt_us.is_some_and(|r| r >= 5_000) || outstanding > batch_max;
        let try_zstd = s.capabilities & wire::CAP_ZSTD != 0
            && body.len() >= min
            && match mode {
                Compression::Off => false,
                Compression::On => true,
                Compression::Auto => bandwidth_bound,
            };
        let mut out = Vec::with_capacity(body.len() + wire::HEADER_LEN);
        self.stats.batch_bytes_raw += body.len() as u64;
        let z = try_zstd
            .then(|| wire::compress(&body))
            .filter(|z| z.len() < body.len());
        match z {
            Some(z) => wire::encode_frame(&mut out, FrameType::Batch, wire::FLAG_ZSTD, &z),
            None => wire::encode_frame(&mut out, FrameType::Batch, 0, &body),
        }
        let (raw, on_wire) = (body.len() as u64, (out.len() - wire::HEADER_LEN) as u64);
        self.stats.batch_bytes_wire += on_wire;
        self.count_traffic(c, |t| {
            t.batch_raw += raw;
            t.batch_wire += on_wire;
        });
        self.send_raw(c, out);
    }

    // -----------------------------------------------------------------------------------------
    // Drain.

    /// Lame duck: announce Leaving; interest stays advertised and data keeps flowing while the
    /// local clients are closed in batches (the shards' part).
    pub fn drain(&mut self, now: u64) {
        self.now = now;
        self.state = MemberState::Leaving;
        let rec = self.own_record();
        for c in self.primaries() {
            if let Some(s) = self.session_mut(c) {
                s.ctrl.push(CtrlRecord::Members(vec![rec.clone()]));
            }
        }
    }

    /// The end of a drain: Left + `GOODBYE(LEFT, no_reconnect)` on every session; never dials again.
    pub fn leave(&mut self, now: u64) {
        self.now = now;
        self.state = MemberState::Left;
        self.flush(now);
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in ids {
            let mut out = Vec::new();
            handshake::write_goodbye(&mut out, Reason::Left, true, self.incarnation);
            if self.session(c).is_some() {
                self.send_raw(c, out);
            }
            self.drop_conn(c, true);
        }
        self.seeds.clear();
    }
}
