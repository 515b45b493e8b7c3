//! The shard's side of the topic-owner role: what the owner decides ([`TopicOwner`], which
//! keeps the state) turned into frames for local subscribers and fabric entries for the other
//! shards.
//!
//! Every publication and every join of a topic passes through its owner, in the order the owner
//! handles them; that order is the topic's order on every shard.

use bytes::Bytes;

use super::cluster::{Origin, Parked};
use super::{Shard, Transport, send};
use crate::centrifuge::proto::ClientInfo;
use crate::codec::{self, OpCode};
use crate::conn::ConnId;
use crate::fabric::{
    FabricMsg, JoinLeave, JoinReply, JoinRequest, PresenceLeft, Query, QueryAnswer, QueryKind,
};
use crate::presence::Joined;
use crate::protocol::{self, Clock, ErrorCode};
#[cfg(doc)]
use crate::topic_owner::TopicOwner;

impl<T: Transport> Shard<T> {
    /// Numbers a publication, frames it once (stamped and recorded when recovery is on), queues
    /// it to local subscribers and sends one entry to each other shard with subscribers, then
    /// one entry per queue group to the shard picked for it; then, for a publication made on
    /// this node in a cluster, one entry to the cluster core for the other nodes.
    pub(super) fn sequence(
        &mut self,
        topic: &str,
        body: &Bytes,
        ack: Option<ConnId>,
        origin: Origin,
        clock: Clock,
    ) {
        self.metrics.publications_total.inc();
        let seq = self.owner.sequence(topic, body, clock.wall_ms);
        self.fan_out(topic, &seq.frame);
        // Queue groups are this node's: each gets the publications made on its node (another
        // node's groups get theirs there), so a group never gets one twice.
        if origin != Origin::Peer {
            self.deliver_groups(topic, body, &seq.frame, seq.epoch.is_some());
        }
        if origin == Origin::Here {
            self.forward_to_cluster(topic, body);
        }
        self.release_owned(topic);
        if let Some(conn) = ack {
            let (offset, epoch) = (seq.offset, seq.epoch);
            if conn.shard() == self.me {
                self.send_publish_ack(conn, topic, epoch, offset, clock);
            } else {
                let topic = self
                    .owner
                    .name(topic)
                    .or_else(|| self.topics.get(topic).map(|t| t.name()))
                    .map_or_else(|| topic.into(), |name| name.clone());
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

    /// The owner forgets `topic` unless something keeps it (the shard's own connections
    /// included).
    pub(super) fn release_owned(&mut self, topic: &str) {
        let held = self.topics.contains(topic);
        self.owner.release(topic, held);
    }

    /// Sends `frame` to every shard interested in `topic` and queues it to local subscribers.
    fn fan_out(&mut self, topic: &str, frame: &Bytes) {
        if let Some((name, interested)) = self.owner.interest(topic) {
            let name = name.clone();
            // In a cluster the owner counts itself among the interested (crate::topics).
            for shard in interested.iter().filter(|&s| s != self.me) {
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

    /// Sends a Centrifuge join (`joined`) or leave of `client` to every shard interested in
    /// `topic` and to local subscribers, when the topic's namespace has `join_leave` (no other
    /// subscriber could want it).
    fn fan_out_join_leave(&mut self, topic: &str, joined: bool, client: ClientInfo) {
        let wanted = self
            .run
            .centrifuge()
            .namespaces
            .resolve(topic)
            .is_ok_and(|c| c.namespace.join_leave);
        if !wanted {
            return;
        }
        if let Some((name, interested)) = self.owner.interest(topic) {
            let name = name.clone();
            // In a cluster the owner counts itself among the interested (crate::topics).
            for shard in interested.iter().filter(|&s| s != self.me) {
                let m = FabricMsg::JoinLeave(Box::new(JoinLeave {
                    topic: name.clone(),
                    joined,
                    client: client.clone(),
                }));
                send(&mut self.fabric, &self.metrics, shard, m);
            }
        }
        self.deliver_join_leave(topic, joined, &client);
    }

    /// Hands the publication to one member of each of the topic's queue groups: the owner picks
    /// the shard per group (weighted round-robin, see [`crate::queue_groups`]), which picks the
    /// member. Members get it without recovery stamps (`stamped`: `frame` carries them), so a
    /// member never sees the gaps its share leaves in the topic's offsets.
    fn deliver_groups(&mut self, topic: &str, body: &[u8], frame: &Bytes, stamped: bool) {
        let mut picks = std::mem::take(&mut self.scratch.group_picks);
        if !self.owner.pick_groups(topic, &mut picks) {
            self.scratch.group_picks = picks;
            return;
        }
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
        self.scratch.group_picks = picks;
    }

    /// A connection (on this shard or another) subscribes to a topic this shard owns.
    pub(super) fn handle_join(&mut self, j: JoinRequest, clock: Clock) {
        debug_assert!(self.owner.owns(&j.topic), "join sent to a non-owner");
        if j.interest {
            self.owner
                .set_interest(&j.topic, usize::from(j.shard), true);
            self.advertise(&j.topic, None);
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
            let shard = usize::from(j.shard);
            if self
                .owner
                .join_group(&j.topic, group, shard, *members)
                .is_err()
            {
                reply.refused = Some(ErrorCode::QueueGroupLimit);
            } else {
                self.advertise(&j.topic, Some(group));
            }
        }
        let mut event = None;
        let mut join_leave = None;
        if let Some((user, data)) = j.presence {
            let max = self.run.cfg().presence.max_members;
            let joined = self.owner.presence_join(&j.topic, &user, data.clone(), max);
            if !matches!(joined, Joined::Full) {
                // A WSE connection shows in Centrifuge's member list as its user alone.
                let client = j.client.map_or_else(
                    || ClientInfo {
                        user: user.to_string(),
                        client: j.conn.to_string(),
                        ..Default::default()
                    },
                    |c| *c,
                );
                self.owner.client_join(&j.topic, j.conn, client.clone());
                join_leave = Some(client);
            }
            match joined {
                Joined::New => {
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
                Joined::Full => reply.refused = Some(ErrorCode::PresenceLimit),
            }
        }
        let event = event.map(|(kind, user, data)| {
            let json = protocol::presence_event(kind, &j.topic, &user, &data);
            codec::encode_frame(OpCode::Text, &json)
        });
        let parked = Parked {
            reply,
            shard: usize::from(j.shard),
            recover: j.recover,
            event,
            join_leave,
        };
        // In a cluster, the answer waits while the node's interest is not confirmed yet.
        if let Some(p) = self.park(parked) {
            self.finish_join(p, clock);
        }
        self.release_owned(&j.topic);
    }

    /// Answers a join: reads its replay (now, so it ends where the live publications the
    /// joining shard gets next begin), sends the answer, then fans out the presence event it
    /// caused.
    pub(super) fn finish_join(&mut self, p: Parked, clock: Clock) {
        let Parked {
            mut reply,
            shard,
            recover,
            event,
            join_leave,
        } = p;
        let topic = reply.topic.clone();
        if let Some((epoch, after)) = recover
            && let Some((info, frames)) = self.owner.replay(&topic, epoch, after, clock.wall_ms)
        {
            reply.recovery = Some(info);
            reply.frames = frames;
        }
        // The reply goes first: the joining shard must be live before the presence event arrives.
        // It carries the application's `presence_join`, which the connection's shard reports
        // after the connection's `connect`.
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
        if let Some(frame) = event {
            self.fan_out(&topic, &frame);
        }
        if let Some(client) = join_leave {
            self.fan_out_join_leave(&topic, true, client);
        }
        self.release_owned(&topic);
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
        clock: Clock,
    ) {
        let shard = conn.shard();
        if interest_off {
            self.owner.set_interest(topic, shard, false);
            self.withdraw_if_idle(topic, clock);
        }
        if let Some((group, members)) = group {
            self.owner.leave_group(topic, group, shard, members);
            self.withdraw_group_if_idle(topic, group, clock);
        }
        if user.is_some()
            && let Some(client) = self.owner.client_leave(topic, conn)
        {
            self.fan_out_join_leave(topic, false, client);
        }
        let left = user.and_then(|user| {
            let data = self.owner.presence_leave(topic, user)?;
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
        self.release_owned(topic);
    }

    /// A member of a topic this shard owns has new data.
    pub(super) fn handle_presence_update(&mut self, topic: &str, user: &str, data: Bytes) {
        if self.owner.presence_update(topic, user, data.clone()) {
            let json = protocol::presence_event("presence_update", topic, user, &data);
            self.fan_out(topic, &codec::encode_frame(OpCode::Text, &json));
        }
    }

    /// Answers a question about a topic this shard owns.
    pub(super) fn handle_query(&mut self, q: Query, clock: Clock) {
        let presence_on = self.run.cfg().presence.enabled;
        let answer = match &q.kind {
            QueryKind::Presence { .. }
            | QueryKind::PresenceStats { .. }
            | QueryKind::PresenceClients { .. }
                if !presence_on =>
            {
                QueryAnswer::PresenceDisabled
            }
            QueryKind::Presence { topic } => QueryAnswer::Presence(
                self.owner
                    .presence(topic)
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
            QueryKind::PresenceStats { topic } => {
                let (users, conns) = self.owner.presence(topic).map_or((0, 0), |m| m.stats());
                QueryAnswer::PresenceStats(users, conns)
            }
            QueryKind::PresenceClients { topic } => {
                QueryAnswer::Clients(self.owner.clients(topic).cloned().collect())
            }
            QueryKind::History {
                topic,
                after,
                limit,
                reverse,
                keep,
            } => {
                let read =
                    self.owner
                        .history(topic, *after, *limit, *reverse, *keep, clock.wall_ms);
                self.release_owned(topic);
                read.map_or(QueryAnswer::HistoryDisabled, QueryAnswer::History)
            }
            QueryKind::HistoryRemove { topic } => {
                if self.owner.history_remove(topic) {
                    QueryAnswer::HistoryRemoved
                } else {
                    QueryAnswer::HistoryDisabled
                }
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
