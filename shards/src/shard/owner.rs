//! A topic's owner: numbering publications (with recovery stamps and history), registering the
//! interest of other shards, replaying history, keeping presence members and queue-group
//! membership (picking each group's shard per publication), answering queries.
//!
//! Every publication and every join of a topic passes through its owner, in the order the owner
//! handles them; that order is the topic's order on every shard.

use bytes::Bytes;

use super::{Shard, Transport, send};
use crate::codec::{self, OpCode};
use crate::conn::ConnId;
use crate::fabric::{
    FabricMsg, JoinReply, JoinRequest, PresenceLeft, Query, QueryAnswer, QueryKind,
};
use crate::presence::Joined;
use crate::protocol::{self, Clock, RecoveryInfo};
use crate::queue_groups::QUEUE_GROUP_LIMIT;
use crate::recovery::RingId;

impl<T: Transport> Shard<T> {
    /// Numbers a publication, frames it once (stamped and recorded when recovery is on), queues
    /// it to local subscribers and sends one entry to each other shard with subscribers, then
    /// one entry per queue group to the shard picked for it.
    pub(super) fn sequence(&mut self, topic: &str, body: &[u8], ack: Option<ConnId>, clock: Clock) {
        debug_assert_eq!(
            self.topics.owner_of(topic),
            self.me,
            "sequenced off its owner"
        );
        self.metrics.publications_total.inc();
        let (frame, offset, epoch) = if self.history.is_some() {
            let (ring, epoch, last) = self.ensure_ring(topic, clock.wall_ms);
            let offset = last + 1;
            self.topics.entry(topic).published = offset;
            let frame =
                codec::encode_frame(OpCode::Text, &protocol::stamped(topic, epoch, offset, body));
            let history = self.history.as_mut().expect("checked above");
            history.append(ring, offset, &frame, clock.wall_ms);
            (frame, offset, Some(epoch))
        } else {
            let offset = self.topics.sequence(topic).published;
            (codec::encode_frame(OpCode::Text, body), offset, None)
        };
        self.fan_out(topic, &frame);
        self.deliver_groups(topic, body, &frame, epoch.is_some());
        self.topics.release_if_unused(topic);
        if let Some(conn) = ack {
            if conn.shard() == self.me {
                self.send_publish_ack(conn, topic, epoch, offset, clock);
            } else {
                let topic = self
                    .topics
                    .get(topic)
                    .map_or_else(|| topic.into(), |t| t.name.clone());
                send(
                    &mut self.fabric,
                    &self.metrics,
                    conn.shard(),
                    FabricMsg::PublishAcked {
                        conn,
                        topic,
                        offset,
                        epoch,
                    },
                );
            }
        }
        self.evict_pending(clock);
    }

    /// Sends `frame` to every shard interested in `topic` and queues it to local subscribers.
    fn fan_out(&mut self, topic: &str, frame: &Bytes) {
        if let Some(t) = self.topics.get(topic) {
            let name = t.name.clone();
            for shard in t.interested.iter() {
                send(
                    &mut self.fabric,
                    &self.metrics,
                    shard,
                    FabricMsg::Deliver {
                        topic: name.clone(),
                        frame: frame.clone(),
                    },
                );
            }
        }
        self.deliver_local(topic, frame);
    }

    /// Hands the publication to one member of each of the topic's queue groups: picks the shard
    /// per group (weighted round-robin, see [`crate::queue_groups`]), which picks the member.
    /// Members get it without recovery stamps (`stamped`: `frame` carries them), so a member
    /// never sees the gaps its share leaves in the topic's offsets.
    fn deliver_groups(&mut self, topic: &str, body: &[u8], frame: &Bytes, stamped: bool) {
        let Some(membership) = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.membership.as_deref_mut())
        else {
            return;
        };
        let mut picks = std::mem::take(&mut self.group_picks);
        membership.pick(&mut picks);
        let unstamped = if stamped {
            codec::encode_frame(OpCode::Text, body)
        } else {
            frame.clone()
        };
        for (shard, name) in picks.drain(..) {
            if shard == self.me {
                self.deliver_group(&name.topic, &name.group, unstamped.clone());
            } else {
                let m = FabricMsg::DeliverGroup {
                    group: name,
                    frame: unstamped.clone(),
                };
                send(&mut self.fabric, &self.metrics, shard, m);
            }
        }
        self.group_picks = picks;
    }

    /// The topic's history ring, opened (with a new epoch, offsets restarting at 1) if it has
    /// none. Returns the ring, its epoch and the last offset.
    fn ensure_ring(&mut self, topic: &str, now_ms: u64) -> (RingId, u32, u64) {
        let history = self.history.as_mut().expect("recovery is on");
        let t = self.topics.entry(topic);
        if let Some(ring) = t.ring {
            return (ring, t.epoch, t.published);
        }
        let (ring, epoch, evicted) = history.open(t.name.clone(), now_ms);
        t.ring = Some(ring);
        t.epoch = epoch;
        t.published = 0;
        if let Some(evicted) = evicted {
            if let Some(old) = self.topics.get_mut(&evicted) {
                old.ring = None;
            }
            self.topics.gc(&evicted);
        }
        (ring, epoch, 0)
    }

    /// A connection (on this shard or another) subscribes to a topic this shard owns.
    pub(super) fn handle_join(&mut self, j: JoinRequest, clock: Clock) {
        debug_assert_eq!(
            self.topics.owner_of(&j.topic),
            self.me,
            "join sent to a non-owner"
        );
        if j.interest {
            self.topics
                .set_interest(&j.topic, usize::from(j.shard), true);
        }
        let mut reply = JoinReply {
            topic: j.topic.clone(),
            conn: j.conn,
            request: j.request,
            interest: j.interest,
            recovery: None,
            frames: Bytes::new(),
            refused: None,
            queue_group: j.queue_group.as_ref().map(|(g, _)| g.clone()),
            presence_joined: None,
        };
        if let Some((group, members)) = &j.queue_group {
            let t = self.topics.entry(&j.topic);
            let membership = t.membership.get_or_insert_with(Default::default);
            if membership
                .join(&t.name, group, usize::from(j.shard), *members)
                .is_err()
            {
                reply.refused = Some(QUEUE_GROUP_LIMIT);
            }
            if membership.is_empty() {
                t.membership = None;
            }
        }
        if let (Some((epoch, after)), true) = (j.recover, self.history.is_some()) {
            let (ring, current, last) = self.ensure_ring(&j.topic, clock.wall_ms);
            let history = self.history.as_ref().expect("checked above");
            let replay = history.replay(ring, epoch, after, last, clock.wall_ms);
            reply.recovery = Some(RecoveryInfo {
                epoch: current,
                offset: last,
                recovered: replay.recovered,
                count: replay.count,
            });
            reply.frames = replay.frames;
        }
        let mut event = None;
        if let Some((user, data)) = j.presence {
            let max = self.cfg.presence.max_members;
            let members = self
                .topics
                .entry(&j.topic)
                .presence
                .get_or_insert_with(Default::default);
            let first = members.is_empty();
            match members.join(&user, data.clone(), max) {
                Joined::New => {
                    // Single writer: the shard's own gauges.
                    let m = &self.metrics;
                    m.presence_users.inc();
                    if first {
                        m.presence_topics.inc();
                    }
                    let payload = presence_payload(&j.topic, &user, &data);
                    reply.presence_joined = Some((user.clone(), payload));
                    event = Some(("presence_join", user, data));
                }
                Joined::Again { data_changed: true } => {
                    event = Some(("presence_update", user, data))
                }
                Joined::Again {
                    data_changed: false,
                } => {}
                Joined::Full => reply.refused = Some("PRESENCE_LIMIT"),
            }
        }
        // The reply goes first: the joining shard must be live before the presence event arrives.
        // It carries the application's `presence_join`, which the connection's shard reports
        // after the connection's `connect`.
        let shard = usize::from(j.shard);
        if shard == self.me {
            self.handle_joined(reply, clock);
        } else {
            send(
                &mut self.fabric,
                &self.metrics,
                shard,
                FabricMsg::Joined(Box::new(reply)),
            );
        }
        if let Some((kind, user, data)) = event {
            let json = protocol::presence_event(kind, &j.topic, &user, &data);
            self.fan_out(&j.topic, &codec::encode_frame(OpCode::Text, &json));
        }
        self.topics.gc(&j.topic);
    }

    /// Connection `conn` left a topic this shard owns (or replaced its subscription): its shard
    /// may have lost its interest, `user` a presence membership, and `group` is `(group, the
    /// members of it that shard has left)`. A presence departure is answered to the
    /// connection's shard, which reports it before the connection's `disconnect`.
    pub(super) fn handle_leave(
        &mut self,
        topic: &str,
        conn: ConnId,
        interest_off: bool,
        user: Option<&str>,
        group: Option<(&str, u32)>,
    ) {
        let shard = conn.shard();
        if interest_off {
            self.topics.set_interest(topic, shard, false);
        }
        if let Some((group, members)) = group
            && let Some(t) = self.topics.get_mut(topic)
            && let Some(membership) = t.membership.as_mut()
        {
            membership.leave(group, shard, members);
            if membership.is_empty() {
                t.membership = None;
            }
        }
        let left = user.and_then(|user| {
            let members = self.topics.get_mut(topic)?.presence.as_mut()?;
            let data = members.leave(user)?;
            let m = &self.metrics;
            m.presence_users
                .set(m.presence_users.get().saturating_sub(1));
            if members.is_empty() {
                m.presence_topics
                    .set(m.presence_topics.get().saturating_sub(1));
            }
            Some((user, data))
        });
        let event = left.as_ref().map(|(user, data)| {
            let json = protocol::presence_event("presence_leave", topic, user, data);
            self.fan_out(topic, &codec::encode_frame(OpCode::Text, &json));
            (Box::from(*user), presence_payload(topic, user, data))
        });
        if user.is_some() {
            let answer = PresenceLeft { conn, left: event };
            if shard == self.me {
                self.handle_presence_left(answer);
            } else {
                let m = FabricMsg::PresenceLeft(Box::new(answer));
                send(&mut self.fabric, &self.metrics, shard, m);
            }
        }
        self.topics.gc(topic);
    }

    /// A member of a topic this shard owns has new data.
    pub(super) fn handle_presence_update(&mut self, topic: &str, user: &str, data: Bytes) {
        let changed = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.presence.as_mut())
            .is_some_and(|m| m.update(user, data.clone()));
        if changed {
            let json = protocol::presence_event("presence_update", topic, user, &data);
            self.fan_out(topic, &codec::encode_frame(OpCode::Text, &json));
        }
    }

    /// Answers a question about a topic this shard owns.
    pub(super) fn handle_query(&mut self, q: Query) {
        let presence_on = self.cfg.presence.enabled;
        let members = |topic: &str| self.topics.get(topic).and_then(|t| t.presence.as_deref());
        let answer = match (&q.kind, presence_on) {
            (_, false) => QueryAnswer::PresenceDisabled,
            (QueryKind::Presence { topic }, true) => QueryAnswer::Presence(
                members(topic)
                    .map(|m| {
                        m.iter()
                            .map(|(u, m)| {
                                (
                                    u.to_owned(),
                                    m.connections,
                                    String::from_utf8_lossy(&m.data).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            (QueryKind::PresenceStats { topic }, true) => {
                let (users, conns) = members(topic).map_or((0, 0), |m| m.stats());
                QueryAnswer::PresenceStats(users, conns)
            }
        };
        q.reply.complete(answer);
    }
}

/// The payload of a presence application event: `{"topic","user_id","data"}`, the `p` of the
/// frame the topic's subscribers get.
fn presence_payload(topic: &str, user: &str, data: &[u8]) -> Bytes {
    #[derive(serde::Serialize)]
    struct P<'a> {
        topic: &'a str,
        user_id: &'a str,
        data: &'a serde_json::value::RawValue,
    }
    // Presence data was checked to be JSON when the member joined.
    let empty: &serde_json::value::RawValue = serde_json::from_str("{}").expect("JSON");
    let data = std::str::from_utf8(data)
        .ok()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(empty);
    let json = serde_json::to_vec(&P {
        topic,
        user_id: user,
        data,
    })
    .expect("a payload serialises");
    Bytes::from(json)
}
