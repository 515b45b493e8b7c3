//! One WebSocket connection, sans-IO: bytes and a clock in; frames to send, deadlines and
//! [`ConnEvent`]s for the shard out.
//!
//! Owns: the connection's phase, its partial input, its outbound queue, its rate limit and its
//! identity. Never: touches sockets, topics of other connections, or other shards. What needs
//! shard state (subscriptions, publications, application events) leaves as a [`ConnEvent`].
//!
//! Phases (each variant holds only what is valid in it):
//!
//! ```text
//! Handshake ──upgrade + auth──▶ Live ──close sent──▶ Closing ──close received──▶ Closed
//!     │   ├──echo path──────▶ Echo ──┘                  │                           ▲
//!     │   └──centrifuge path▶ Centrifuge ┘              │                           │
//!     └──bad request / timeout / auth failure ──────────┴───────────────────────────┘
//! ```
//!
//! The dialect is chosen at the upgrade ([`crate::dialect`]). A Centrifuge connection runs the
//! [`crate::centrifuge::Session`] instead of the WSE message handling; what it asks of the
//! shard leaves as the same [`ConnEvent`]s a WSE connection's requests do, and what the shard
//! answers comes back through the same dialect-neutral methods ([`Conn::subscribed`],
//! [`Conn::unsubscribed`], [`Conn::publish_acked`], [`Conn::push_delivery`]), so the shard
//! never asks which dialect a connection speaks.
//!
//! Calling order (the shard's side): [`Conn::handle_bytes`] for every read, [`Conn::handle_eof`]
//! when the peer is gone, [`Conn::handle_timeout`] when [`Conn::poll_timeout`] is due; after each
//! call, drain [`Conn::out`] to the socket and, once [`Conn::wants_shutdown`], close the write side.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::IoSlice;
use std::num::NonZeroU64;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use serde_json::value::RawValue;

use crate::admission::Admission;
use crate::auth::{Acl, Authenticator, Identity};
use crate::centrifuge::{self, DisconnectCode};
use crate::close::CloseCode;
use crate::codec::{self, Decoder, FrameError, Message, OpCode, Role};
use crate::config::Config;
use crate::dialect::{CENTRIFUGE_PUBLISH_EVENT, Choice, Delivery, Dialect};
use crate::handshake::{self, Outcome};
use crate::metrics::{DropReason, RejectReason, ShardMetrics};
use crate::protocol::{self, ClientMessage, Clock, ErrorCode, FailedTopic, Wire};
use crate::ratelimit::{RateLimits, TokenBucket, Verdict};

/// Time a refused connection (bad or missing token, server at its connection limit) has to read
/// its error frame and close frame before its socket is closed. Short, because a refused client
/// has nothing more to say and each one holds a descriptor meanwhile.
pub const REFUSED_LINGER: Duration = Duration::from_millis(500);
/// Refused connections one shard lets linger for [`REFUSED_LINGER`] at once; past it a refused
/// socket is closed as soon as its close frame is handed to the kernel, so a flood of bad tokens
/// cannot hold the descriptors legitimate clients need.
pub const REFUSED_LINGERING_MAX_PER_SHARD: usize = 256;

/// A slab key of a connection on its shard: the low 32 bits of its [`ConnId`].
pub type ConnKey = u32;

/// A connection's identity across the server: `[shard:8][serial:24][slab key:32]`, shown as 16
/// hex digits. The shard is recoverable from the id, so commands find their connection without a
/// global table; the serial (never 0, so the id is never 0) tells a reused slab key from its
/// previous occupant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId(NonZeroU64);

impl ConnId {
    /// Packs the three parts; the serial is cut to 24 bits and raised to 1 if 0.
    pub fn new(shard: usize, serial: u32, key: ConnKey) -> Self {
        debug_assert!(shard < 256);
        let serial = u64::from(serial & 0xff_ffff).max(1);
        let v = ((shard as u64) << 56) | (serial << 32) | u64::from(key);
        Self(NonZeroU64::new(v).expect("serial is at least 1"))
    }
    /// The shard that serves the connection (commands are routed by it).
    pub fn shard(self) -> usize {
        (self.0.get() >> 56) as usize
    }
    /// The connection's slot in its shard's slab.
    pub fn key(self) -> ConnKey {
        self.0.get() as ConnKey
    }
    /// The id as a number (its 16-hex-digit form is this, zero-padded).
    pub fn as_u64(self) -> u64 {
        self.0.get()
    }
    /// Parses the 16-hex-digit form.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 16 {
            return None;
        }
        u64::from_str_radix(s, 16)
            .ok()
            .and_then(NonZeroU64::new)
            .map(Self)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What a connection asks of its shard.
#[derive(Debug)]
pub enum ConnEvent {
    /// The upgrade completed and the connection counts as live.
    Upgraded,
    /// A WSE session started (after `Upgraded`): `claims` is the verified token's standard
    /// claims (JSON) when authentication is on. (Events carry the user: the session may be
    /// gone by the time the shard handles them, when the same read also closed it.)
    Connected {
        /// The user id (JWT `sub`, or the connection id when authentication is off).
        user: Box<str>,
        /// The verified token's claims as JSON, for the `auth_connect` event.
        claims: Option<Bytes>,
    },
    /// Subscribe to `topics` (already validated and permitted; may include topics it is already
    /// on). `failed` go back in the acknowledgement as they are.
    Subscribe(SubscribeRequest),
    /// New presence data (a JSON text) for every topic of the connection.
    PresenceUpdate {
        /// The presence data, JSON text, already size-checked.
        data: Bytes,
    },
    /// Leave `topics` (ones the connection is not on are ignored).
    Unsubscribe {
        /// The topics to leave, as the client named them.
        topics: Vec<String>,
    },
    /// Publish `body` (a complete publication frame text) to `topic`.
    Publish {
        /// The topic, validated and permitted by the publish ACL.
        topic: String,
        /// The publication frame text.
        body: Bytes,
        /// The client asked for a `publish_ack` once the owner has sequenced it.
        ack: bool,
    },
    /// Read `topic`'s history (its owner's ring); answer with [`Conn::history_read`].
    History {
        /// The connection's id for the request.
        request: u64,
        /// The topic.
        topic: String,
        /// Only publications after this offset; `None`: from the oldest the ring holds.
        after: Option<u64>,
        /// Most publications to return.
        limit: usize,
        /// The newest `limit` rather than the oldest.
        reverse: bool,
        /// Only the newest `keep` publications count as the topic's history (a Centrifuge
        /// namespace's `history_size`; the ring may hold more).
        keep: usize,
    },
    /// Count `topic`'s presence members (its owner's), and list their connections with
    /// `list`; answer with [`Conn::presence_read`].
    Presence {
        /// The connection's id for the request.
        request: u64,
        /// The topic.
        topic: String,
        /// List the connections (Centrifuge `presence`), else only count (`presence_stats`).
        list: bool,
    },
    /// An application message (its JSON) for the event stream.
    App {
        /// Whose message it is.
        user: Box<str>,
        /// The message as JSON (after `C:`/`M:` decoding).
        payload: Bytes,
    },
    /// A Centrifuge client's `rpc`, for the event stream; the backend answers it with
    /// [`crate::command::Command::RpcReply`] (to [`Conn::rpc_reply`]).
    Rpc {
        /// Whose call it is.
        user: Box<str>,
        /// The connection's number for the call, which the backend's reply names.
        request: u64,
        /// The method the client named.
        method: String,
        /// The data, JSON text (empty: none).
        data: Bytes,
    },
    /// A message that is not JSON (text, or binary without a known encoding), for the event
    /// stream.
    Unparsed {
        /// Whose message it is.
        user: Box<str>,
        /// It came in a binary frame (the event then carries it base64-encoded).
        binary: bool,
        /// The frame's payload, verbatim.
        payload: Bytes,
    },
    /// The upgrade's token was refused (closed 4401): the shard logs why, with the peer's
    /// address (never the token).
    AuthRefused(crate::auth::AuthError),
    /// The connection left the live phase: it is no longer subscribed to `subs` (handed over
    /// here because the session that held them is gone).
    Left {
        /// The topics it was on; the shard tells their owners it left.
        subs: Vec<Arc<str>>,
        /// Whose session it was (for presence).
        user: Box<str>,
    },
}

/// A live session as the shard sees it: who, and which topics it is on (or recovering).
pub struct SessionMut<'a> {
    /// The session's user id.
    pub user: &'a str,
    /// Topics the connection is subscribed to.
    pub subs: &'a mut Vec<Arc<str>>,
    /// Topics whose recovery replay is still in flight (live frames for them are held back).
    pub recovering: &'a mut Vec<Arc<str>>,
}

/// A subscription request, checked by the connection (topic syntax, ACL, data size).
#[derive(Debug, Default)]
pub struct SubscribeRequest {
    /// Topics to subscribe to (validated and permitted).
    pub topics: Vec<String>,
    /// Topics refused by the connection, with their reason, for the acknowledgement.
    pub failed: Vec<FailedTopic>,
    /// Topics to recover: (topic, the client's epoch if it parsed, its inclusive last offset).
    pub recover: Vec<(String, Option<u32>, u64)>,
    /// Presence data (JSON text) when presence is on.
    pub presence: Option<Bytes>,
    /// A Centrifuge connection's client info for the topics' member lists (`presence`), when
    /// its namespace keeps presence.
    pub client: Option<Box<centrifuge::proto::ClientInfo>>,
    /// The queue group the topics are joined in (see PROTOCOL.md), if any.
    pub queue_group: Option<Arc<str>>,
}

/// What a connection may use while handling input; borrowed from its shard for one call.
pub struct Cx<'a> {
    /// The shard's clock for this turn (one read per turn).
    pub clock: Clock,
    /// The configuration in force (replaced on reload).
    pub cfg: &'a Config,
    /// The rate-limit settings every connection's bucket uses.
    pub rate: &'a RateLimits,
    /// The JWT verifier; `None` when authentication is off.
    pub auth: Option<&'a Authenticator>,
    /// What every Centrifuge session shares (from `[centrifuge]`, replaced on reload).
    pub centrifuge: &'a Arc<centrifuge::Settings>,
    /// The publish rights of a token without a `wse_publish` claim.
    pub default_publish: &'a Acl,
    /// The server-wide connection budget (`server.max_connections`).
    pub admission: &'a Admission,
    /// The shard's counters.
    pub metrics: &'a ShardMetrics,
    /// An application consumes the event stream (or a webhook is set): a Centrifuge `rpc` goes
    /// to it; otherwise it is answered 108 at once.
    pub app_rpc: bool,
    /// Where the connection puts what it asks of the shard, handled after the call.
    pub events: &'a mut Vec<ConnEvent>,
    /// This tick's ping frame, built by the first connection that needs it.
    pub ping: &'a mut Option<Bytes>,
    /// Refused connections of this shard still lingering (see [`REFUSED_LINGER`]). The shard
    /// counts them: one more when a connection becomes [`Conn::was_refused`], one less when it
    /// releases it.
    pub refused_lingering: usize,
}

impl Cx<'_> {
    fn ping_frame(&mut self) -> Bytes {
        let clock = self.clock;
        self.ping
            .get_or_insert_with(|| codec::encode_frame(OpCode::Text, &protocol::ping(&clock)))
            .clone()
    }
}

/// Bytes queued for a connection past which a Pong replaces the unsent Pong before it instead
/// of queuing behind it (or half the outbound cap, when that is smaller).
const PONG_COALESCE_QUEUED_BYTES: usize = 16 * 1024;

/// Frames waiting for the socket, oldest first. The front frame may be partly written.
#[derive(Debug, Default)]
pub struct OutQueue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// The front frame has been partly written and must be finished before anything else.
    front_started: bool,
    /// Bytes queued beyond the cap that the cap tolerates: a replay the client asked for must not
    /// get it evicted. At most `recovery.max_replay_bytes`; shrinks as bytes are written.
    allowance: usize,
    /// The back frame is a Pong nobody has started writing: a newer Pong replaces it.
    back_is_pong: bool,
}

impl OutQueue {
    /// Queues a whole frame at the back.
    pub fn push(&mut self, frame: Bytes) {
        self.back_is_pong = false;
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }
    /// Queues the answer to a Ping. Once output backs up, consecutive Pings get one Pong, the
    /// newest (RFC 6455 §5.5.3 allows it), so a client that pings in a loop and never reads
    /// queues one frame, not one per Ping. (Below that, each Ping gets its own Pong, as
    /// conformance suites expect.)
    fn push_pong(&mut self, payload: &[u8], max_queue: usize) {
        let frame = codec::encode_frame(OpCode::Pong, payload);
        let unstarted = self.frames.len() > usize::from(self.front_started);
        let backed_up = self.bytes >= PONG_COALESCE_QUEUED_BYTES.min(max_queue / 2);
        if self.back_is_pong && unstarted && backed_up {
            let old = self.frames.pop_back().expect("the back frame is a pong");
            self.bytes -= old.len();
        }
        self.push(frame);
        self.back_is_pong = true;
    }
    /// Whether more is queued than `max` plus the allowance of a replay in progress: the
    /// connection is not reading what it asks for, and is evicted.
    pub fn over(&self, max: usize) -> bool {
        self.bytes > max + self.allowance
    }
    /// Nothing left to write.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
    /// Bytes queued and not yet written.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Frames queued (the one being written included).
    pub fn frames(&self) -> usize {
        self.frames.len()
    }
    /// Fills `iov` with the next frames to write; returns how many.
    pub fn slices<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, f) in iov.iter_mut().zip(&self.frames) {
            *slot = IoSlice::new(f);
            n += 1;
        }
        n
    }
    /// Drops `n` written bytes from the front.
    pub fn advance(&mut self, mut n: usize) {
        debug_assert!(n <= self.bytes);
        self.bytes -= n;
        self.allowance = self.allowance.saturating_sub(n);
        while n > 0 {
            let front = self.frames.front_mut().expect("advance past the queue");
            if n >= front.len() {
                n -= front.len();
                self.frames.pop_front();
                self.front_started = false;
            } else {
                front.advance(n);
                self.front_started = true;
                n = 0;
            }
        }
        if self.frames.is_empty() {
            // Idle connections keep no buffer.
            self.frames = VecDeque::new();
            self.back_is_pong = false;
        }
    }
    /// Whether `len` more bytes fit under `max` (plus the allowance of a replay in progress).
    fn fits(&self, len: usize, max: usize) -> bool {
        self.bytes + len <= max + self.allowance
    }

    /// Drops everything not yet started; keeps a partly written front frame so the stream
    /// stays well-formed. Returns the bytes dropped.
    fn discard_unsent(&mut self) -> usize {
        let keep = usize::from(self.front_started);
        let dropped: usize = self.frames.iter().skip(keep).map(Bytes::len).sum();
        self.frames.truncate(keep);
        self.bytes -= dropped;
        self.allowance = self.allowance.min(self.bytes);
        self.back_is_pong = false;
        dropped
    }
}

/// The state of a live WSE connection; only reachable through a successful authentication.
#[derive(Debug)]
struct Session {
    identity: Identity,
    rate: TokenBucket,
    /// Topics this connection is subscribed to (names shared with the shard's topic table).
    subs: Vec<Arc<str>>,
    /// Per-connection sends go as `M:` MessagePack (`?format=msgpack`).
    msgpack: bool,
    /// Topics whose replay is on its way: live frames of these are skipped meanwhile (they are
    /// part of the replay, or were sequenced before the recovered position).
    recovering: Vec<Arc<str>>,
    /// The `seq` of the last enveloped message sent (`server_ready`, then application events).
    seq: u64,
}

#[derive(Debug)]
enum Phase {
    /// Reading the HTTP upgrade request into `Conn::inbuf`.
    Handshake,
    Live {
        decoder: Decoder,
        session: Box<Session>,
    },
    /// The conformance echo route: RFC 6455 only, no WSE protocol.
    Echo { decoder: Decoder },
    /// The Centrifuge client protocol (before and after its `connect` command).
    Centrifuge {
        decoder: Decoder,
        session: Box<CentrifugeSession>,
    },
    /// Our close frame is queued; waiting for the peer's.
    Closing { decoder: Decoder, deadline: Instant },
    /// Nothing more will be read or queued; once the queue is written, the write side is shut and
    /// the socket is released at EOF or at `deadline`.
    Closed { deadline: Instant },
}

/// What to do after a message: carry on, or close with a code.
enum Next {
    Continue,
    /// Close and wait for the peer's close frame (it did nothing wrong at the WebSocket level).
    Close(CloseCode),
    /// Fail the connection (RFC 6455 §7.1.7): send the close frame and close at once, without
    /// waiting for a peer that just broke the protocol.
    Fail(CloseCode),
    /// The peer sent a close frame (which we have answered) with this code
    /// ([`CloseCode::NoStatus`]: none).
    PeerClosed(u16),
    /// More is queued than `limits.max_outbound_queue_bytes` (replies to what the client sent
    /// count too): evict it with 4413, as any consumer that does not read.
    Evict,
    /// The Centrifuge session ended with this code.
    Disconnect(DisconnectCode),
}

/// One client connection, sans-IO: bytes in through the `handle_*` methods, frames out in
/// [`Conn::out`], requests to the shard in [`Cx::events`]. Phases: handshake, live (WSE or
/// echo), closing, closed.
pub struct Conn {
    id: ConnId,
    phase: Phase,
    /// Bytes of an incomplete request or frame, kept until more arrive; no heap when empty.
    inbuf: Vec<u8>,
    /// Frames waiting to be written; the shard writes them and evicts the connection past the cap.
    pub out: OutQueue,
    accepted_at: Instant,
    last_rx: Instant,
    next_ping: Instant,
    /// Counted against `server.max_connections`; released exactly once by the shard.
    pub admitted: bool,
    /// Refused after the upgrade and counted in [`Cx::refused_lingering`] until released.
    refused: bool,
    /// The close code of the close handshake, ours or the peer's, whichever came first (for the
    /// lifecycle log); `None` while open, or when the socket went without one.
    close_code: Option<u16>,
}

impl Conn {
    /// A connection accepted at `now`, waiting for its HTTP upgrade request.
    pub fn new(id: ConnId, now: Instant) -> Self {
        Self {
            id,
            phase: Phase::Handshake,
            inbuf: Vec::new(),
            out: OutQueue::default(),
            accepted_at: now,
            last_rx: now,
            next_ping: now,
            admitted: false,
            refused: false,
            close_code: None,
        }
    }

    /// The code that began the close handshake, ours or the peer's (`None`: none yet, or the
    /// socket went without one).
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    /// Counts a close code we send, and remembers it.
    fn note_close(&mut self, code: u16, cx: &mut Cx<'_>) {
        cx.metrics.closed_with(code);
        self.close_code.get_or_insert(code);
    }

    /// The connection's server-wide id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The session's user id; `None` until the WSE session is live.
    pub fn user_id(&self) -> Option<&str> {
        match &self.phase {
            Phase::Live { session, .. } => Some(&session.identity.user_id),
            Phase::Centrifuge { session, .. } => session.user.as_deref(),
            _ => None,
        }
    }

    /// Still waiting for (or reading) its HTTP upgrade request.
    pub fn is_handshaking(&self) -> bool {
        matches!(self.phase, Phase::Handshake)
    }

    /// In the live phase: a WSE session or the echo route, exchanging messages.
    pub fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Live { .. })
    }

    /// A session with a user, in any dialect: a live WSE session, or a Centrifuge connection
    /// after its `connect` (what the application sees as a connection).
    pub fn has_session(&self) -> bool {
        self.user_id().is_some()
    }

    /// Closed and everything queued is written: the shard shuts the write side.
    pub fn wants_shutdown(&self) -> bool {
        matches!(self.phase, Phase::Closed { .. }) && self.out.is_empty()
    }

    /// Closed: no more input is read; what is queued may still be written.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed { .. })
    }

    /// Refused after the upgrade (authentication, connection limit): the shard's count of
    /// lingering refusals includes this connection until it is released.
    pub fn was_refused(&self) -> bool {
        self.refused
    }

    /// The parts of a live connection's session the shard maintains.
    pub fn session_mut(&mut self) -> Option<SessionMut<'_>> {
        match &mut self.phase {
            Phase::Live { session, .. } => {
                let s = &mut **session;
                Some(SessionMut {
                    user: &s.identity.user_id,
                    subs: &mut s.subs,
                    recovering: &mut s.recovering,
                })
            }
            Phase::Centrifuge { session, .. } => {
                let s = &mut **session;
                Some(SessionMut {
                    user: s.user.as_deref()?,
                    subs: &mut s.subs,
                    recovering: &mut s.recovering,
                })
            }
            _ => None,
        }
    }

    /// Checks an application's subscription for this connection (`command::AppSubscribe`'s
    /// parts) as a client's would be checked. `None` unless live.
    pub fn admit_subscription(
        &self,
        topics: &[String],
        presence: Option<&[u8]>,
        group: Option<&str>,
        recover: &[(String, Option<u32>, u64)],
        cfg: &Config,
    ) -> Option<SubscribeRequest> {
        let Phase::Live { session, .. } = &self.phase else {
            return None;
        };
        let presence = presence.and_then(|p| std::str::from_utf8(p).ok());
        let topics = topics.iter().map(|t| Cow::Borrowed(t.as_str()));
        let mut req = session.admit(topics, presence, group, cfg);
        if cfg.recovery.enabled && req.queue_group.is_none() {
            req.recover = recover
                .iter()
                .filter(|r| req.topics.contains(&r.0))
                .cloned()
                .collect();
        }
        Some(req)
    }

    /// Replaces the subscribe ACL of a live connection. `false` unless live.
    pub fn set_subscribe_acl(&mut self, acl: Acl) -> bool {
        match &mut self.phase {
            Phase::Live { session, .. } => {
                session.identity.subscribe = acl;
                true
            }
            _ => false,
        }
    }

    /// Whether a live connection may subscribe to `topic`.
    pub fn may_subscribe(&self, topic: &str) -> bool {
        matches!(&self.phase, Phase::Live { session, .. } if session.identity.subscribe.permits(topic))
    }

    /// Topics a live connection is subscribed to.
    pub fn subscriptions(&self) -> &[Arc<str>] {
        match &self.phase {
            Phase::Live { session, .. } => &session.subs,
            Phase::Centrifuge { session, .. } => &session.subs,
            _ => &[],
        }
    }

    /// The `seq` for the next enveloped message of a live connection (application events
    /// continue the count `server_ready` started).
    pub fn next_seq(&mut self) -> Option<u64> {
        match &mut self.phase {
            Phase::Live { session, .. } => {
                session.seq += 1;
                Some(session.seq)
            }
            _ => None,
        }
    }

    /// Whether per-connection sends go as MessagePack (`?format=msgpack`).
    pub fn is_msgpack(&self) -> bool {
        matches!(&self.phase, Phase::Live { session, .. } if session.msgpack)
    }

    /// Whether live frames of `topic` are held back for a replay in flight.
    pub fn is_recovering(&self, topic: &str) -> bool {
        let recovering = match &self.phase {
            Phase::Live { session, .. } => &session.recovering,
            Phase::Centrifuge { session, .. } => &session.recovering,
            _ => return false,
        };
        !recovering.is_empty() && recovering.iter().any(|t| &**t == topic)
    }

    /// Queues a replay: complete frames, one buffer. Its bytes become an allowance over the
    /// outbound cap while they drain, since evicting a client for the replay it asked for would
    /// loop forever; but the replays one connection has queued and not read are bounded by
    /// `max_replay_bytes` beyond the cap. A replay past that is refused (`false`: nothing is
    /// queued and the caller answers `recovered: false`, so the client re-baselines), which is
    /// what stops a client from asking for the same history again and again without reading it.
    #[must_use]
    pub fn push_replay(
        &mut self,
        topic: &str,
        frames: Bytes,
        max_queue: usize,
        max_replay_bytes: usize,
    ) -> bool {
        let session = match &mut self.phase {
            Phase::Live { session, .. } => session,
            Phase::Centrifuge { session, .. } => {
                // Centrifuge carries the replay in the subscribe reply, not as pushes: kept
                // for `Conn::subscribed`, under the same budget.
                session.recovering.retain(|t| &**t != topic);
                if frames.len() > max_replay_bytes {
                    return false;
                }
                if let Some(sub) = session.subscribing.get_mut(topic) {
                    sub.replay = frames;
                }
                return true;
            }
            _ => return true,
        };
        session.recovering.retain(|t| &**t != topic);
        if frames.is_empty() {
            return true;
        }
        if self.out.allowance + frames.len() <= max_replay_bytes {
            self.out.allowance += frames.len();
        } else if !self.out.fits(frames.len(), max_queue) {
            return false;
        }
        self.out.push(frames);
        true
    }

    /// When this connection next needs [`Conn::handle_timeout`].
    pub fn poll_timeout(&self, cfg: &Config) -> Instant {
        let idle = self.last_rx + cfg.protocol.idle_timeout;
        match &self.phase {
            Phase::Handshake => self.accepted_at + cfg.limits.handshake_timeout,
            Phase::Live { .. } => idle.min(self.next_ping),
            Phase::Echo { .. } => idle,
            // Its own liveness (pings and the pong timeout), not the WSE idle timeout.
            Phase::Centrifuge { session, .. } => session.session.poll_timeout().unwrap_or(idle),
            Phase::Closing { deadline, .. } | Phase::Closed { deadline } => *deadline,
        }
    }

    /// Handles bytes read from the socket.
    pub fn handle_bytes(&mut self, data: &mut [u8], cx: &mut Cx<'_>) {
        self.last_rx = cx.clock.now;
        match self.phase {
            Phase::Handshake => self.handle_request_bytes(data, cx),
            Phase::Closed { .. } => {}
            _ => self.handle_frame_bytes(data, cx),
        }
    }

    /// The peer closed the connection or the socket failed: nothing more can be written.
    pub fn handle_eof(&mut self, cx: &mut Cx<'_>) {
        self.out.discard_unsent();
        self.out = OutQueue::default();
        self.enter_closed(cx.clock.now, cx);
    }

    /// Runs whatever deadline is due.
    pub fn handle_timeout(&mut self, cx: &mut Cx<'_>) {
        let now = cx.clock.now;
        match &self.phase {
            Phase::Handshake => {
                if now >= self.accepted_at + cx.cfg.limits.handshake_timeout {
                    cx.metrics.rejected(RejectReason::HandshakeTimeout).inc();
                    self.phase = Phase::Closed { deadline: now };
                }
            }
            Phase::Live { .. } | Phase::Echo { .. } => {
                if now >= self.last_rx + cx.cfg.protocol.idle_timeout {
                    self.close_with(CloseCode::IdleTimeout, cx);
                } else if self.is_live() && now >= self.next_ping {
                    let ping = cx.ping_frame();
                    self.queue(ping, cx);
                    self.next_ping = now + cx.cfg.protocol.ping_interval;
                }
            }
            Phase::Centrifuge { .. } => self.centrifuge_step(cx, |s, _| s.handle_timeout(now)),
            Phase::Closing { deadline, .. } => {
                if now >= *deadline {
                    self.phase = Phase::Closed { deadline: now };
                }
            }
            Phase::Closed { .. } => {}
        }
    }

    /// Starts a server-initiated close: the close frame is queued and the peer has
    /// `limits.close_timeout` to answer. Code 1005 ([`CloseCode::NoStatus`]) sends a close frame
    /// without status code and reason. A connection still in the upgrade is just dropped.
    pub fn close(&mut self, code: u16, reason: &str, cx: &mut Cx<'_>) {
        let deadline = cx.clock.now + cx.cfg.limits.close_timeout;
        let phase = std::mem::replace(&mut self.phase, Phase::Closed { deadline });
        let decoder = match phase {
            Phase::Live { decoder, session } => {
                cx.events.push(left(session));
                decoder
            }
            Phase::Echo { decoder } => decoder,
            Phase::Centrifuge { decoder, session } => {
                if let Some(left) = session.left() {
                    cx.events.push(left);
                }
                decoder
            }
            Phase::Handshake => {
                self.phase = Phase::Closed {
                    deadline: cx.clock.now,
                };
                return;
            }
            other @ (Phase::Closing { .. } | Phase::Closed { .. }) => {
                self.phase = other;
                return;
            }
        };
        self.note_close(code, cx);
        let frame = if code == CloseCode::NoStatus.code() {
            // 1005 never goes on the wire (RFC 6455 §7.4.1): it stands for a frame without one.
            codec::encode_close_without_status()
        } else {
            codec::encode_close(code, reason)
        };
        self.queue(frame, cx);
        self.phase = Phase::Closing { decoder, deadline };
    }

    /// [`Conn::close`] with one of the server's own codes and its reason.
    pub fn close_with(&mut self, code: CloseCode, cx: &mut Cx<'_>) {
        self.close(code.code(), code.reason(), cx);
    }

    /// Evicts a consumer whose queue overflowed: unsent frames are dropped (they would arrive too
    /// late anyway) and it is closed with 4413 so it reconnects and recovers.
    pub fn evict(&mut self, cx: &mut Cx<'_>) {
        let slow = match self.phase {
            Phase::Live { .. } | Phase::Echo { .. } => CloseCode::SlowConsumer.code(),
            // Centrifuge's own code for it; the clients reconnect (and recover).
            Phase::Centrifuge { .. } => DisconnectCode::Slow.code(),
            _ => return, // already on its way out
        };
        self.out.discard_unsent();
        cx.metrics.dropped(DropReason::SlowConsumer).inc();
        let reason = match self.phase {
            Phase::Centrifuge { .. } => DisconnectCode::Slow.reason(),
            _ => CloseCode::SlowConsumer.reason(),
        };
        self.close(slow, reason, cx);
    }

    /// Queues a shared frame (a publication of a topic the connection is on, or a frame for it
    /// alone) in the connection's dialect; a frame that does not exist in its dialect (a WSE
    /// presence event for a Centrifuge connection) is skipped. `false` when it does not fit
    /// under `limits.max_outbound_queue_bytes` (the caller evicts).
    #[must_use]
    pub fn push_delivery(&mut self, delivery: &mut Delivery<'_>, max_queue: usize) -> bool {
        let frame = match &mut self.phase {
            Phase::Live { .. } if delivery.is_join_leave() => return true,
            Phase::Live { .. } => delivery.wse().clone(),
            Phase::Centrifuge { session, .. } => {
                if delivery.is_join_leave()
                    && !delivery
                        .topic()
                        .is_some_and(|t| session.join_leave.contains(t))
                {
                    return true;
                }
                let Some((frame, message)) = delivery.centrifuge(session.session.format()) else {
                    return true;
                };
                if session.session.holds_output() {
                    // Behind a reply that waits for the shard: the session orders it (and
                    // frames it when its turn comes), under its own cap on what it holds
                    // (`limits.max_outbound_queue_bytes`). `false` only when it did not take
                    // it, since the caller may offer it again.
                    return session.session.push(message).is_ok();
                }
                frame
            }
            _ => return true,
        };
        if !self.out.fits(frame.len(), max_queue) {
            return false;
        }
        self.out.push(frame);
        true
    }

    /// Moves what a Centrifuge session has ready into the outbound queue; `false` when it went
    /// past `max_queue`.
    fn transmit_centrifuge(&mut self, max_queue: usize) -> bool {
        if let Phase::Centrifuge { session, .. } = &mut self.phase {
            let op = session.opcode();
            while let Some(message) = session.session.poll_transmit() {
                self.out.push(codec::encode_frame(op, &message));
            }
        }
        !self.out.over(max_queue)
    }

    /// The shard's acknowledgement of a subscribe request: `succeeded` topics are live (every
    /// later publication reaches the connection), `failed` ones were refused, with the
    /// recovery outcome per topic.
    pub fn subscribed(
        &mut self,
        succeeded: &[String],
        failed: &[FailedTopic],
        recovery: &[(String, protocol::RecoveryInfo)],
        cx: &mut Cx<'_>,
    ) {
        if !matches!(self.phase, Phase::Centrifuge { .. }) {
            let names: Vec<&str> = succeeded.iter().map(String::as_str).collect();
            let frame = protocol::subscription_ack("subscribe", &names, failed, recovery);
            self.send_json(frame, cx);
            return;
        }
        let mut answers = Vec::new();
        if let Phase::Centrifuge { session, .. } = &mut self.phase {
            let limit = session.history_limit_max;
            for topic in succeeded {
                if let Some(sub) = session.subscribing.remove(topic.as_str()) {
                    let info = recovery.iter().find(|(t, _)| t == topic).map(|(_, i)| i);
                    let top = info.map(|i| centrifuge::proto::StreamPosition {
                        offset: i.offset,
                        epoch: protocol::epoch_hex(i.epoch),
                    });
                    let recovery = sub.recover.then(|| match info {
                        Some(i) if i.recovered && i.count as usize <= limit.min(sub.keep) => {
                            (true, replayed_publications(&sub.replay))
                        }
                        _ => (false, Vec::new()),
                    });
                    answers.push(centrifuge::Answer::Subscribed {
                        ticket: sub.ticket,
                        top,
                        recovery,
                    });
                }
            }
            for f in failed {
                session.join_leave.remove(f.topic.as_str());
                if let Some(sub) = session.subscribing.remove(f.topic.as_str()) {
                    answers.push(centrifuge::Answer::Failed {
                        ticket: sub.ticket,
                        code: refusal_code(&f.reason),
                    });
                }
            }
        }
        for answer in answers {
            self.centrifuge_step(cx, |s, ccx| s.answer(ccx, answer));
        }
    }

    /// The owner's answer to a [`ConnEvent::History`] (`None`: recovery is off).
    pub fn history_read(
        &mut self,
        request: u64,
        read: Option<crate::recovery::HistoryRead>,
        cx: &mut Cx<'_>,
    ) {
        let Phase::Centrifuge { session, .. } = &mut self.phase else {
            return;
        };
        let Some(asked) = session.histories.remove(&request) else {
            return;
        };
        let answer = match read {
            None => centrifuge::Answer::Failed {
                ticket: asked.ticket,
                code: centrifuge::ErrorCode::NotAvailable,
            },
            Some(read) => {
                let epoch = protocol::epoch_hex(read.epoch);
                // A position in another epoch, or one the ring no longer follows completely.
                let lost = asked
                    .since_epoch
                    .as_deref()
                    .is_some_and(|e| !e.is_empty() && e != epoch)
                    || !read.complete;
                if lost {
                    centrifuge::Answer::Failed {
                        ticket: asked.ticket,
                        code: centrifuge::ErrorCode::UnrecoverablePosition,
                    }
                } else {
                    let mut publications = replayed_publications(&read.frames);
                    if asked.reverse {
                        publications.reverse();
                    }
                    centrifuge::Answer::History {
                        ticket: asked.ticket,
                        publications,
                        top: centrifuge::proto::StreamPosition {
                            offset: read.offset,
                            epoch,
                        },
                    }
                }
            }
        };
        self.centrifuge_step(cx, |s, ccx| s.answer(ccx, answer));
    }

    /// The server refreshes this connection's expiry (see
    /// [`centrifuge::Session::server_refresh`]); `false` when it is not a Centrifuge connection
    /// (a WSE connection's expiry is its token's).
    pub fn server_refresh(
        &mut self,
        expire_at: Option<u64>,
        expired: bool,
        cx: &mut Cx<'_>,
    ) -> bool {
        if !matches!(self.phase, Phase::Centrifuge { .. }) {
            return false;
        }
        self.centrifuge_step(cx, |s, ccx| {
            s.server_refresh(ccx.now, ccx.wall_s, expire_at, expired)
        });
        true
    }

    /// A publication this connection asked to have acknowledged was dropped before its owner
    /// sequenced it (the fabric was full): no acknowledgement will come. A Centrifuge client
    /// gets error 100 (temporary: it may retry); a WSE one hears nothing, as before.
    pub fn publish_lost(&mut self, topic: &str, cx: &mut Cx<'_>) {
        let Phase::Centrifuge { session, .. } = &mut self.phase else {
            return;
        };
        let Some(i) = session.publishing.iter().rposition(|(t, _)| **t == *topic) else {
            return;
        };
        if let Some((_, ticket)) = session.publishing.remove(i) {
            let answer = centrifuge::Answer::Failed {
                ticket,
                code: centrifuge::ErrorCode::Internal,
            };
            self.centrifuge_step(cx, |s, ccx| s.answer(ccx, answer));
        }
    }

    /// The owner's answer to a [`ConnEvent::Presence`]: distinct users, their connections, and
    /// those connections when the request listed them.
    pub fn presence_read(
        &mut self,
        request: u64,
        (users, connections): (u32, u32),
        clients: Vec<centrifuge::proto::ClientInfo>,
        cx: &mut Cx<'_>,
    ) {
        let Phase::Centrifuge { session, .. } = &mut self.phase else {
            return;
        };
        if let Some((ticket, list)) = session.presences.remove(&request) {
            let answer = if list {
                centrifuge::Answer::Presence { ticket, clients }
            } else {
                centrifuge::Answer::PresenceStats {
                    ticket,
                    num_clients: connections,
                    num_users: users,
                }
            };
            self.centrifuge_step(cx, |s, ccx| s.answer(ccx, answer));
        }
    }

    /// A [`ConnEvent::Presence`] request was dropped on its way to the topic's owner (the
    /// fabric was full): answered with error 100 (temporary: the client may retry).
    pub fn presence_lost(&mut self, request: u64, cx: &mut Cx<'_>) {
        let Phase::Centrifuge { session, .. } = &mut self.phase else {
            return;
        };
        if let Some((ticket, _)) = session.presences.remove(&request) {
            let answer = centrifuge::Answer::Failed {
                ticket,
                code: centrifuge::ErrorCode::Internal,
            };
            self.centrifuge_step(cx, |s, ccx| s.answer(ccx, answer));
        }
    }

    /// A [`ConnEvent::History`] request was dropped on its way to the topic's owner (the
    /// fabric was full): answered with error 100 (temporary: the client may retry).
    pub fn history_lost(&mut self, request: u64, cx: &mut Cx<'_>) {
        let Phase::Centrifuge { session, .. } = &mut self.phase else {
            return;
        };
        if let Some(asked) = session.histories.remove(&request) {
            let answer = centrifuge::Answer::Failed {
                ticket: asked.ticket,
                code: centrifuge::ErrorCode::Internal,
            };
            self.centrifuge_step(cx, |s, ccx| s.answer(ccx, answer));
        }
    }

    /// The backend's reply to this connection's `rpc` number `request`; `false` when no such
    /// call waits (never made, answered already, timed out, or not a Centrifuge connection).
    pub fn rpc_reply(
        &mut self,
        request: u64,
        result: Result<Bytes, centrifuge::RpcError>,
        cx: &mut Cx<'_>,
    ) -> bool {
        let ticket = centrifuge::Ticket(request);
        let Phase::Centrifuge { session, .. } = &self.phase else {
            return false;
        };
        if !session.session.rpc_pending(ticket) {
            return false;
        }
        let answer = centrifuge::Answer::Rpc { ticket, result };
        self.centrifuge_step(cx, |s, ccx| s.answer(ccx, answer));
        true
    }

    /// The shard left `topics` for the connection (an unsubscribe request).
    pub fn unsubscribed(&mut self, topics: &[String], cx: &mut Cx<'_>) {
        if matches!(self.phase, Phase::Centrifuge { .. }) {
            return; // Centrifuge's unsubscribe has its reply already.
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let frame = protocol::subscription_ack("unsubscribe", &names, &[], &[]);
        self.send_json(frame, cx);
    }

    /// The owner sequenced a publication this connection asked to have acknowledged.
    pub fn publish_acked(&mut self, topic: &str, epoch: Option<u32>, offset: u64, cx: &mut Cx<'_>) {
        let ticket = match &mut self.phase {
            Phase::Centrifuge { session, .. } => {
                // A connection's publications to one topic pass through one owner in order.
                let Some(i) = session.publishing.iter().position(|(t, _)| **t == *topic) else {
                    return;
                };
                session.publishing.remove(i).map(|(_, ticket)| ticket)
            }
            _ => {
                self.send_json(protocol::publish_ack(topic, epoch, offset), cx);
                return;
            }
        };
        if let Some(ticket) = ticket {
            let answer = centrifuge::Answer::Published { ticket };
            self.centrifuge_step(cx, |s, ccx| s.answer(ccx, answer));
        }
    }

    /// Queues a per-connection JSON message (MessagePack or compressed as negotiated).
    pub fn send_json(&mut self, json: Vec<u8>, cx: &mut Cx<'_>) {
        if !matches!(self.phase, Phase::Live { .. }) {
            // WSE messages only go to WSE sessions.
            return;
        }
        let msgpack = matches!(&self.phase, Phase::Live { session, .. } if session.msgpack);
        let (wire, bytes) =
            protocol::encode_for_connection(json, msgpack, cx.cfg.protocol.compression_threshold);
        let op = match wire {
            Wire::Text => OpCode::Text,
            Wire::Binary => OpCode::Binary,
        };
        self.queue(codec::encode_frame(op, &bytes), cx);
    }

    fn queue(&mut self, frame: Bytes, cx: &mut Cx<'_>) {
        cx.metrics.messages_out_total.inc();
        self.out.push(frame);
    }

    fn send_text(&mut self, json: &[u8], cx: &mut Cx<'_>) {
        self.queue(codec::encode_frame(OpCode::Text, json), cx);
    }

    fn send_error(&mut self, code: ErrorCode, message: &str, recoverable: bool, cx: &mut Cx<'_>) {
        let json = protocol::error(code, message, recoverable, &cx.clock);
        self.send_json(json, cx);
    }

    fn enter_closed(&mut self, deadline: Instant, cx: &mut Cx<'_>) {
        if matches!(self.phase, Phase::Closed { .. }) {
            return;
        }
        match std::mem::replace(&mut self.phase, Phase::Closed { deadline }) {
            Phase::Live { session, .. } => cx.events.push(left(session)),
            Phase::Centrifuge { session, .. } => {
                if let Some(left) = session.left() {
                    cx.events.push(left);
                }
            }
            _ => {}
        }
    }

    // --------------------------------------------------------------------------------------------
    // The upgrade
    // --------------------------------------------------------------------------------------------

    fn handle_request_bytes(&mut self, data: &[u8], cx: &mut Cx<'_>) {
        self.inbuf.extend_from_slice(data);
        match handshake::parse(&self.inbuf, cx.cfg.limits.max_handshake_bytes) {
            Outcome::Partial => {}
            Outcome::Reject(r) => self.reject_upgrade(&r, RejectReason::BadHandshake, cx),
            Outcome::Upgrade { request, .. }
                if !handshake::origin_allowed(
                    request.origin.as_deref(),
                    &cx.cfg.server.allowed_origins,
                ) =>
            {
                self.reject_upgrade(&handshake::ORIGIN_NOT_ALLOWED, RejectReason::Origin, cx);
            }
            Outcome::Upgrade { request, consumed } => {
                let mut rest = self.inbuf.split_off(consumed);
                self.inbuf = Vec::new();
                let accept = handshake::accept_key(&request.key);
                let choice = Choice::select(&request, cx.cfg);
                let response = match choice.subprotocol {
                    Some(p) => handshake::response_101_with_protocol(&accept, p),
                    None => handshake::response_101(&accept),
                };
                self.queue(Bytes::from(response), cx);
                match choice.dialect {
                    Dialect::Echo => {
                        cx.events.push(ConnEvent::Upgraded);
                        self.phase = Phase::Echo {
                            decoder: Decoder::new(Role::Server),
                        };
                    }
                    Dialect::Wse => self.start_session(&request, cx),
                    Dialect::Centrifuge(format) => self.start_centrifuge(format, cx),
                }
                if !rest.is_empty() && !self.is_closed() {
                    self.handle_frame_bytes(&mut rest, cx);
                }
            }
        }
    }

    /// Answers the upgrade request with an HTTP error and closes once it is written.
    fn reject_upgrade(&mut self, r: &handshake::Reject, why: RejectReason, cx: &mut Cx<'_>) {
        cx.metrics.rejected(why).inc();
        self.inbuf = Vec::new();
        self.queue(Bytes::from(handshake::response_reject(r)), cx);
        self.phase = Phase::Closed {
            deadline: cx.clock.now + cx.cfg.limits.close_timeout,
        };
    }

    /// After a refusal's frames are queued: nothing more is read, and the socket goes once they
    /// are written and the peer closes, or after [`REFUSED_LINGER`] at the latest (at once when
    /// the shard already has [`REFUSED_LINGERING_MAX_PER_SHARD`] refusals lingering).
    fn refuse(&mut self, cx: &mut Cx<'_>) {
        debug_assert!(!self.refused && !self.admitted);
        let linger = if cx.refused_lingering < REFUSED_LINGERING_MAX_PER_SHARD {
            REFUSED_LINGER
        } else {
            Duration::ZERO
        };
        self.refused = true;
        self.phase = Phase::Closed {
            deadline: cx.clock.now + linger,
        };
    }

    /// A Centrifuge connection: admitted now, authenticated by its `connect` command.
    fn start_centrifuge(&mut self, format: centrifuge::Format, cx: &mut Cx<'_>) {
        if !cx.admission.try_admit() {
            cx.metrics.rejected(RejectReason::MaxConnections).inc();
            let code = CloseCode::TryAgainLater;
            self.note_close(code.code(), cx);
            self.queue(codec::encode_close(code.code(), code.reason()), cx);
            self.refuse(cx);
            return;
        }
        self.admitted = true;
        cx.events.push(ConnEvent::Upgraded);
        cx.metrics
            .handshake_latency
            .observe(cx.clock.now.saturating_duration_since(self.accepted_at));
        let session = centrifuge::Session::new(
            format,
            self.id.to_string().into(),
            Arc::clone(cx.centrifuge),
            cx.clock.now,
        );
        self.phase = Phase::Centrifuge {
            decoder: Decoder::new(Role::Server),
            session: Box::new(CentrifugeSession {
                session,
                rate: TokenBucket::new(cx.rate, cx.clock.mono_ms()),
                user: None,
                subs: Vec::new(),
                recovering: Vec::new(),
                subscribing: HashMap::new(),
                publishing: VecDeque::new(),
                histories: HashMap::new(),
                presences: HashMap::new(),
                join_leave: HashSet::new(),
                next_history: 0,
                presence_on: cx.cfg.presence.enabled,
                recovery_on: cx.cfg.recovery.enabled,
                history_limit_max: cx.centrifuge.history_limit_max,
            }),
        };
    }

    /// Runs `f` on the Centrifuge session, then hands what it asks of the shard to the shard
    /// and what it sends to the socket; closes with its code when it ends.
    fn centrifuge_step(
        &mut self,
        cx: &mut Cx<'_>,
        f: impl FnOnce(&mut centrifuge::Session, centrifuge::Cx<'_>) -> Result<(), DisconnectCode>,
    ) {
        let Phase::Centrifuge { session, .. } = &mut self.phase else {
            return;
        };
        let result = session.step(cx, f);
        let max = cx.cfg.limits.max_outbound_queue_bytes;
        let fits = self.transmit_centrifuge(max);
        match result {
            Err(code) => self.close(code.code(), code.reason(), cx),
            Ok(()) if !fits => self.evict(cx),
            Ok(()) => {}
        }
    }

    fn start_session(&mut self, request: &handshake::UpgradeRequest, cx: &mut Cx<'_>) {
        let id = self.id.to_string();
        let identity = match cx.auth {
            None => Ok((Identity::anonymous(&id, cx.default_publish), None)),
            Some(auth) => {
                let query = request.query.as_deref();
                match auth.extract_token(
                    request.cookie.as_deref(),
                    request.authorization.as_deref(),
                    query,
                ) {
                    None => Err(crate::auth::AuthError::Missing),
                    Some(token) => auth
                        .verify_with_claims(&token)
                        .map(|(identity, claims)| (identity, Some(claims))),
                }
            }
        };
        // Every outcome below is a WebSocket connection now: clients treat HTTP errors as network
        // failures and retry forever, so refusals travel as an error frame and a close code.
        let decoder = Decoder::new(Role::Server);
        let (identity, claims) = match identity {
            Ok(found) => found,
            Err(e) => {
                cx.metrics.auth_failed(&e);
                let code = CloseCode::Unauthorized;
                self.note_close(code.code(), cx);
                cx.events.push(ConnEvent::AuthRefused(e.clone()));
                let message = format!("Authentication failed: {e}");
                self.send_text(&protocol::error(e.code(), &message, false, &cx.clock), cx);
                self.queue(codec::encode_close(code.code(), code.reason()), cx);
                self.refuse(cx);
                return;
            }
        };
        if !cx.admission.try_admit() {
            cx.metrics.rejected(RejectReason::MaxConnections).inc();
            let code = CloseCode::TryAgainLater;
            self.note_close(code.code(), cx);
            self.queue(codec::encode_close(code.code(), code.reason()), cx);
            self.refuse(cx);
            return;
        }
        self.admitted = true;
        cx.events.push(ConnEvent::Upgraded);
        let user = identity.user_id.clone();
        cx.events.push(ConnEvent::Connected { user, claims });
        let ready =
            protocol::server_ready(&id, &identity.user_id, cx.cfg.recovery.enabled, &cx.clock);
        self.send_text(&ready, cx);
        cx.metrics
            .handshake_latency
            .observe(cx.clock.now.saturating_duration_since(self.accepted_at));
        let msgpack = request
            .query
            .as_deref()
            .and_then(|q| handshake::query_param(q, "format"))
            .is_some_and(|f| f == "msgpack");
        let auto: Vec<String> = identity
            .auto_subscribe
            .iter()
            .map(|t| t.to_string())
            .collect();
        self.next_ping = cx.clock.now + cx.cfg.protocol.ping_interval;
        self.phase = Phase::Live {
            decoder,
            session: Box::new(Session {
                identity,
                rate: TokenBucket::new(cx.rate, cx.clock.mono_ms()),
                subs: Vec::new(),
                msgpack,
                recovering: Vec::new(),
                // server_ready went out as 1.
                seq: 1,
            }),
        };
        if !auto.is_empty() {
            let topics = auto
                .iter()
                .map(|t| std::borrow::Cow::Borrowed(t.as_str()))
                .collect();
            let sub = protocol::Subscription {
                topics,
                ..Default::default()
            };
            self.request_subscribe(sub, cx);
        }
    }

    // --------------------------------------------------------------------------------------------
    // Frames
    // --------------------------------------------------------------------------------------------

    fn handle_frame_bytes(&mut self, data: &mut [u8], cx: &mut Cx<'_>) {
        // Frames are decoded straight from the read buffer; only the bytes of an incomplete
        // frame are kept, and appended to (not copied again) until the frame is whole.
        let mut inbuf = std::mem::take(&mut self.inbuf);
        let (result, next) = if inbuf.is_empty() {
            self.decode(data, cx)
        } else {
            inbuf.extend_from_slice(data);
            self.decode(&mut inbuf, cx)
        };
        let next = match result {
            // Closing (ours) goes on decoding the same stream, looking for the peer's close
            // frame: the bytes after the message that made us close are kept for it, or the
            // next read would start in the middle of a frame.
            Ok(consumed)
                if matches!(
                    next,
                    Next::Continue | Next::Close(..) | Next::Evict | Next::Disconnect(..)
                ) =>
            {
                if inbuf.is_empty() {
                    if consumed < data.len() {
                        self.inbuf = data[consumed..].to_vec();
                    }
                } else {
                    inbuf.drain(..consumed);
                    if !inbuf.is_empty() {
                        self.inbuf = inbuf;
                    }
                }
                next
            }
            Ok(_) => next,
            Err(e) => self.frame_error(&e, cx),
        };
        match next {
            Next::Continue => {}
            Next::Disconnect(code) => self.close(code.code(), code.reason(), cx),
            Next::Close(code) => self.close_with(code, cx),
            Next::Fail(code) => self.fail(code, cx),
            Next::PeerClosed(code) => {
                self.close_code.get_or_insert(code);
                let now = cx.clock.now;
                self.enter_closed(now + cx.cfg.limits.close_timeout, cx);
            }
            Next::Evict => self.evict(cx),
        }
    }

    /// Runs the phase's decoder over `buf`: bytes consumed (or the violation) and what next.
    fn decode(&mut self, buf: &mut [u8], cx: &mut Cx<'_>) -> (Result<usize, FrameError>, Next) {
        let max = cx.cfg.limits.max_message_size;
        let max_queue = cx.cfg.limits.max_outbound_queue_bytes;
        let mut next = Next::Continue;
        let out = &mut self.out;
        // Replies count against the outbound cap like everything else: a client that keeps
        // asking (pings, hellos, subscribes, echoes) and never reads is evicted at the cap, as
        // soon as the message that crossed it, not after the whole read.
        let result = match &mut self.phase {
            Phase::Live { decoder, session } => {
                let id = self.id;
                decoder.decode(buf, max, |m| {
                    next = session.handle(id, m, out, cx);
                    if matches!(next, Next::Continue) && out.over(max_queue) {
                        next = Next::Evict;
                    }
                    cont(&next)
                })
            }
            Phase::Centrifuge { decoder, session } => decoder.decode(buf, max, |m| {
                next = session.handle(m, out, cx);
                if matches!(next, Next::Continue) && out.over(max_queue) {
                    next = Next::Evict;
                }
                cont(&next)
            }),
            Phase::Echo { decoder } => decoder.decode(buf, max, |m| {
                next = echo(m, out, cx);
                if matches!(next, Next::Continue) && out.over(max_queue) {
                    next = Next::Evict;
                }
                cont(&next)
            }),
            Phase::Closing { decoder, .. } => decoder.decode(buf, max, |m| {
                if let Message::Close(c) = m {
                    next = Next::PeerClosed(c.map_or(CloseCode::NoStatus.code(), |c| c.code));
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            }),
            Phase::Handshake | Phase::Closed { .. } => Ok(buf.len()),
        };
        (result, next)
    }

    /// A protocol violation: say why where the protocol has a message for it, then close.
    fn frame_error(&mut self, e: &FrameError, cx: &mut Cx<'_>) -> Next {
        if let FrameError::MessageTooLarge { .. } = e
            && self.is_live()
        {
            self.send_error(ErrorCode::MessageTooLarge, &e.to_string(), false, cx);
        }
        let code = e.close_code();
        if matches!(self.phase, Phase::Closing { .. }) {
            let now = cx.clock.now;
            self.enter_closed(now, cx);
            return Next::Continue;
        }
        Next::Fail(code)
    }

    /// Queues the close frame and goes straight to `Closed`.
    fn fail(&mut self, code: CloseCode, cx: &mut Cx<'_>) {
        if matches!(self.phase, Phase::Live { .. } | Phase::Echo { .. }) {
            self.note_close(code.code(), cx);
            self.queue(codec::encode_close(code.code(), code.reason()), cx);
        }
        let deadline = cx.clock.now + cx.cfg.limits.close_timeout;
        self.enter_closed(deadline, cx);
    }

    fn request_subscribe(&mut self, sub: protocol::Subscription<'_>, cx: &mut Cx<'_>) {
        if let Phase::Live { session, .. } = &mut self.phase {
            session.request_subscribe(sub, cx);
        }
    }
}

/// The event that hands a departing session's subscriptions to the shard.
/// A Centrifuge connection's live state: the protocol session, and what the shard keeps on it
/// as on a WSE session.
struct CentrifugeSession {
    session: centrifuge::Session,
    /// The inbound rate limit, as on WSE sessions.
    rate: TokenBucket,
    /// The user, once its `connect` succeeded (empty: anonymous).
    user: Option<Box<str>>,
    /// Topics this connection is subscribed to (names shared with the shard's topic table).
    subs: Vec<Arc<str>>,
    /// Topics whose position or replay is on its way from the owner (live frames of these are
    /// skipped meanwhile: they are older than the position, or part of the replay).
    recovering: Vec<Arc<str>>,
    /// Subscribes waiting for the shard's acknowledgement, by channel (the session subscribes
    /// a channel once at a time).
    subscribing: HashMap<Arc<str>, PendingSubscribe>,
    /// History reads waiting for the owner, by request id: bounded by the session's
    /// `PENDING_MAX` requests.
    histories: HashMap<u64, PendingHistory>,
    /// Channels whose subscription asked for join/leave pushes (the namespace's `join_leave`,
    /// and the subscribe's flag or `force_push_join_leave`): at most one per subscription.
    join_leave: HashSet<Arc<str>>,
    /// Presence reads waiting for the owner, by request id, and whether they list the members
    /// (`presence`) or count them (`presence_stats`): bounded like `histories`.
    presences: HashMap<u64, (centrifuge::Ticket, bool)>,
    /// The id of the next request to an owner (history or presence counts).
    next_history: u64,
    /// `presence.enabled`: topics' owners keep presence members.
    presence_on: bool,
    /// `recovery.enabled`: topics have positions and history.
    recovery_on: bool,
    /// Most publications a recovery returns (`centrifuge.history_limit_max`); past it the
    /// subscription is not recovered.
    history_limit_max: usize,
    /// Publishes waiting for the owner's sequencing, oldest first: bounded by the session's
    /// `PENDING_MAX` requests.
    publishing: VecDeque<(Arc<str>, centrifuge::Ticket)>,
}

/// A Centrifuge `history` waiting for the topic's owner.
struct PendingHistory {
    ticket: centrifuge::Ticket,
    /// The epoch of the `since` position, if one was given.
    since_epoch: Option<String>,
    reverse: bool,
}

/// A Centrifuge subscribe waiting for the shard.
struct PendingSubscribe {
    ticket: centrifuge::Ticket,
    /// The client asked to recover (else only the stream's position, if anything).
    recover: bool,
    /// The namespace's `history_size`: a recovery of more than that many publications fails,
    /// as the stream would not hold them in Centrifugo.
    keep: usize,
    /// The owner's replay (whole WSE frames), once it arrived.
    replay: Bytes,
}

/// The publications of a replay (whole WSE publication frames, in order) for a subscribe or
/// history reply.
pub(crate) fn replayed_publications(frames: &Bytes) -> Vec<centrifuge::proto::Publication> {
    let mut out = Vec::new();
    let mut decoder = Decoder::new(Role::Client);
    let mut buf = frames.to_vec();
    // Frames the server built itself: a decoding error cannot happen; it would end the list.
    let _ = decoder.decode(&mut buf, usize::MAX, |m| {
        if let Message::Text(t) = m
            && let Some(p) = crate::dialect::publication_of(t.as_bytes())
        {
            out.push(p);
        }
        ControlFlow::Continue(())
    });
    out
}

impl fmt::Debug for CentrifugeSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CentrifugeSession")
            .field("client", &self.session.client())
            .field("user", &self.user)
            .field("subs", &self.subs)
            .finish_non_exhaustive()
    }
}

impl CentrifugeSession {
    fn opcode(&self) -> OpCode {
        match self.session.format() {
            centrifuge::Format::Json => OpCode::Text,
            centrifuge::Format::Protobuf => OpCode::Binary,
        }
    }

    fn left(self: Box<Self>) -> Option<ConnEvent> {
        let user = self.user?;
        Some(ConnEvent::Left {
            subs: self.subs,
            user,
        })
    }

    fn handle(&mut self, m: Message<'_>, out: &mut OutQueue, cx: &mut Cx<'_>) -> Next {
        let payload = match data_message(m, out, cx) {
            Ok(payload) => payload,
            Err(next) => return next,
        };
        match self.rate.check(cx.rate, cx.clock.mono_ms()) {
            Verdict::Allow | Verdict::AllowAndWarn { .. } => {}
            // Centrifuge has no warning and a dropped command would leave its reply missing:
            // past the limit the connection is closed with Centrifuge's code for it (the
            // clients reconnect with backoff).
            Verdict::Drop { .. } | Verdict::Abuse => {
                cx.metrics.rate_limited_total.inc();
                cx.metrics.dropped(DropReason::RateLimited).inc();
                return Next::Disconnect(DisconnectCode::TooManyRequests);
            }
        }
        let result = self.step(cx, |s, ccx| s.handle_message(ccx, payload));
        let op = self.opcode();
        while let Some(message) = self.session.poll_transmit() {
            cx.metrics.messages_out_total.inc();
            out.push(codec::encode_frame(op, &message));
        }
        match result {
            Ok(()) => Next::Continue,
            Err(code) => Next::Disconnect(code),
        }
    }

    /// Runs `f` on the session, then turns its requests into the shard's [`ConnEvent`]s.
    fn step(
        &mut self,
        cx: &mut Cx<'_>,
        f: impl FnOnce(&mut centrifuge::Session, centrifuge::Cx<'_>) -> Result<(), DisconnectCode>,
    ) -> Result<(), DisconnectCode> {
        let ccx = centrifuge::Cx {
            now: cx.clock.now,
            wall_s: cx.clock.wall_ms / 1000,
            auth: cx.auth,
        };
        f(&mut self.session, ccx)?;
        if self.user.is_none()
            && let Some(user) = self.session.user()
        {
            // Anonymous connections are known by their id, as anonymous WSE sessions are.
            let user: Box<str> = if user.is_empty() {
                self.session.client().into()
            } else {
                user.into()
            };
            self.user = Some(user.clone());
            cx.events.push(ConnEvent::Connected { user, claims: None });
        }
        while let Some(request) = self.session.poll_request() {
            self.request(request, ccx, cx)?;
        }
        Ok(())
    }

    /// Asks the topic's owner for `channel`'s members: listed with `list`, else counted.
    fn ask_presence(
        &mut self,
        ticket: centrifuge::Ticket,
        channel: &str,
        list: bool,
        cx: &mut Cx<'_>,
    ) {
        let request = self.next_history;
        self.next_history += 1;
        self.presences.insert(request, (ticket, list));
        cx.events.push(ConnEvent::Presence {
            request,
            topic: channel.to_owned(),
            list,
        });
    }

    fn request(
        &mut self,
        request: centrifuge::Request,
        ccx: centrifuge::Cx<'_>,
        cx: &mut Cx<'_>,
    ) -> Result<(), DisconnectCode> {
        use centrifuge::{Answer, ErrorCode as Code, Request};
        let failed = |ticket, code| Answer::Failed { ticket, code };
        let answer = match request {
            Request::Subscribe {
                ticket,
                channel,
                stream,
                recover,
                presence,
                join_leave,
            } => {
                if protocol::topic_problem(&channel).is_some() {
                    failed(ticket, Code::BadRequest)
                } else {
                    // The owner answers a recovery request with the stream's position (and the
                    // replay when the position asked for is in its epoch); a position alone is
                    // a request that recovers nothing.
                    let position = match (&recover, stream || recover.is_some()) {
                        _ if !self.recovery_on => None,
                        (Some(p), _) => Some((protocol::parse_epoch(&p.epoch), p.offset)),
                        (None, true) => Some((None, 0)),
                        (None, false) => None,
                    };
                    if join_leave {
                        self.join_leave.insert(Arc::clone(&channel));
                    }
                    self.subscribing.insert(
                        Arc::clone(&channel),
                        PendingSubscribe {
                            ticket,
                            recover: recover.is_some(),
                            keep: history_size(cx, &channel),
                            replay: Bytes::new(),
                        },
                    );
                    let topic = channel.to_string();
                    cx.events.push(ConnEvent::Subscribe(SubscribeRequest {
                        recover: position
                            .map(|(epoch, offset)| vec![(topic.clone(), epoch, offset)])
                            .unwrap_or_default(),
                        topics: vec![topic],
                        client: presence.map(Box::new),
                        ..Default::default()
                    }));
                    return Ok(());
                }
            }
            Request::Unsubscribe { channel } => {
                self.subscribing.remove(&channel);
                self.join_leave.remove(&channel);
                cx.events.push(ConnEvent::Unsubscribe {
                    topics: vec![channel.to_string()],
                });
                return Ok(());
            }
            Request::Publish {
                ticket,
                channel,
                data,
                ..
            } => match serde_json::from_slice::<&RawValue>(&data) {
                Ok(data) if protocol::topic_problem(&channel).is_none() => {
                    cx.events.push(ConnEvent::Publish {
                        topic: channel.to_string(),
                        body: protocol::publication(CENTRIFUGE_PUBLISH_EVENT, data),
                        ack: true,
                    });
                    self.publishing.push_back((channel, ticket));
                    return Ok(());
                }
                _ => failed(ticket, Code::BadRequest),
            },
            Request::History {
                ticket,
                channel,
                limit,
                since,
                reverse,
            } if self.recovery_on && protocol::topic_problem(&channel).is_none() => {
                let request = self.next_history;
                self.next_history += 1;
                self.histories.insert(
                    request,
                    PendingHistory {
                        ticket,
                        since_epoch: since.as_ref().map(|p| p.epoch.clone()),
                        reverse,
                    },
                );
                cx.events.push(ConnEvent::History {
                    request,
                    topic: channel.to_string(),
                    after: since.map(|p| p.offset),
                    limit,
                    reverse,
                    keep: history_size(cx, &channel),
                });
                return Ok(());
            }
            Request::Presence { ticket, channel }
                if self.presence_on && protocol::topic_problem(&channel).is_none() =>
            {
                self.ask_presence(ticket, &channel, true, cx);
                return Ok(());
            }
            Request::PresenceStats { ticket, channel }
                if self.presence_on && protocol::topic_problem(&channel).is_none() =>
            {
                self.ask_presence(ticket, &channel, false, cx);
                return Ok(());
            }
            // Without `recovery.enabled` or `presence.enabled` the owner keeps no history or
            // members: Centrifugo's answer for a feature it does not have.
            Request::Presence { ticket, .. }
            | Request::PresenceStats { ticket, .. }
            | Request::History { ticket, .. } => failed(ticket, Code::NotAvailable),
            Request::Rpc {
                ticket,
                method,
                data,
            } => match self.user.as_ref() {
                Some(user) if cx.app_rpc => {
                    cx.events.push(ConnEvent::Rpc {
                        user: user.clone(),
                        request: ticket.0,
                        method,
                        data,
                    });
                    return Ok(());
                }
                // No backend to answer: Centrifugo's answer without an RPC proxy.
                _ => failed(ticket, Code::NotAvailable),
            },
            Request::Send { data } => {
                // Empty data is valid Centrifuge and no JSON: nothing for the application.
                if let Some(user) = self.user.as_ref().filter(|_| !data.is_empty()) {
                    cx.events.push(ConnEvent::App {
                        user: user.clone(),
                        payload: data,
                    });
                }
                return Ok(());
            }
        };
        self.session.answer(ccx, answer)
    }
}

/// The `history_size` of `channel`'s namespace (0 when it resolves to none: the session
/// refused such a channel before asking).
fn history_size(cx: &Cx<'_>, channel: &str) -> usize {
    cx.centrifuge
        .namespaces
        .resolve(channel)
        .map_or(0, |c| c.namespace.history_size)
}

/// The Centrifuge reply error for a topic the shard refused (a WSE refusal reason).
fn refusal_code(reason: &str) -> centrifuge::ErrorCode {
    if reason == ErrorCode::SubscriptionLimit.as_str()
        || reason == ErrorCode::PresenceLimit.as_str()
    {
        centrifuge::ErrorCode::LimitExceeded
    } else if reason == ErrorCode::Forbidden.as_str() {
        centrifuge::ErrorCode::PermissionDenied
    } else {
        centrifuge::ErrorCode::Internal
    }
}

fn left(mut session: Box<Session>) -> ConnEvent {
    ConnEvent::Left {
        subs: std::mem::take(&mut session.subs),
        user: session.identity.user_id.clone(),
    }
}

fn cont(next: &Next) -> ControlFlow<()> {
    match next {
        Next::Continue => ControlFlow::Continue(()),
        _ => ControlFlow::Break(()),
    }
}

/// The conformance route: every data message straight back, control frames per the RFC.
fn echo(m: Message<'_>, out: &mut OutQueue, cx: &mut Cx<'_>) -> Next {
    cx.metrics.messages_out_total.inc();
    match m {
        Message::Text(t) => out.push(codec::encode_frame(OpCode::Text, t.as_bytes())),
        Message::Binary(b) => out.push(codec::encode_frame(OpCode::Binary, b)),
        Message::Ping(p) => out.push_pong(p, cx.cfg.limits.max_outbound_queue_bytes),
        Message::Pong(_) => {}
        Message::Close(c) => return reply_close(c, out),
    }
    Next::Continue
}

/// The step every dialect takes first with a message of a live connection: control frames
/// answered per the RFC (a Ping's Pong counted against the outbound cap, a Close echoed), a
/// data message's payload counted and handed back.
fn data_message<'m>(m: Message<'m>, out: &mut OutQueue, cx: &mut Cx<'_>) -> Result<&'m [u8], Next> {
    let payload: &[u8] = match m {
        Message::Ping(p) => {
            out.push_pong(p, cx.cfg.limits.max_outbound_queue_bytes);
            return Err(Next::Continue);
        }
        Message::Pong(_) => return Err(Next::Continue),
        Message::Close(c) => {
            cx.metrics
                .closed_with(c.map_or(CloseCode::NoStatus.code(), |c| c.code));
            return Err(reply_close(c, out));
        }
        Message::Text(t) => t.as_bytes(),
        Message::Binary(b) => b,
    };
    cx.metrics.messages_in_total.inc();
    cx.metrics.bytes_in_total.add(payload.len() as u64);
    Ok(payload)
}

/// Answers the peer's close frame with the same code (RFC 6455 §5.5.1).
fn reply_close(c: Option<codec::CloseFrame<'_>>, out: &mut OutQueue) -> Next {
    let code = c.as_ref().map_or(CloseCode::NoStatus.code(), |c| c.code);
    let frame = match c {
        Some(c) => codec::encode_close(c.code, ""),
        None => codec::encode_frame(OpCode::Close, &[]),
    };
    out.push(frame);
    Next::PeerClosed(code)
}

impl Session {
    /// One complete message of a live connection.
    fn handle(&mut self, id: ConnId, m: Message<'_>, out: &mut OutQueue, cx: &mut Cx<'_>) -> Next {
        let binary_frame = matches!(m, Message::Binary(_));
        let payload = match data_message(m, out, cx) {
            Ok(payload) => payload,
            Err(next) => return next,
        };
        let mut s = SessionOut {
            id,
            session: self,
            out,
        };
        if let Some(next) = s.charge(cx) {
            return next;
        }
        let json = match protocol::binary_to_json(payload, cx.cfg.limits.max_message_size) {
            Ok(json) => json,
            Err(e) => {
                s.error(e.code(), &e.to_string(), cx);
                return Next::Continue;
            }
        };
        match protocol::parse_client_message(&json) {
            Ok(ClientMessage::Batch(items)) => s.batch(&items, cx),
            Ok(msg) => s.dispatch(msg, &json, cx),
            Err(e) if app_handles(&e, cx.cfg) => s.hand_to_app(&json, cx),
            Err(e) => {
                if e == protocol::InboundError::TooDeep {
                    cx.metrics.dropped(DropReason::JsonTooDeep).inc();
                }
                if e == protocol::InboundError::NotJson
                    && matches!(json, Cow::Borrowed(_))
                    && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_err()
                {
                    // Not JSON at all, and not an encoding we know: the application may still
                    // want it (JSON of the wrong shape is only the client's mistake).
                    cx.events.push(ConnEvent::Unparsed {
                        user: s.session.identity.user_id.clone(),
                        binary: binary_frame,
                        payload: Bytes::copy_from_slice(payload),
                    });
                }
                s.error(e.code(), &e.to_string(), cx);
                Next::Continue
            }
        }
    }

    /// Splits requested topics into acceptable ones (valid and permitted) and refusals, reads the
    /// recovery positions and presence data, and asks the shard (which applies the subscription
    /// limit).
    fn request_subscribe(&mut self, sub: protocol::Subscription<'_>, cx: &mut Cx<'_>) {
        let presence = sub.presence.map(RawValue::get);
        let group = sub.queue_group.as_deref();
        let mut req = self.admit(sub.topics, presence, group, cx.cfg);
        if sub.recover && cx.cfg.recovery.enabled && req.queue_group.is_none() {
            req.recover = recovery_positions(sub.recovery, &req.topics);
        }
        cx.events.push(ConnEvent::Subscribe(req));
    }

    /// Splits requested topics into acceptable ones (valid, permitted, and with presence data
    /// and queue group within limits) and refusals; the shard applies the subscription limit.
    fn admit<'t>(
        &self,
        topics: impl IntoIterator<Item = Cow<'t, str>>,
        presence: Option<&str>,
        queue_group: Option<&str>,
        cfg: &Config,
    ) -> SubscribeRequest {
        let mut req = SubscribeRequest::default();
        // Queue-group members are workers sharing a topic's publications, not room members:
        // they take no part in presence (PROTOCOL.md, queue groups).
        let presence =
            (cfg.presence.enabled && queue_group.is_none()).then(|| presence.unwrap_or("{}"));
        let presence_too_large = presence.is_some_and(|p| p.len() > cfg.presence.max_data_size);
        let default_groups = &cfg.auth.default_queue_groups;
        let group_problem =
            queue_group.and_then(|g| self.identity.queue_group_refusal(g, default_groups));
        for topic in topics {
            let reason = if let Some(p) = protocol::topic_problem(&topic) {
                p
            } else if !self.identity.subscribe.permits(&topic) {
                ErrorCode::Forbidden.as_str()
            } else if presence_too_large {
                ErrorCode::PresenceDataTooLarge.as_str()
            } else if let Some(p) = group_problem {
                p.as_str()
            } else {
                req.topics.push(topic.into_owned());
                continue;
            };
            req.failed.push(FailedTopic {
                topic: topic.into_owned(),
                reason: reason.to_owned(),
            });
        }
        req.presence = presence.map(|p| Bytes::copy_from_slice(p.as_bytes()));
        req.queue_group = queue_group
            .filter(|_| group_problem.is_none())
            .map(Arc::from);
        req
    }
}

/// The `{"<topic>": {"epoch": "..", "offset": n}}` map of a recovering subscribe, for the
/// requested topics that have an offset. A missing or malformed epoch still recovers nothing
/// (the reply then carries the current position, and the client re-baselines).
fn recovery_positions(
    raw: Option<&RawValue>,
    topics: &[String],
) -> Vec<(String, Option<u32>, u64)> {
    let Some(map) = raw.and_then(|r| {
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(r.get()).ok()
    }) else {
        return Vec::new();
    };
    topics
        .iter()
        .filter_map(|t| {
            let pos = map.get(t)?;
            let offset = pos.get("offset")?.as_u64()?;
            let epoch = pos
                .get("epoch")
                .and_then(|e| e.as_str())
                .and_then(protocol::parse_epoch);
            Some((t.clone(), epoch, offset))
        })
        .collect()
}

/// Whether a message the engine could not parse is still the application's: a malformed
/// subscription or publication when `protocol.app_handles_requests` leaves those to it.
fn app_handles(e: &protocol::InboundError, cfg: &Config) -> bool {
    cfg.protocol.app_handles_requests
        && matches!(
            e,
            protocol::InboundError::BadPayload("subscription_update" | "publish")
        )
}

/// A session and its connection's outbound queue, borrowed together for one message.
struct SessionOut<'s> {
    id: ConnId,
    session: &'s mut Session,
    out: &'s mut OutQueue,
}

impl SessionOut<'_> {
    /// Applies the rate limit to one message; `Some` when it must not be processed.
    fn charge(&mut self, cx: &mut Cx<'_>) -> Option<Next> {
        match self.session.rate.check(cx.rate, cx.clock.mono_ms()) {
            Verdict::Allow => None,
            Verdict::AllowAndWarn {
                remaining,
                current_rate,
            } => {
                let warn =
                    protocol::rate_limit_warning(current_rate, cx.rate.refill_per_sec, remaining);
                self.json(warn, cx);
                None
            }
            Verdict::Drop { notify } => {
                cx.metrics.rate_limited_total.inc();
                cx.metrics.dropped(DropReason::RateLimited).inc();
                if notify {
                    self.error(ErrorCode::RateLimited, "Rate limit exceeded", cx);
                }
                Some(Next::Continue)
            }
            Verdict::Abuse => {
                cx.metrics.rate_limited_total.inc();
                Some(Next::Close(CloseCode::RateLimited))
            }
        }
    }

    fn batch(&mut self, items: &[&RawValue], cx: &mut Cx<'_>) -> Next {
        for (i, item) in items.iter().enumerate() {
            // The frame paid for the first item.
            if i > 0
                && let Some(next) = self.charge(cx)
            {
                match next {
                    Next::Continue => continue,
                    other => return other,
                }
            }
            let json = item.get().as_bytes();
            match protocol::parse_client_message(json) {
                Ok(ClientMessage::Batch(_)) => {
                    self.error(ErrorCode::InvalidMessage, "nested batch", cx);
                }
                Ok(msg) => {
                    let next = self.dispatch(msg, json, cx);
                    if !matches!(next, Next::Continue) {
                        return next;
                    }
                }
                Err(e) if app_handles(&e, cx.cfg) => {
                    self.hand_to_app(json, cx);
                }
                Err(e) => self.error(e.code(), &e.to_string(), cx),
            }
        }
        Next::Continue
    }

    fn dispatch(&mut self, msg: ClientMessage<'_>, json: &[u8], cx: &mut Cx<'_>) -> Next {
        match msg {
            ClientMessage::Subscribe(_)
            | ClientMessage::Unsubscribe { .. }
            | ClientMessage::Publish { .. }
                if cx.cfg.protocol.app_handles_requests =>
            {
                return self.hand_to_app(json, cx);
            }
            ClientMessage::Hello { protocol_version } => {
                let hello = protocol::server_hello(
                    &self.id.to_string(),
                    protocol_version,
                    cx.cfg.recovery.enabled,
                    cx.cfg,
                    &cx.clock,
                );
                self.json(hello, cx);
            }
            ClientMessage::Ping { timestamp } => {
                // Always compact text: the Python client's watchdog only reads text frames.
                let pong = protocol::pong(timestamp, &cx.clock);
                cx.metrics.messages_out_total.inc();
                self.out.push(codec::encode_frame(OpCode::Text, &pong));
            }
            ClientMessage::Pong => {}
            ClientMessage::Subscribe(s) => self.session.request_subscribe(s, cx),
            ClientMessage::PresenceUpdate { data } => {
                if !cx.cfg.presence.enabled {
                    self.error(
                        ErrorCode::InvalidMessage,
                        "presence is not enabled on this server",
                        cx,
                    );
                } else if data.get().len() > cx.cfg.presence.max_data_size {
                    self.error(
                        ErrorCode::PresenceDataTooLarge,
                        "presence data over presence.max_data_size",
                        cx,
                    );
                } else {
                    let data = Bytes::copy_from_slice(data.get().as_bytes());
                    cx.events.push(ConnEvent::PresenceUpdate { data });
                }
            }
            ClientMessage::Unsubscribe { topics } => {
                let topics = topics.into_iter().map(|t| t.into_owned()).collect();
                cx.events.push(ConnEvent::Unsubscribe { topics });
            }
            ClientMessage::Publish {
                topic,
                event,
                data,
                ack,
            } => {
                if let Some(problem) = protocol::topic_problem(&topic) {
                    self.error(ErrorCode::InvalidMessage, problem, cx);
                } else if !self.session.identity.publish.permits(&topic) {
                    let msg = format!("not allowed to publish to '{topic}'");
                    self.error(ErrorCode::Forbidden, &msg, cx);
                } else {
                    cx.events.push(ConnEvent::Publish {
                        topic: topic.into_owned(),
                        body: protocol::publication(&event, data),
                        ack,
                    });
                }
            }
            ClientMessage::Batch(_) => unreachable!("batches are unpacked by the caller"),
            ClientMessage::App { t: _ } => return self.hand_to_app(json, cx),
        }
        Next::Continue
    }

    /// Hands the message, as it is, to the application's event stream.
    fn hand_to_app(&mut self, json: &[u8], cx: &mut Cx<'_>) -> Next {
        cx.events.push(ConnEvent::App {
            user: self.session.identity.user_id.clone(),
            payload: Bytes::copy_from_slice(json),
        });
        Next::Continue
    }

    fn json(&mut self, json: Vec<u8>, cx: &mut Cx<'_>) {
        let (wire, bytes) = protocol::encode_for_connection(
            json,
            self.session.msgpack,
            cx.cfg.protocol.compression_threshold,
        );
        let op = match wire {
            Wire::Text => OpCode::Text,
            Wire::Binary => OpCode::Binary,
        };
        cx.metrics.messages_out_total.inc();
        self.out.push(codec::encode_frame(op, &bytes));
    }

    fn error(&mut self, code: ErrorCode, message: &str, cx: &mut Cx<'_>) {
        let json = protocol::error(code, message, true, &cx.clock);
        self.json(json, cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 4 << 20;

    fn pong_count(q: &OutQueue) -> usize {
        q.frames.iter().filter(|f| f[0] == 0x8a).count()
    }

    #[test]
    fn pongs_are_coalesced_only_once_output_backs_up() {
        let mut q = OutQueue::default();
        for _ in 0..10 {
            q.push_pong(b"ping", MAX);
        }
        assert_eq!(pong_count(&q), 10, "a short burst gets a Pong per Ping");
        q.push(Bytes::from(vec![0u8; PONG_COALESCE_QUEUED_BYTES]));
        for i in 0..1000u32 {
            q.push_pong(&i.to_be_bytes(), MAX);
        }
        assert_eq!(pong_count(&q), 11, "one Pong queued past the threshold");
        let last = q.frames.back().unwrap();
        assert_eq!(
            &last[2..],
            &999u32.to_be_bytes(),
            "the newest Ping's payload"
        );
        let total: usize = q.frames.iter().map(Bytes::len).sum();
        assert_eq!(q.bytes(), total);
    }

    #[test]
    fn a_partly_written_pong_is_never_replaced() {
        let mut q = OutQueue::default();
        q.push(Bytes::from(vec![0u8; PONG_COALESCE_QUEUED_BYTES]));
        q.push_pong(b"a", MAX);
        q.advance(PONG_COALESCE_QUEUED_BYTES + 1);
        q.push_pong(b"b", MAX);
        assert_eq!(
            q.frames(),
            2,
            "the started Pong stays, the new one queues behind it"
        );
    }

    #[test]
    fn replays_get_an_allowance_up_to_the_budget_then_must_fit_the_cap() {
        let mut q = OutQueue::default();
        q.push(Bytes::from(vec![0u8; 100]));
        assert!(!q.over(100));
        q.allowance += 1000;
        q.push(Bytes::from(vec![0u8; 1000]));
        assert!(!q.over(100), "the replay's bytes are tolerated");
        q.push(Bytes::from(vec![0u8; 1]));
        assert!(q.over(100), "anything more is over the cap");
        q.advance(1101);
        assert_eq!(q.allowance, 0, "the allowance drains with the replay");
        assert!(q.is_empty());
    }
}
