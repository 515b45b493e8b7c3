//! The subscriber's side: applying a connection's subscribe and unsubscribe requests to the
//! shard's topic table, asking topic owners for what only they can give (interest, replay,
//! presence), and acknowledging once every answer is in.
//!
//! Invariant: a connection is in a topic's local subscriber set iff the topic is in its
//! session's subscription list; both change together here, and nowhere else.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::{Shard, Transport, send};
use crate::command::{CommandError, SubscribeOutcome};
use crate::conn::ConnKey;
use crate::conn::{ConnId, SessionMut, SubscribeRequest};
use crate::fabric::{FabricMsg, JoinReply, JoinRequest, Sent};
use crate::metrics::DropReason;
use crate::protocol::{self, Clock, ErrorCode, FailedTopic};
use crate::reply::Responder;
use crate::topics::Delta;

/// Where an application's subscribe command is answered.
type Reply = Responder<Result<SubscribeOutcome, CommandError>>;

/// A subscribe acknowledgement waiting for the owners of some of its topics.
pub(super) struct PendingAck {
    conn: ConnId,
    /// Where the outcome goes when the application asked (else to the client, as a frame).
    reply: Option<Responder<Result<SubscribeOutcome, CommandError>>>,
    /// Owner replies (or interest confirmations) still awaited.
    remaining: u32,
    succeeded: Vec<String>,
    failed: Vec<protocol::FailedTopic>,
    recovery: Vec<(String, protocol::RecoveryInfo)>,
}

/// The subscribe acknowledgements a shard waits to send, by request id.
#[derive(Default)]
pub(super) struct PendingAcks {
    by_request: HashMap<u64, PendingAck>,
    /// The id of the next subscribe request.
    next: u64,
}

impl PendingAcks {
    /// A fresh request id.
    fn next_request(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        id
    }
}

impl<T: Transport> Shard<T> {
    /// A connection asks to subscribe. Each topic is added to the local table at once; the
    /// acknowledgement goes out when the owners of the topics that need them have answered.
    /// `reply` is set when the application asked: the outcome goes there instead of an
    /// acknowledgement frame to the client.
    pub(super) fn subscribe(
        &mut self,
        key: ConnKey,
        req: SubscribeRequest,
        reply: Option<Reply>,
        clock: Clock,
    ) {
        let max = self.run.cfg().limits.max_subscriptions_per_connection;
        let presence_on = self.run.cfg().presence.enabled;
        let Some(slot) = self.conns.get_mut(key as usize) else {
            if let Some(r) = reply {
                r.send(Err(CommandError::UnknownConnection));
            }
            return;
        };
        let conn = slot.conn.id();
        let Some(SessionMut {
            user,
            subs,
            recovering,
        }) = slot.conn.session_mut()
        else {
            // Left since it asked.
            if let Some(r) = reply {
                r.send(Err(CommandError::UnknownConnection));
            }
            return;
        };
        let user: Box<str> = user.into();
        let request = self.acks.next_request();
        let mut ack = PendingAck {
            conn,
            reply,
            remaining: 0,
            succeeded: Vec::new(),
            failed: req.failed,
            recovery: Vec::new(),
        };
        let mut joins = Vec::new();
        // What a subscription replaced (another kind, another group): told to the owner before
        // the join (the fabric is FIFO per pair), so its counts never see both.
        let mut leaves = Vec::new();
        let group = req.queue_group.as_ref();
        for topic in req.topics {
            // Applied here, against the live list, so pipelined requests cannot pass it.
            if subs.len() >= max && !subs.iter().any(|s| **s == *topic) {
                ack.failed.push(FailedTopic {
                    topic,
                    reason: ErrorCode::SubscriptionLimit.as_str().to_owned(),
                });
                continue;
            }
            let (name, delta) = self.topics.subscribe(&topic, key, group);
            if delta.added_or_removed {
                subs.push(name.clone());
            }
            if delta.plain == Some(false) {
                // Now in a queue group: members do not recover (their frames are unstamped).
                recovering.retain(|t| **t != *name);
            }
            let interest = delta.interest == Some(true);
            // One replay in flight per connection and topic: asking again while one is on its way
            // recovers nothing more (the first answers for both).
            let recover = req
                .recover
                .iter()
                .find(|r| r.0 == topic)
                .map(|r| (r.1, r.2))
                .filter(|_| !recovering.contains(&name));
            let presence = (presence_on && delta.plain == Some(true)).then(|| {
                let data = req
                    .presence
                    .clone()
                    .unwrap_or_else(|| Bytes::from_static(b"{}"));
                (user.clone(), data)
            });
            if recover.is_some() {
                recovering.push(name.clone());
            }
            let joined_group = delta.joined_group.clone();
            if delta.interest == Some(false)
                || delta.plain == Some(false)
                || delta.left_group.is_some()
            {
                leaves.push((name.clone(), delta));
            }
            if interest || recover.is_some() || presence.is_some() || joined_group.is_some() {
                ack.remaining += 1;
                let owner = self.topics.owner_of(&topic);
                joins.push((
                    owner,
                    JoinRequest {
                        topic: name,
                        shard: self.me as u16,
                        conn,
                        request,
                        interest,
                        recover,
                        client: presence.as_ref().and(req.client.clone()),
                        presence,
                        queue_group: joined_group,
                    },
                ));
            } else if group.is_none() && self.topics.await_confirmation(&topic, request) {
                // Another connection's request is registering this shard's interest: wait for it.
                ack.remaining += 1;
            }
            ack.succeeded.push(topic);
        }
        for (topic, delta) in leaves {
            self.announce_leave(&topic, conn, &delta, Some(&user), clock);
        }
        if ack.remaining == 0 {
            self.send_ack(key, ack, clock);
            return;
        }
        self.acks.by_request.insert(request, ack);
        for (owner, join) in joins {
            if owner == self.me {
                self.handle_join(join, clock);
            } else {
                // What a refusal needs, kept: the fabric consumes the request even when it drops it.
                let group = join.queue_group.as_ref().map(|(g, _)| g.clone());
                let lost = (join.topic.clone(), join.interest, group);
                if self.fabric.send(owner, FabricMsg::Join(Box::new(join))) == Sent::Dropped {
                    self.metrics.dropped(DropReason::FabricOverflow).inc();
                    let (topic, interest, queue_group) = lost;
                    self.join_lost(conn, request, topic, interest, queue_group, clock);
                }
            }
        }
    }

    /// The fabric dropped the `Join` for `request` (its budget was spent): the owner will never
    /// answer, so the topic fails at once with `SERVER_BUSY` instead of the acknowledgement
    /// waiting for ever. The subscription is undone (the owner never counted it); when the request
    /// carried this shard's interest, the confirmation it awaited is settled here.
    fn join_lost(
        &mut self,
        conn: ConnId,
        request: u64,
        topic: Arc<str>,
        interest: bool,
        queue_group: Option<Arc<str>>,
        clock: Clock,
    ) {
        let mut failed = vec![(conn, request, queue_group)];
        if interest {
            // The drop is seen as the request is sent, before another subscribe could start
            // waiting for this confirmation, so none should wait on it; any that does fails too
            // (the owner does not know this shard is interested: it would receive nothing).
            let waiters = self.topics.confirm(&topic);
            debug_assert!(waiters.is_empty(), "a subscribe waits on a dropped Join");
            for waiter in waiters {
                if let Some(p) = self.acks.by_request.get(&waiter) {
                    failed.push((p.conn, waiter, None));
                }
            }
        }
        for (conn, request, queue_group) in failed {
            let key = conn.key();
            let live = self
                .conns
                .get(key as usize)
                .is_some_and(|s| s.conn.id() == conn);
            // Only the subscription this request made: the connection may have changed it since.
            let still_there = self.topics.get(&topic).is_some_and(|t| match &queue_group {
                None => t.subscribers().contains(&key),
                Some(g) => self.topics.group_of(&topic, key) == Some(g),
            });
            if live && still_there {
                // No presence leave: the owner never counted this connection.
                self.drop_subscription(key, &topic, None, clock);
            }
            if let Some(p) = self.acks.by_request.get_mut(&request) {
                p.succeeded.retain(|t| **t != *topic);
                p.failed.push(FailedTopic {
                    topic: topic.to_string(),
                    reason: ErrorCode::ServerBusy.as_str().to_owned(),
                });
            }
            self.ack_progress(request, clock);
        }
    }

    /// An owner answered a `Join`: confirm interest, queue the replay, count the answer.
    pub(super) fn handle_joined(&mut self, mut r: JoinReply, clock: Clock) {
        if r.interest {
            for waiter in self.topics.confirm(&r.topic) {
                self.ack_progress(waiter, clock);
            }
        }
        let key = r.conn.key();
        if self
            .conns
            .get(key as usize)
            .is_some_and(|s| s.conn.id() == r.conn)
        {
            let still_in_group = r
                .queue_group
                .as_ref()
                .is_none_or(|g| self.topics.group_of(&r.topic, key) == Some(g));
            if let Some((user, payload)) = r.presence_joined.take() {
                self.report_presence_joined(r.conn, &user, payload);
            }
            if r.refused.is_some() && still_in_group {
                // No presence leave: the owner never counted this connection.
                self.drop_subscription(key, &r.topic, None, clock);
            } else if let Some(info) = &mut r.recovery {
                let slot = self.conns.get_mut(key as usize).expect("checked");
                let limits = &self.run.cfg().limits;
                let max_replay = self.run.cfg().recovery.max_replay_bytes;
                let frames = std::mem::take(&mut r.frames);
                if slot.conn.push_replay(
                    &r.topic,
                    frames,
                    limits.max_outbound_queue_bytes,
                    max_replay,
                ) {
                    self.metrics.deliveries_total.add(u64::from(info.count));
                } else {
                    // Over the connection's replay budget: it re-baselines instead.
                    info.recovered = false;
                    info.count = 0;
                    self.metrics.dropped(DropReason::ReplayOverBudget).inc();
                }
                self.mark_dirty(key);
            }
        }
        if let Some(p) = self.acks.by_request.get_mut(&r.request) {
            if let Some(info) = r.recovery {
                p.recovery.push((r.topic.to_string(), info));
            }
            if let Some(reason) = r.refused {
                p.succeeded.retain(|t| **t != *r.topic);
                p.failed.push(FailedTopic {
                    topic: r.topic.to_string(),
                    reason: reason.as_str().to_owned(),
                });
            }
        }
        self.ack_progress(r.request, clock);
    }

    /// One answer for `request` is in; sends the acknowledgement after the last.
    fn ack_progress(&mut self, request: u64, clock: Clock) {
        let Some(p) = self.acks.by_request.get_mut(&request) else {
            return;
        };
        debug_assert!(p.remaining > 0);
        p.remaining -= 1;
        if p.remaining > 0 {
            return;
        }
        let p = self.acks.by_request.remove(&request).expect("present");
        let key = p.conn.key();
        if self
            .conns
            .get(key as usize)
            .is_some_and(|s| s.conn.id() == p.conn)
        {
            self.send_ack(key, p, clock);
        } else if let Some(r) = p.reply {
            r.send(Err(CommandError::UnknownConnection));
        }
    }

    fn send_ack(&mut self, key: ConnKey, p: PendingAck, clock: Clock) {
        if let Some(reply) = p.reply {
            reply.send(Ok(SubscribeOutcome {
                success_topics: p.succeeded,
                failed_topics: p.failed,
                recovery: p.recovery,
            }));
            return;
        }
        self.with_conn(key, clock, |c, cx| {
            c.subscribed(&p.succeeded, &p.failed, &p.recovery, cx);
        });
    }

    /// A connection asks to unsubscribe; answered at once (leaving needs no owner's answer).
    pub(super) fn unsubscribe(&mut self, key: ConnKey, topics: Vec<String>, clock: Clock) {
        let Some(user) = self
            .conns
            .get_mut(key as usize)
            .and_then(|s| s.conn.session_mut())
            .map(|s| Box::<str>::from(s.user))
        else {
            return;
        };
        for topic in &topics {
            self.drop_subscription(key, topic, Some(&user), clock);
        }
        self.with_conn(key, clock, |c, cx| c.unsubscribed(&topics, cx));
    }

    /// Connection `conn` left the live phase: it is no longer a subscriber anywhere.
    pub(super) fn leave_all(
        &mut self,
        conn: ConnId,
        subs: Vec<Arc<str>>,
        user: Option<&str>,
        clock: Clock,
    ) {
        for topic in subs {
            let delta = self.topics.unsubscribe(&topic, conn.key());
            self.announce_leave(&topic, conn, &delta, user, clock);
        }
    }

    /// Removes one subscription of a live connection (if it has it; returns whether it had);
    /// `user` asks for the presence leave.
    pub(super) fn drop_subscription(
        &mut self,
        key: ConnKey,
        topic: &str,
        user: Option<&str>,
        clock: Clock,
    ) -> bool {
        let Some(slot) = self.conns.get_mut(key as usize) else {
            return false;
        };
        let conn = slot.conn.id();
        let Some(SessionMut {
            subs, recovering, ..
        }) = slot.conn.session_mut()
        else {
            return false;
        };
        let Some(i) = subs.iter().position(|s| **s == *topic) else {
            return false;
        };
        subs.swap_remove(i);
        recovering.retain(|t| **t != *topic);
        let delta = self.topics.unsubscribe(topic, key);
        self.announce_leave(topic, conn, &delta, user, clock);
        true
    }

    /// Tells the owner what a departure (or a replaced subscription) changes: the shard's
    /// interest, a presence member (`user`, for a connection that was a plain subscriber), a
    /// queue group's members on this shard. The owner answers a presence departure
    /// (`presence_events`).
    fn announce_leave(
        &mut self,
        topic: &str,
        conn: ConnId,
        delta: &Delta,
        user: Option<&str>,
        clock: Clock,
    ) {
        let interest_off = delta.interest == Some(false);
        let user = user.filter(|_| self.run.cfg().presence.enabled && delta.plain == Some(false));
        let (group, group_members) = match &delta.left_group {
            Some((g, n)) => (Some(g), *n),
            None => (None, 0),
        };
        let owner = self.topics.owner_of(topic);
        if user.is_some() {
            self.await_presence_left(conn);
        }
        if owner == self.me {
            // `interest_off` here only in a cluster, where the owner counts its own interest.
            if interest_off || user.is_some() || group.is_some() {
                let group = group.map(|g| (&**g, group_members));
                self.handle_leave(topic, conn, interest_off, user, group, clock);
            }
            // Its connections here may have been all that kept the owner's entry.
            self.release_owned(topic);
        } else if interest_off || user.is_some() || group.is_some() {
            send(
                &mut self.fabric,
                &self.metrics,
                owner,
                FabricMsg::Leave {
                    topic: Arc::from(topic),
                    conn,
                    interest_off,
                    group_members,
                    user: user.map(Box::from),
                    group: group.cloned(),
                },
            );
        }
    }

    /// New presence data for every topic of the connection.
    pub(super) fn presence_update(&mut self, key: ConnKey, data: Bytes) {
        let Some(SessionMut { user, subs, .. }) = self
            .conns
            .get_mut(key as usize)
            .and_then(|s| s.conn.session_mut())
        else {
            return;
        };
        let user: Box<str> = user.into();
        let topics: Vec<Arc<str>> = subs.clone();
        for topic in topics {
            let owner = self.topics.owner_of(&topic);
            if owner == self.me {
                self.handle_presence_update(&topic, &user, data.clone());
            } else {
                let update = crate::fabric::PresenceUpdate {
                    topic,
                    user: user.clone(),
                    data: data.clone(),
                };
                send(
                    &mut self.fabric,
                    &self.metrics,
                    owner,
                    FabricMsg::PresenceUpdate(Box::new(update)),
                );
            }
        }
    }
}
