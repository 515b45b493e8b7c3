//! The cross-core fabric: an N×N grid of single-producer single-consumer queues between
//! participants (every shard, the control plane, and the cluster core).
//!
//! Owns: the queues, the per-destination overflow that keeps a sender from ever blocking, and the
//! doorbells. Never: interprets messages (the shard does).
//!
//! Sending: [`Endpoint::send`] appends to the destination's queue, or to a local overflow deque
//! when the queue is full. [`Endpoint::flush`], once per loop turn, moves overflow into the
//! queues and rings the doorbell of each destination that got something this turn: a doorbell is
//! the destination runtime's waker, which only makes a syscall when that runtime is parked, so a
//! busy peer costs one atomic per turn.
//!
//! Memory, bounded in bytes ([`Plan`](crate::fabric_plan::Plan), from `limits.fabric_memory_per_shard`): each participant
//! owns its outbound queues' slots (`capacity` entries of [`SLOT_BYTES`] each, allocated at start
//! but touched only as traffic fills them) and may have at most `inflight_max` bytes in flight —
//! the [`FabricMsg::charge`] of every entry it sent that its destination has not taken yet,
//! whether in a queue or in overflow. Past that, `send` drops the entry and the caller counts it
//! (`wse_dropped_total{reason="fabric_overflow"}`); an entry is always accepted when the sender
//! has nothing in flight, so one larger than the budget still goes through, alone. A fan-out
//! sends one shared `Bytes` to many shards and each copy is charged its full length: the bound is
//! on what the entries can keep alive, an over-estimate of the memory when they share a frame.
//!
//! Accounting without atomics per message: a receiver adds up the charges of what it took from a
//! sender and publishes the total once per [`Endpoint::receive`] (one store per sender that had
//! something); a sender reads those totals once per [`Endpoint::flush`], and once more per turn
//! when an entry would not fit.
//!
//! Ordering: FIFO per ordered pair of participants; nothing across pairs.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::task::Waker;

use bytes::Bytes;

use crate::auth::Authenticator;
use crate::centrifuge::proto::ClientInfo;
use crate::command::{Command, Payload};
use crate::config::Config;
use crate::conn::ConnId;
use crate::fabric_plan::SLOT_BYTES;
use crate::protocol::{ErrorCode, RecoveryInfo};
use crate::queue_groups::GroupName;
use crate::reply::ReplySlot;

/// Cross-core traffic: one enum, every variant says who sends it, who receives it, and what
/// losing it costs.
#[derive(Debug)]
pub enum FabricMsg {
    /// Publisher's shard (or the control plane) → the topic's owner shard: a publication to
    /// sequence and fan out. `body` is the JSON frame text without recovery stamps. `ack` names
    /// the connection waiting for a `publish_ack`. Lost: the publication never happens.
    Publish {
        /// The topic to publish to.
        topic: Arc<str>,
        /// The frame text, unstamped.
        body: Bytes,
        /// The connection waiting for a `publish_ack`, if any.
        ack: Option<ConnId>,
    },
    /// The cluster core (a publication from a peer node) or the control plane
    /// (`Server::broadcast_local`) → the topic's owner shard: a publication to sequence and fan
    /// out on this node only, never passed to the cluster core (full mesh: its origin node sends
    /// it to every interested peer itself). `body` as in [`FabricMsg::Publish`]. Lost: the
    /// publication never happens on this node.
    PublishLocal {
        /// The topic to publish to.
        topic: Arc<str>,
        /// The frame text, unstamped.
        body: Bytes,
    },
    /// Owner → the cluster core: a publication this node made (client, HTTP or engine
    /// `broadcast`), once, whatever the number of peers; the core hands it to
    /// `Node::publish`, which sends it to every peer that advertised interest. `body` is the
    /// unstamped frame text. Lost: no other node gets it (counted as a drop).
    ClusterPublish {
        /// The topic it was published to.
        topic: Arc<str>,
        /// The frame text, unstamped.
        body: Bytes,
    },
    /// Owner → the cluster core: this node's interest in `topic` starts (`on`: its first plain
    /// subscriber on any shard) or ends (its last left). An `on` is answered with
    /// [`FabricMsg::ClusterInterestAcked`] carrying `ticket` once every linked peer has
    /// acknowledged it (bounded by `cluster.sub_ack_timeout`). Lost: an `on` is taken as
    /// acknowledged at once (counted; publications from peers may then miss this node until the
    /// interest is advertised again); an `off` leaves the interest advertised (peers send what
    /// nobody here wants, which the owner drops).
    ClusterInterest {
        /// The topic.
        topic: Arc<str>,
        /// The queue group, when the interest is a group's (its first member on this node, or
        /// its last gone); `None`: plain subscribers.
        group: Option<Arc<str>>,
        /// The owner's number for this `on`, returned in the acknowledgement.
        ticket: u64,
        /// Interest starts (`true`) or ends.
        on: bool,
    },
    /// The cluster core → the owner that sent a `ClusterInterest { on: true }`: remote interest
    /// is confirmed (or the bounded wait ran out); the subscriptions waiting for it are
    /// acknowledged. Never dropped: the core retries it on the next turn while the fabric is full.
    ClusterInterestAcked {
        /// The topic.
        topic: Arc<str>,
        /// The queue group, as in the `ClusterInterest`.
        group: Option<Arc<str>>,
        /// The ticket of the `on` this answers.
        ticket: u64,
    },
    /// The cluster core → the topic's owner: a peer's publication for ONE member of this node's
    /// queue group `group` (the publishing node picked this node for it); the owner picks the
    /// shard, which picks the member. Not numbered (group members get unstamped frames). Lost:
    /// the group misses one message (counted).
    PublishGroup {
        /// The topic and group.
        group: Box<(Arc<str>, Arc<str>)>,
        /// The frame text.
        body: Bytes,
    },
    /// Owner → a shard with plain subscribers: a sequenced publication, framed once. Lost: those
    /// subscribers miss one message (counted as a drop).
    Deliver {
        /// The topic the frame belongs to; the receiving shard fans it out to its subscribers.
        topic: Arc<str>,
        /// The complete WebSocket frame, shared by every local subscriber.
        frame: Bytes,
    },
    /// Owner → the shard it picked for one queue group of the topic: a sequenced publication
    /// (without recovery stamps) for ONE local member of `group`, picked there. Lost: the group
    /// misses one message (counted as a drop; groups are at most once).
    DeliverGroup {
        /// The (topic, group) pair; the receiving shard picks one local member of it.
        group: Arc<GroupName>,
        /// The complete WebSocket frame, without recovery stamps.
        frame: Bytes,
    },
    /// Owner → the publisher's shard: the publication `offset` of `topic` was sequenced (in
    /// history `epoch` when recovery is on); send the `publish_ack` to `conn`. Lost: the client
    /// waits for an ack that never comes.
    PublishAcked {
        /// The connection that asked for the ack.
        conn: ConnId,
        /// The topic it published to.
        topic: Arc<str>,
        /// The offset the owner gave the publication.
        offset: u64,
        /// The topic's history epoch, when recovery is on.
        epoch: Option<u32>,
    },
    /// A shard → the topic's owner: a connection subscribes and needs the owner — to register
    /// the shard's interest (its first local plain subscriber), to replay history, to count a
    /// presence member or a queue-group member. Answered with `Joined`. Lost: the sender fails
    /// the topic at once with `SERVER_BUSY`.
    Join(Box<JoinRequest>),
    /// Owner → the shard that sent `Join`. Publications sequenced after it reach that shard;
    /// the replayed frames precede them. Lost: the acknowledgement never comes, and the
    /// connection skips the topic's live frames.
    Joined(Box<JoinReply>),
    /// A connection's shard → the topic's owner: read the topic's history for the connection.
    /// Lost: the connection's history request is never answered.
    History(Box<HistoryRequest>),
    /// Owner → the connection's shard: the answer to a [`FabricMsg::History`]. Lost: as above.
    HistoryRead(Box<HistoryReply>),
    /// A connection's shard → the topic's owner: count (and list) the topic's presence members
    /// for the connection (a Centrifuge `presence_stats` or `presence`). Lost: the request is
    /// never answered.
    Presence(Box<PresenceRequest>),
    /// Owner → every shard interested in the topic: a member connection joined or left the
    /// topic's presence (Centrifuge join/leave pushes). Lost: those pushes are not sent.
    JoinLeave(Box<JoinLeave>),
    /// Owner → the connection's shard: the answer to a [`FabricMsg::Presence`]. Lost: as
    /// above.
    PresenceRead(Box<PresenceReply>),
    /// A shard → the topic's owner: connection `conn` (of the sending shard) left the topic (or
    /// changed the kind of its subscription); `interest_off` when it was the shard's last plain
    /// subscriber, `user` when it leaves presence (answered with `PresenceLeft`), `group` when it
    /// left a queue group, of which the shard has `group_members` left. Lost: the owner keeps
    /// sending to the shard (which discards or gives the publication to another member), or a
    /// presence member stays.
    Leave {
        /// The topic left.
        topic: Arc<str>,
        /// The connection leaving (its shard is the sender).
        conn: ConnId,
        /// It was the shard's last plain subscriber: stop sending it the topic.
        interest_off: bool,
        /// Members of `group` the shard has left (absolute, not a decrement).
        group_members: u32,
        /// The user leaving the topic's presence, if it was a member.
        user: Option<Box<str>>,
        /// The queue group left, if any.
        group: Option<Arc<str>>,
    },
    /// Owner → the shard of the connection named in a `Leave` with a `user`: whether that
    /// departure ended the user's presence membership (then with the `presence_leave` event),
    /// so the connection's shard reports it before the connection's `disconnect`. Lost: the
    /// shard holds that `disconnect` back until `PRESENCE_LEAVE_WAIT` has passed, and the
    /// `presence_leave` event is not reported.
    PresenceLeft(Box<PresenceLeft>),
    /// A shard → the topic's owner: a member's new presence data. Lost: the update is not seen.
    PresenceUpdate(Box<PresenceUpdate>),
    /// The control plane → a topic's owner: a question, answered through its reply slot.
    /// Lost: the asker times out.
    Query(Box<Query>),
    /// The control plane → every shard: run with this configuration from now on. Lost: that
    /// shard keeps the old one, and `Server::reload` reports it unconfirmed.
    Reload(Arc<Reload>),
    /// The control plane → the shard that owns what the command is about (a connection's shard,
    /// or every shard for the commands that span them): an application command, answered
    /// through the responder it carries. Lost: the caller's future resolves to "not running"
    /// when the command is dropped unanswered, or times out at the caller.
    Command(Box<Command>),
    /// A shard over its connection budget → the least loaded shard: a freshly accepted socket
    /// (no byte read yet) for it to serve. Lost: the socket is closed; the client reconnects.
    Adopt {
        /// The accepted socket; the receiving shard owns and closes it.
        fd: OwnedFd,
    },
}

/// See [`FabricMsg::Join`].
#[derive(Debug)]
pub struct JoinRequest {
    /// The topic to join.
    pub topic: Arc<str>,
    /// The requesting shard (where `Joined` goes).
    pub shard: u16,
    /// The connection subscribing.
    pub conn: ConnId,
    /// The subscribe request this belongs to (per requesting shard).
    pub request: u64,
    /// Register the requesting shard's interest.
    pub interest: bool,
    /// Replay from this position: the client's epoch (if it parsed) and inclusive last offset.
    pub recover: Option<(Option<u32>, u64)>,
    /// Count a presence member: user id and data (JSON).
    pub presence: Option<(Box<str>, Bytes)>,
    /// With `presence`, the connection as a Centrifuge client shows in the topic's member list
    /// (its connection and subscription info); `None`: the user alone, with no info.
    pub client: Option<Box<ClientInfo>>,
    /// Count a queue-group member: the group, and the requesting shard's members of it now
    /// (absolute, see [`crate::queue_groups`]).
    pub queue_group: Option<(Arc<str>, u32)>,
}

/// See [`FabricMsg::Joined`].
#[derive(Debug)]
pub struct JoinReply {
    /// The topic joined.
    pub topic: Arc<str>,
    /// The connection that subscribed.
    pub conn: ConnId,
    /// The request id from the [`JoinRequest`].
    pub request: u64,
    /// This reply confirms the shard's interest.
    pub interest: bool,
    /// Where the replay started and whether it covered the gap, when recovery was asked for.
    pub recovery: Option<RecoveryInfo>,
    /// The replayed frames, concatenated.
    pub frames: Bytes,
    /// The presence or queue-group join was refused (`PRESENCE_LIMIT`, `QUEUE_GROUP_LIMIT`):
    /// the subscription of this topic fails.
    pub refused: Option<ErrorCode>,
    /// The queue group the request joined, if any (a refusal concerns only a connection still in
    /// it).
    pub queue_group: Option<Arc<str>>,
    /// The join made the user a presence member: user id and the `presence_join` event's
    /// payload, which the connection's shard reports (after the connection's `connect`).
    pub presence_joined: Option<(Box<str>, Bytes)>,
}

/// See [`FabricMsg::History`].
#[derive(Debug)]
pub struct HistoryRequest {
    /// The topic.
    pub topic: Arc<str>,
    /// The connection asking.
    pub conn: ConnId,
    /// The connection's id for the request, returned in the answer.
    pub request: u64,
    /// Only publications after this offset; `None`: from the oldest the ring holds.
    pub after: Option<u64>,
    /// Most publications to return.
    pub limit: usize,
    /// The newest `limit` rather than the oldest.
    pub reverse: bool,
    /// Only the newest `keep` publications count as the topic's history.
    pub keep: usize,
}

/// See [`FabricMsg::HistoryRead`].
#[derive(Debug)]
pub struct HistoryReply {
    /// The connection that asked.
    pub conn: ConnId,
    /// The request's id.
    pub request: u64,
    /// What was read; `None` when recovery is off.
    pub read: Option<crate::recovery::HistoryRead>,
}

/// See [`FabricMsg::Presence`].
#[derive(Debug)]
pub struct PresenceRequest {
    /// The topic.
    pub topic: Arc<str>,
    /// The connection asking.
    pub conn: ConnId,
    /// The connection's id for the request, returned in the answer.
    pub request: u64,
    /// List the members' connections too (else only count them).
    pub list: bool,
}

/// See [`FabricMsg::JoinLeave`].
#[derive(Debug)]
pub struct JoinLeave {
    /// The topic.
    pub topic: Arc<str>,
    /// Joined (else left).
    pub joined: bool,
    /// The member connection.
    pub client: ClientInfo,
}

/// See [`FabricMsg::PresenceRead`].
#[derive(Debug)]
pub struct PresenceReply {
    /// The connection that asked.
    pub conn: ConnId,
    /// The request's id.
    pub request: u64,
    /// Distinct users present in the topic.
    pub users: u32,
    /// Their connections subscribed to the topic, on every shard.
    pub connections: u32,
    /// Each of those connections, when the request asked for the list.
    pub clients: Vec<ClientInfo>,
}

/// See [`FabricMsg::PresenceLeft`].
#[derive(Debug)]
pub struct PresenceLeft {
    /// The connection whose `Leave` this answers.
    pub conn: ConnId,
    /// The user's departure from the topic's presence: user id and the event's payload
    /// (`{"topic","user_id","data"}`); `None` when other connections keep the user a member.
    pub left: Option<(Box<str>, Bytes)>,
}

/// See [`FabricMsg::PresenceUpdate`].
#[derive(Debug)]
pub struct PresenceUpdate {
    /// The topic whose presence changes.
    pub topic: Arc<str>,
    /// The member whose data changes.
    pub user: Box<str>,
    /// The new data, JSON text.
    pub data: Bytes,
}

/// A question for a topic's owner.
#[derive(Debug)]
pub enum QueryKind {
    /// The topic's presence members.
    Presence {
        /// The topic asked about.
        topic: Arc<str>,
    },
    /// The topic's presence totals.
    PresenceStats {
        /// The topic asked about.
        topic: Arc<str>,
    },
    /// The connections of the topic's presence members (Centrifugo's `presence`).
    PresenceClients {
        /// The topic asked about.
        topic: Arc<str>,
    },
    /// A read of the topic's history, as a connection's [`FabricMsg::History`] asks it
    /// (Centrifugo's server API `history`).
    History {
        /// The topic asked about.
        topic: Arc<str>,
        /// Only publications after this offset; `None`: from the oldest the ring holds.
        after: Option<u64>,
        /// Most publications to return.
        limit: usize,
        /// The newest `limit` rather than the oldest.
        reverse: bool,
        /// Only the newest `keep` publications count as the topic's history.
        keep: usize,
    },
    /// Forget the publications of the topic's history, keeping its position (Centrifugo's
    /// `history_remove`).
    HistoryRemove {
        /// The topic whose history goes.
        topic: Arc<str>,
    },
}

/// An answer from a topic's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryAnswer {
    /// (user id, connections, data JSON) per member.
    Presence(Vec<(String, u32, String)>),
    /// (users, connections).
    PresenceStats(usize, u64),
    /// Presence is off on this server.
    PresenceDisabled,
    /// Per connection of a presence member, as Centrifuge lists it.
    Clients(Vec<ClientInfo>),
    /// The history read (see [`QueryKind::History`]).
    History(crate::recovery::HistoryRead),
    /// The history's publications are gone (see [`QueryKind::HistoryRemove`]).
    HistoryRemoved,
    /// Recovery is off on this server: there is no history.
    HistoryDisabled,
}

/// See [`FabricMsg::Query`].
#[derive(Debug)]
pub struct Query {
    /// What is asked.
    pub kind: QueryKind,
    /// Where the owner puts the answer.
    pub reply: Arc<ReplySlot<QueryAnswer>>,
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

impl Reload {
    /// Shard `shard` runs with the new configuration from now on.
    pub fn confirm(&self, shard: usize) {
        // An error means the reloader stopped waiting; the new configuration applies regardless.
        let _ = self.applied.send(shard);
    }
}

// Every queue slot is this size: one cache line, which the fabric's memory plan counts per
// entry (`fabric_plan::SLOT_BYTES`; change both together).
const _: () = assert!(std::mem::size_of::<FabricMsg>() == SLOT_BYTES);

impl FabricMsg {
    /// The bytes this entry keeps alive while in flight, as charged against its sender's budget:
    /// its slot, the buffers it refers to, and the box it points to. Computed the same on both
    /// ends (the receiver credits back what the sender charged), so it reads only what neither
    /// end changes.
    pub fn charge(&self) -> u64 {
        use std::mem::size_of;
        let heap = match self {
            FabricMsg::Publish { topic, body, .. }
            | FabricMsg::PublishLocal { topic, body }
            | FabricMsg::ClusterPublish { topic, body } => topic.len() + body.len(),
            FabricMsg::ClusterInterest { topic, group, .. }
            | FabricMsg::ClusterInterestAcked { topic, group, .. } => {
                topic.len() + group.as_ref().map_or(0, |g| g.len())
            }
            FabricMsg::PublishGroup { group, body } => {
                size_of::<(Arc<str>, Arc<str>)>() + group.0.len() + group.1.len() + body.len()
            }
            FabricMsg::Deliver { topic, frame } => topic.len() + frame.len(),
            FabricMsg::DeliverGroup { frame, .. } => frame.len(),
            FabricMsg::PublishAcked { .. } | FabricMsg::Reload(_) | FabricMsg::Adopt { .. } => 0,
            FabricMsg::Join(j) => {
                size_of::<JoinRequest>()
                    + j.topic.len()
                    + j.presence.as_ref().map_or(0, |(u, d)| u.len() + d.len())
                    + j.client.as_deref().map_or(0, client_info_size)
            }
            FabricMsg::Joined(j) => size_of::<JoinReply>() + j.frames.len(),
            FabricMsg::History(h) => size_of::<HistoryRequest>() + h.topic.len(),
            FabricMsg::HistoryRead(h) => {
                size_of::<HistoryReply>() + h.read.as_ref().map_or(0, |r| r.frames.len())
            }
            FabricMsg::Presence(p) => size_of::<PresenceRequest>() + p.topic.len(),
            FabricMsg::JoinLeave(j) => size_of::<JoinLeave>() + client_info_size(&j.client),
            FabricMsg::PresenceRead(p) => {
                size_of::<PresenceReply>() + p.clients.iter().map(client_info_size).sum::<usize>()
            }
            FabricMsg::Leave { user, .. } => user.as_ref().map_or(0, |u| u.len()),
            FabricMsg::PresenceLeft(p) => {
                size_of::<PresenceLeft>() + p.left.as_ref().map_or(0, |(u, e)| u.len() + e.len())
            }
            FabricMsg::PresenceUpdate(u) => {
                size_of::<PresenceUpdate>() + u.user.len() + u.data.len()
            }
            FabricMsg::Query(_) => size_of::<Query>(),
            FabricMsg::Command(c) => {
                size_of::<Command>()
                    + match &**c {
                        Command::Send { payload, .. } | Command::SendUser { payload, .. } => {
                            match payload {
                                Payload::Text(b) | Payload::Binary(b) => b.len(),
                                Payload::Event(_) => 0,
                            }
                        }
                        Command::UpdatePresence { data, .. } => data.len(),
                        Command::RpcReply { result, .. } => match result {
                            Ok(data) => data.len(),
                            Err(e) => e.message.len(),
                        },
                        _ => 0,
                    }
            }
        };
        (SLOT_BYTES + heap) as u64
    }
}

/// The wakers of every participant, set once each participant's runtime exists.
#[derive(Debug)]
pub struct Doorbells {
    slots: Vec<OnceLock<Waker>>,
}

impl Doorbells {
    /// One doorbell slot per participant, each empty until its runtime registers.
    pub fn new(participants: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: (0..participants).map(|_| OnceLock::new()).collect(),
        })
    }
    /// Registers participant `id`'s waker. Set once.
    pub fn register(&self, id: usize, waker: Waker) {
        let _ = self.slots[id].set(waker);
    }
    /// Wakes participant `id`'s runtime (a syscall only if it is parked); a no-op before it registers.
    pub fn ring(&self, id: usize) {
        if let Some(w) = self.slots[id].get() {
            w.wake_by_ref();
        }
    }
    /// Whether participant `id` has registered its waker (its runtime has started).
    pub fn is_registered(&self, id: usize) -> bool {
        self.slots[id].get().is_some()
    }
}

/// Bytes a receiver has taken from one sender, ever (wrapping): written by the receiver once per
/// receive, read by the sender once per flush. On a cache line of its own, so that the two ends
/// of one pair never share a line with another pair's.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Taken(AtomicU64);

/// Overflow slots kept allocated once a destination's overflow is empty again; past this the
/// deque is freed.
const OVERFLOW_KEEP: usize = 64;

/// One destination as seen by a sender.
struct Outbox {
    queue: rtrb::Producer<FabricMsg>,
    /// Entries that did not fit in `queue`; moved over in order before anything newer. Bounded
    /// by the sender's `inflight_max` bytes.
    overflow: VecDeque<FabricMsg>,
    /// Something was pushed since the last doorbell.
    rung: bool,
    /// Charges of everything sent to this destination, ever (wrapping).
    sent: u64,
    /// `taken` as last read.
    taken_seen: u64,
    taken: Arc<Taken>,
}

/// One source as seen by a receiver.
struct Inbox {
    queue: rtrb::Consumer<FabricMsg>,
    /// Charges of everything taken from this source, ever (wrapping); published to `taken`.
    taken_total: u64,
    taken: Arc<Taken>,
}

/// One participant's ends of the grid.
pub struct Endpoint {
    me: usize,
    outboxes: Vec<Option<Outbox>>,
    inboxes: Vec<Option<Inbox>>,
    doorbells: Arc<Doorbells>,
    /// Bytes this participant may have in flight (see the module docs).
    inflight_max: u64,
    /// Bytes in flight as of the last look at the receivers' counts: never less than the truth.
    inflight: u64,
    /// `send` has looked at the receivers' counts since the last flush.
    settled: bool,
}

/// Builds the full grid: `participants` endpoints, a queue of `capacity` entries for every
/// ordered pair, and at most `inflight_max` bytes in flight per sender ([`Plan`](crate::fabric_plan::Plan) works these out
/// from a budget).
pub fn grid(participants: usize, capacity: usize, inflight_max: u64) -> Vec<Endpoint> {
    let doorbells = Doorbells::new(participants);
    let mut eps: Vec<Endpoint> = (0..participants)
        .map(|me| Endpoint {
            me,
            outboxes: (0..participants).map(|_| None).collect(),
            inboxes: (0..participants).map(|_| None).collect(),
            doorbells: doorbells.clone(),
            inflight_max,
            inflight: 0,
            settled: false,
        })
        .collect();
    for from in 0..participants {
        for to in 0..participants {
            if from == to {
                continue;
            }
            // Allocated, not touched: pages become resident as traffic fills the queue.
            let (p, c) = rtrb::RingBuffer::new(capacity);
            let taken = Arc::new(Taken::default());
            eps[from].outboxes[to] = Some(Outbox {
                queue: p,
                overflow: VecDeque::new(),
                rung: false,
                sent: 0,
                taken_seen: 0,
                taken: taken.clone(),
            });
            eps[to].inboxes[from] = Some(Inbox {
                queue: c,
                taken_total: 0,
                taken,
            });
        }
    }
    eps
}

/// What [`Endpoint::send`] did with an entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// In the ring, or in the overflow deque behind it.
    Queued,
    /// Dropped: the sender has its budget of bytes in flight.
    Dropped,
}

impl Endpoint {
    /// This participant's index in the grid.
    pub fn id(&self) -> usize {
        self.me
    }

    /// Every participant's doorbell, to wake a destination after sending.
    pub fn doorbells(&self) -> &Arc<Doorbells> {
        &self.doorbells
    }

    /// Queues `msg` for `to`. Never blocks; see the module docs for the overflow policy.
    ///
    /// # Panics
    /// When sending to itself: local work never goes through the fabric.
    pub fn send(&mut self, to: usize, msg: FabricMsg) -> Sent {
        assert!(to != self.me, "no queue to self");
        let charge = msg.charge();
        if !self.fits(charge) {
            // The receivers may have taken more since the last flush: look before dropping,
            // once per turn.
            if !self.settled {
                self.settle();
                self.settled = true;
            }
            if !self.fits(charge) {
                return Sent::Dropped;
            }
        }
        self.inflight += charge;
        let out = self.outboxes[to].as_mut().expect("no queue to self");
        out.sent = out.sent.wrapping_add(charge);
        out.rung = true;
        if out.overflow.is_empty() {
            match out.queue.push(msg) {
                Ok(()) => return Sent::Queued,
                Err(rtrb::PushError::Full(m)) => {
                    out.overflow.push_back(m);
                    return Sent::Queued;
                }
            }
        }
        out.overflow.push_back(msg);
        Sent::Queued
    }

    /// An entry of `charge` bytes may be sent: it fits the budget, or nothing is in flight.
    fn fits(&self, charge: u64) -> bool {
        self.inflight == 0 || self.inflight + charge <= self.inflight_max
    }

    /// Reads what each receiver has taken since the last look and takes it off `inflight`.
    fn settle(&mut self) {
        for out in self.outboxes.iter_mut().flatten() {
            if out.sent == out.taken_seen {
                continue; // nothing in flight to this one: no need to read its line
            }
            let taken = out.taken.0.load(Ordering::Acquire);
            let freed = taken.wrapping_sub(out.taken_seen);
            out.taken_seen = taken;
            assert!(freed <= self.inflight, "a receiver took more than was sent");
            self.inflight -= freed;
        }
    }

    /// Moves held-back entries into their queues and rings the doorbells of destinations that
    /// received anything since the last flush. Returns the entries still held back.
    pub fn flush(&mut self) -> usize {
        self.settle();
        self.settled = false;
        let mut held = 0;
        for (to, out) in self.outboxes.iter_mut().enumerate() {
            let Some(out) = out else { continue };
            while let Some(m) = out.overflow.pop_front() {
                if let Err(rtrb::PushError::Full(m)) = out.queue.push(m) {
                    out.overflow.push_front(m);
                    break;
                }
            }
            if out.overflow.is_empty() && out.overflow.capacity() > OVERFLOW_KEEP {
                // A burst is over: give its memory back rather than keep it for the next.
                out.overflow = VecDeque::new();
            }
            held += out.overflow.len();
            if out.rung {
                out.rung = false;
                self.doorbells.ring(to);
            }
        }
        held
    }

    /// Hands every queued inbound entry to `f`, at most `per_source` from each sender so one busy
    /// sender cannot starve the others within a turn. Returns how many were handled.
    pub fn receive(&mut self, per_source: usize, mut f: impl FnMut(usize, FabricMsg)) -> usize {
        let mut n = 0;
        for (from, inbox) in self.inboxes.iter_mut().enumerate() {
            let Some(inbox) = inbox else { continue };
            let ready = inbox.queue.slots().min(per_source);
            if ready == 0 {
                continue;
            }
            let Ok(chunk) = inbox.queue.read_chunk(ready) else {
                continue;
            };
            let mut taken = 0u64;
            for m in chunk {
                taken += m.charge();
                f(from, m);
            }
            inbox.taken_total = inbox.taken_total.wrapping_add(taken);
            inbox.taken.0.store(inbox.taken_total, Ordering::Release);
            n += ready;
        }
        n
    }

    /// Entries waiting in this participant's inbound queues.
    pub fn inbound_depth(&self) -> usize {
        self.inboxes.iter().flatten().map(|c| c.queue.slots()).sum()
    }

    /// Bytes this participant has in flight, as of its last flush (or later look).
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight
    }

    /// Entries held back for full destination queues.
    pub fn overflow_depth(&self) -> usize {
        self.outboxes
            .iter()
            .flatten()
            .map(|o| o.overflow.len())
            .sum()
    }
}

/// Bytes a member's client info holds on the heap (for the fabric's charge).
fn client_info_size(c: &ClientInfo) -> usize {
    std::mem::size_of::<ClientInfo>()
        + c.user.len()
        + c.client.len()
        + c.conn_info.len()
        + c.chan_info.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric_plan::QUEUE_CAPACITY_MIN;

    fn deliver(n: u8) -> FabricMsg {
        FabricMsg::Deliver {
            topic: Arc::from("t"),
            frame: Bytes::from(vec![n]),
        }
    }

    #[test]
    fn fifo_per_pair_through_overflow() {
        let mut eps = grid(2, 2, u64::MAX);
        let (a, b) = eps.split_at_mut(1);
        let (a, b) = (&mut a[0], &mut b[0]);
        for i in 0..6 {
            assert_eq!(a.send(1, deliver(i)), Sent::Queued);
        }
        // 2 in the queue, 4 held back.
        assert_eq!(a.overflow_depth(), 4);
        let mut got = Vec::new();
        for _ in 0..3 {
            b.receive(usize::MAX, |from, m| {
                assert_eq!(from, 0);
                if let FabricMsg::Deliver { frame, .. } = m {
                    got.push(frame[0]);
                }
            });
            a.flush();
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(a.overflow_depth(), 0);
        assert_eq!(a.inflight_bytes(), 0);
    }

    #[test]
    fn bytes_in_flight_are_bounded_queue_and_overflow_alike() {
        let charge = deliver(0).charge();
        assert_eq!(charge, (SLOT_BYTES + 2) as u64);
        // Room for three entries in flight; the queue holds two of them.
        let mut eps = grid(3, 2, 3 * charge);
        let [a, b, c] = &mut eps[..] else {
            unreachable!()
        };
        assert_eq!(a.send(1, deliver(0)), Sent::Queued);
        assert_eq!(a.send(1, deliver(1)), Sent::Queued);
        assert_eq!(a.send(1, deliver(2)), Sent::Queued); // overflow
        assert_eq!(a.overflow_depth(), 1);
        // The receiver takes two; the sender sees it without a flush, when it needs the room.
        assert_eq!(b.receive(usize::MAX, |_, _| {}), 2);
        assert_eq!(a.inflight_bytes(), 3 * charge);
        assert_eq!(a.send(2, deliver(3)), Sent::Queued);
        assert_eq!(a.inflight_bytes(), 2 * charge);
        assert_eq!(a.send(1, deliver(4)), Sent::Queued); // overflow, behind 2
        // Full, and the budget is the sender's, whatever the destination. It looks again at
        // most once per turn (a flush), so a sender over its budget does not read every
        // receiver's count for each entry it drops.
        assert_eq!(a.send(2, deliver(5)), Sent::Dropped);
        assert_eq!(c.receive(usize::MAX, |_, _| {}), 1);
        assert_eq!(a.send(2, deliver(5)), Sent::Dropped);
        assert_eq!(a.inflight_bytes(), 3 * charge);
        a.flush();
        assert_eq!(a.inflight_bytes(), 2 * charge);
        assert_eq!(b.receive(usize::MAX, |_, _| {}), 2);
        a.flush();
        assert_eq!(a.inflight_bytes(), 0);
        assert_eq!(a.overflow_depth(), 0);
    }

    #[test]
    fn an_entry_over_the_budget_goes_alone() {
        let mut eps = grid(2, 4, 100);
        let big = |n: usize| FabricMsg::Deliver {
            topic: Arc::from("t"),
            frame: Bytes::from(vec![0; n]),
        };
        assert_eq!(eps[0].send(1, big(1000)), Sent::Queued);
        assert_eq!(eps[0].send(1, deliver(1)), Sent::Dropped);
        eps[1].receive(usize::MAX, |_, _| {});
        eps[0].flush();
        assert_eq!(eps[0].send(1, deliver(1)), Sent::Queued);
        assert_eq!(eps[0].send(1, big(1000)), Sent::Dropped);
    }

    #[test]
    fn overflow_memory_is_given_back_after_a_burst() {
        let mut eps = grid(2, QUEUE_CAPACITY_MIN, u64::MAX);
        for i in 0..10 * QUEUE_CAPACITY_MIN {
            eps[0].send(1, deliver(i as u8));
        }
        while eps[0].flush() > 0 {
            eps[1].receive(usize::MAX, |_, _| {});
        }
        let out = eps[0].outboxes[1].as_ref().unwrap();
        assert!(out.overflow.capacity() <= OVERFLOW_KEEP);
    }

    #[test]
    fn per_source_bound() {
        let mut eps = grid(3, 16, u64::MAX);
        for i in 0..5 {
            eps[0].send(2, deliver(i));
            eps[1].send(2, deliver(i));
        }
        assert_eq!(eps[2].receive(2, |_, _| {}), 4);
        assert_eq!(eps[2].inbound_depth(), 6);
    }
}
