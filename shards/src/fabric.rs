//! The cross-core fabric: an N×N grid of single-producer single-consumer queues between
//! participants (every shard, the control plane, and a reserved slot for the cluster core).
//!
//! Owns: the queues, the per-destination overflow that keeps a sender from ever blocking, and the
//! doorbells. Never: interprets messages (the shard does).
//!
//! Sending: [`Endpoint::send`] appends to the destination's queue, or to a local overflow deque
//! when the queue is full (and past `overflow_max`, drops and counts). [`Endpoint::flush`], once
//! per loop turn, moves overflow into the queues and rings the doorbell of each destination that
//! got something this turn: a doorbell is the destination runtime's waker, which only makes a
//! syscall when that runtime is parked, so a busy peer costs one atomic per turn.
//!
//! Ordering: FIFO per ordered pair of participants; nothing across pairs.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};
use std::task::Waker;

use bytes::Bytes;

use crate::command::Command;
use crate::conn::ConnId;
use crate::protocol::RecoveryInfo;
use crate::queue_groups::GroupName;
use crate::shard::Reload;

/// Cross-core traffic: one enum, every variant says who sends it, who receives it, and what
/// losing it costs.
#[derive(Debug)]
pub enum FabricMsg {
    /// Publisher's shard (or the control plane) → the topic's owner shard: a publication to
    /// sequence and fan out. `body` is the JSON frame text without recovery stamps. `ack` names
    /// the connection waiting for a `publish_ack`. Lost: the publication never happens.
    Publish {
        topic: Arc<str>,
        body: Bytes,
        ack: Option<ConnId>,
    },
    /// Owner → a shard with plain subscribers: a sequenced publication, framed once. Lost: those
    /// subscribers miss one message (counted as a drop).
    Deliver { topic: Arc<str>, frame: Bytes },
    /// Owner → the shard it picked for one queue group of the topic: a sequenced publication
    /// (without recovery stamps) for ONE local member of `group`, picked there. Lost: the group
    /// misses one message (counted as a drop; groups are at most once).
    DeliverGroup { group: Arc<GroupName>, frame: Bytes },
    /// Owner → the publisher's shard: the publication `offset` of `topic` was sequenced (in
    /// history `epoch` when recovery is on); send the `publish_ack` to `conn`. Lost: the client
    /// waits for an ack that never comes.
    PublishAcked {
        conn: ConnId,
        topic: Arc<str>,
        offset: u64,
        epoch: Option<u32>,
    },
    /// A shard → the topic's owner: a connection subscribes and needs the owner — to register
    /// the shard's interest (its first local plain subscriber), to replay history, to count a
    /// presence member or a queue-group member. Answered with `Joined`. Lost: the
    /// acknowledgement never comes.
    Join(Box<JoinRequest>),
    /// Owner → the shard that sent `Join`. Publications sequenced after it reach that shard;
    /// the replayed frames precede them. Lost: the acknowledgement never comes, and the
    /// connection skips the topic's live frames.
    Joined(Box<JoinReply>),
    /// A shard → the topic's owner: connection `conn` (of the sending shard) left the topic (or
    /// changed the kind of its subscription); `interest_off` when it was the shard's last plain
    /// subscriber, `user` when it leaves presence (answered with `PresenceLeft`), `group` when it
    /// left a queue group, of which the shard has `group_members` left. Lost: the owner keeps
    /// sending to the shard (which discards or gives the publication to another member), or a
    /// presence member stays.
    Leave {
        topic: Arc<str>,
        conn: ConnId,
        interest_off: bool,
        group_members: u32,
        user: Option<Box<str>>,
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
    Adopt { fd: OwnedFd },
}

/// See [`FabricMsg::Join`].
#[derive(Debug)]
pub struct JoinRequest {
    pub topic: Arc<str>,
    pub shard: u16,
    pub conn: ConnId,
    /// The subscribe request this belongs to (per requesting shard).
    pub request: u64,
    /// Register the requesting shard's interest.
    pub interest: bool,
    /// Replay from this position: the client's epoch (if it parsed) and inclusive last offset.
    pub recover: Option<(Option<u32>, u64)>,
    /// Count a presence member: user id and data (JSON).
    pub presence: Option<(Box<str>, Bytes)>,
    /// Count a queue-group member: the group, and the requesting shard's members of it now
    /// (absolute, see [`crate::queue_groups`]).
    pub queue_group: Option<(Arc<str>, u32)>,
}

/// See [`FabricMsg::Joined`].
#[derive(Debug)]
pub struct JoinReply {
    pub topic: Arc<str>,
    pub conn: ConnId,
    pub request: u64,
    /// This reply confirms the shard's interest.
    pub interest: bool,
    pub recovery: Option<RecoveryInfo>,
    /// The replayed frames, concatenated.
    pub frames: Bytes,
    /// The presence or queue-group join was refused (`PRESENCE_LIMIT`, `QUEUE_GROUP_LIMIT`):
    /// the subscription of this topic fails.
    pub refused: Option<&'static str>,
    /// The queue group the request joined, if any (a refusal concerns only a connection still in
    /// it).
    pub queue_group: Option<Arc<str>>,
    /// The join made the user a presence member: user id and the `presence_join` event's
    /// payload, which the connection's shard reports (after the connection's `connect`).
    pub presence_joined: Option<(Box<str>, Bytes)>,
}

/// See [`FabricMsg::PresenceLeft`].
#[derive(Debug)]
pub struct PresenceLeft {
    pub conn: ConnId,
    /// The user's departure from the topic's presence: user id and the event's payload
    /// (`{"topic","user_id","data"}`); `None` when other connections keep the user a member.
    pub left: Option<(Box<str>, Bytes)>,
}

/// See [`FabricMsg::PresenceUpdate`].
#[derive(Debug)]
pub struct PresenceUpdate {
    pub topic: Arc<str>,
    pub user: Box<str>,
    pub data: Bytes,
}

/// A question for a topic's owner.
#[derive(Debug)]
pub enum QueryKind {
    /// The topic's presence members.
    Presence { topic: Arc<str> },
    /// The topic's presence totals.
    PresenceStats { topic: Arc<str> },
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
}

/// See [`FabricMsg::Query`].
#[derive(Debug)]
pub struct Query {
    pub kind: QueryKind,
    pub reply: Arc<ReplySlot<QueryAnswer>>,
}

/// A one-shot answer: filled once by a shard, awaited by whoever asked (any runtime).
#[derive(Debug)]
pub struct ReplySlot<T> {
    state: std::sync::Mutex<(Option<T>, Option<Waker>)>,
}

impl<T> ReplySlot<T> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: std::sync::Mutex::new((None, None)),
        })
    }

    /// Fills the slot and wakes the asker.
    pub fn complete(&self, value: T) {
        let waker = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0 = Some(value);
            s.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The answer, once it is there.
    pub fn wait(self: Arc<Self>) -> ReplyFuture<T> {
        ReplyFuture(self)
    }
}

/// The answering end of a one-shot reply, carried inside a command. Sending consumes it;
/// dropping it unsent (a shard that stops with the command still queued, a command it could not
/// handle) answers `None`, so an asker never waits for a reply that cannot come.
#[derive(Debug)]
pub struct Responder<T> {
    slot: Option<Arc<ReplySlot<Option<T>>>>,
}

impl<T> Responder<T> {
    /// A responder and the future its answer resolves (`None`: dropped unanswered).
    pub fn pair() -> (Responder<T>, ReplyFuture<Option<T>>) {
        let slot = ReplySlot::new();
        let fut = slot.clone().wait();
        (Responder { slot: Some(slot) }, fut)
    }

    /// Answers and wakes the asker.
    pub fn send(mut self, value: T) {
        if let Some(slot) = self.slot.take() {
            slot.complete(Some(value));
        }
    }
}

impl<T> Drop for Responder<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.complete(None);
        }
    }
}

/// Resolves when the shard answered.
#[derive(Debug)]
pub struct ReplyFuture<T>(Arc<ReplySlot<T>>);

impl<T> std::future::Future for ReplyFuture<T> {
    type Output = T;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.0.take() {
            Some(v) => std::task::Poll::Ready(v),
            None => {
                s.1 = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    }
}

// Every queue slot is this size; keep it within one cache line.
const _: () = assert!(std::mem::size_of::<FabricMsg>() <= 64);

/// The wakers of every participant, set once each participant's runtime exists.
#[derive(Debug)]
pub struct Doorbells {
    slots: Vec<OnceLock<Waker>>,
}

impl Doorbells {
    pub fn new(participants: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: (0..participants).map(|_| OnceLock::new()).collect(),
        })
    }
    /// Registers participant `id`'s waker. Set once.
    pub fn register(&self, id: usize, waker: Waker) {
        let _ = self.slots[id].set(waker);
    }
    pub fn ring(&self, id: usize) {
        if let Some(w) = self.slots[id].get() {
            w.wake_by_ref();
        }
    }
    pub fn is_registered(&self, id: usize) -> bool {
        self.slots[id].get().is_some()
    }
}

/// One destination as seen by a sender.
struct Outbox {
    queue: rtrb::Producer<FabricMsg>,
    /// Entries that did not fit in `queue`; moved over in order before anything newer.
    overflow: VecDeque<FabricMsg>,
    /// Something was pushed since the last doorbell.
    rung: bool,
}

/// One participant's ends of the grid.
pub struct Endpoint {
    me: usize,
    outboxes: Vec<Option<Outbox>>,
    inboxes: Vec<Option<rtrb::Consumer<FabricMsg>>>,
    doorbells: Arc<Doorbells>,
    overflow_max: usize,
}

/// Builds the full grid: `participants` endpoints, a queue for every ordered pair.
pub fn grid(participants: usize, capacity: usize, overflow_max: usize) -> Vec<Endpoint> {
    let doorbells = Doorbells::new(participants);
    let mut eps: Vec<Endpoint> = (0..participants)
        .map(|me| Endpoint {
            me,
            outboxes: (0..participants).map(|_| None).collect(),
            inboxes: (0..participants).map(|_| None).collect(),
            doorbells: doorbells.clone(),
            overflow_max,
        })
        .collect();
    for from in 0..participants {
        for to in 0..participants {
            if from == to {
                continue;
            }
            let (p, c) = rtrb::RingBuffer::new(capacity);
            eps[from].outboxes[to] = Some(Outbox {
                queue: p,
                overflow: VecDeque::new(),
                rung: false,
            });
            eps[to].inboxes[from] = Some(c);
        }
    }
    eps
}

/// What [`Endpoint::send`] did with an entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// Dropped: the destination's overflow is full.
    Dropped,
}

impl Endpoint {
    pub fn id(&self) -> usize {
        self.me
    }

    pub fn doorbells(&self) -> &Arc<Doorbells> {
        &self.doorbells
    }

    /// Queues `msg` for `to`. Never blocks; see the module docs for the overflow policy.
    ///
    /// # Panics
    /// When sending to itself: local work never goes through the fabric.
    pub fn send(&mut self, to: usize, msg: FabricMsg) -> Sent {
        let max = self.overflow_max;
        let out = self.outboxes[to].as_mut().expect("no queue to self");
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
        if out.overflow.len() >= max {
            return Sent::Dropped;
        }
        out.overflow.push_back(msg);
        Sent::Queued
    }

    /// Moves held-back entries into their queues and rings the doorbells of destinations that
    /// received anything since the last flush. Returns the entries still held back.
    pub fn flush(&mut self) -> usize {
        let mut held = 0;
        for (to, out) in self.outboxes.iter_mut().enumerate() {
            let Some(out) = out else { continue };
            while let Some(m) = out.overflow.pop_front() {
                if let Err(rtrb::PushError::Full(m)) = out.queue.push(m) {
                    out.overflow.push_front(m);
                    break;
                }
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
            let ready = inbox.slots().min(per_source);
            if ready == 0 {
                continue;
            }
            let Ok(chunk) = inbox.read_chunk(ready) else {
                continue;
            };
            for m in chunk {
                f(from, m);
            }
            n += ready;
        }
        n
    }

    /// Entries waiting in this participant's inbound queues.
    pub fn inbound_depth(&self) -> usize {
        self.inboxes.iter().flatten().map(|c| c.slots()).sum()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(n: u8) -> FabricMsg {
        FabricMsg::Deliver {
            topic: Arc::from("t"),
            frame: Bytes::from(vec![n]),
        }
    }

    #[test]
    fn fifo_per_pair_with_overflow_and_drop() {
        let mut eps = grid(2, 2, 3);
        let (a, b) = eps.split_at_mut(1);
        let (a, b) = (&mut a[0], &mut b[0]);
        let results: Vec<Sent> = (0..6).map(|i| a.send(1, deliver(i))).collect();
        // 2 in the queue, 3 held back, the 6th dropped.
        assert_eq!(results.iter().filter(|r| **r == Sent::Dropped).count(), 1);
        assert_eq!(a.overflow_depth(), 3);
        let mut got = Vec::new();
        let collect = |got: &mut Vec<u8>, b: &mut Endpoint| {
            b.receive(usize::MAX, |from, m| {
                assert_eq!(from, 0);
                if let FabricMsg::Deliver { frame, .. } = m {
                    got.push(frame[0]);
                }
            })
        };
        collect(&mut got, b);
        a.flush();
        collect(&mut got, b);
        a.flush();
        collect(&mut got, b);
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert_eq!(a.overflow_depth(), 0);
    }

    #[test]
    fn per_source_bound() {
        let mut eps = grid(3, 16, 16);
        for i in 0..5 {
            eps[0].send(2, deliver(i));
            eps[1].send(2, deliver(i));
        }
        assert_eq!(eps[2].receive(2, |_, _| {}), 4);
        assert_eq!(eps[2].inbound_depth(), 6);
    }
}
