//! Application commands on the shard that owns what they are about: sends to connections and
//! users, disconnects, subscriptions and ACLs made by the application, listings and counts,
//! broadcasts to every connection, drain, and handing application events out.
//!
//! Every command is answered through its responder, exactly once; a command about a connection
//! this shard does not serve live (gone, never existed, or another shard's id routed here) is
//! answered [`CommandError::UnknownConnection`].

use bytes::Bytes;

use super::{Shard, Transport};
use crate::auth::Acl;
use crate::codec::{self, OpCode};
use crate::command::{
    AppSubscribe, Command, CommandError, ConnectionInfo, Payload, SendOutcome, SubscribeOutcome,
    TopicSubscribers,
};
use crate::conn::ConnId;
use crate::conn::ConnKey;
use crate::dialect::Delivery;
use crate::protocol::{self, Clock, Wire};
use crate::reply::Responder;

impl<T: Transport> Shard<T> {
    pub(super) fn handle_command(&mut self, cmd: Command, clock: Clock) {
        match cmd {
            Command::Send {
                conn,
                payload,
                reply,
            } => {
                let sent = match self.live_key(conn) {
                    Some(key) => self.send_payload(key, &payload, &clock.iso()),
                    None => Err(CommandError::UnknownConnection),
                };
                reply.send(sent);
            }
            Command::RpcReply {
                conn,
                request,
                result,
                reply,
            } => {
                let done = match self.session_key(conn) {
                    Some(key) => {
                        let mut known = false;
                        self.with_conn(key, clock, |c, cx| {
                            known = c.rpc_reply(request, result, cx);
                        });
                        if known {
                            Ok(())
                        } else {
                            Err(CommandError::UnknownRequest)
                        }
                    }
                    None => Err(CommandError::UnknownConnection),
                };
                reply.send(done);
            }
            Command::SendUser {
                user,
                payload,
                reply,
            } => {
                let ts = clock.iso();
                let keys = self.app.users.get(&user).to_vec();
                let sent = keys
                    .into_iter()
                    .filter(|&key| {
                        self.send_payload(key, &payload, &ts)
                            .is_ok_and(|o| !o.duplicate)
                    })
                    .count();
                reply.send(sent);
            }
            Command::Disconnect {
                conn,
                code,
                reason,
                reply,
            } => {
                let done = self.session_key(conn).map(|key| {
                    self.with_conn(key, clock, |c, cx| c.close(code, &reason, cx));
                });
                reply.send(done.ok_or(CommandError::UnknownConnection));
            }
            Command::Refresh {
                conn,
                expire_at,
                expired,
                reply,
            } => {
                let done = self.session_key(conn).map(|key| {
                    let mut centrifuge = false;
                    self.with_conn(key, clock, |c, cx| {
                        centrifuge = c.server_refresh(expire_at, expired, cx);
                    });
                    centrifuge
                });
                reply.send(done.ok_or(CommandError::UnknownConnection));
            }
            Command::Subscribe {
                conn,
                request,
                reply,
            } => self.app_subscribe(conn, &request, reply, clock),
            Command::Unsubscribe {
                conn,
                topics,
                reply,
            } => reply.send(self.app_unsubscribe(conn, topics, clock)),
            Command::SetAcl {
                conn,
                allow,
                deny,
                reply,
            } => reply.send(self.set_acl(conn, allow, deny, clock)),
            Command::UpdatePresence { conn, data, reply } => {
                let answer = match self.live_key(conn) {
                    Some(key) => {
                        self.presence_update(key, data);
                        Ok(())
                    }
                    None => Err(CommandError::UnknownConnection),
                };
                reply.send(answer);
            }
            Command::ListConnections { reply } => reply.send(self.list_connections()),
            Command::SubscriberCount { topic, reply } => {
                let answer =
                    self.topics
                        .get(&topic)
                        .map_or_else(Default::default, |t| TopicSubscribers {
                            count: t.subscriber_count(),
                            queue_groups: t.groups().map(|(g, n)| (g.to_string(), n)).collect(),
                        });
                reply.send(answer);
            }
            Command::ChannelCounts {
                pattern,
                max,
                reply,
            } => {
                let matches = |name: &str| {
                    pattern
                        .as_deref()
                        .is_none_or(|p| crate::auth::glob_match(p, name))
                };
                reply.send(self.topics.subscriber_counts(matches, max));
            }
            Command::TopicStats { top, reply } => {
                let local = &self.topics;
                reply.send(self.owner.stats(|name| local.contains(name), top));
            }
            Command::BroadcastAll { frame, reply } => reply.send(self.broadcast_all(&frame)),
            Command::Drain {
                close_code,
                reason,
                timeout,
                reply,
            } => {
                self.begin_drain_with(close_code, &reason, clock.now + timeout, clock);
                reply.send(());
            }
            // Waits, when nothing is queued, for the end of a turn that queues events.
            Command::TakeEvents { max, reply } => self.app.events.request(max, reply),
        }
    }

    /// The slab key of `conn` when it is a connection of this shard with a session, in any
    /// dialect.
    fn session_key(&self, conn: ConnId) -> Option<ConnKey> {
        let key = conn.key();
        self.conns
            .get(key as usize)
            .is_some_and(|s| s.conn.id() == conn && s.conn.has_session())
            .then_some(key)
    }

    /// The slab key of `conn` when it is a live WSE connection of this shard (per-connection
    /// sends, subscriptions and ACLs are WSE's).
    fn live_key(&self, conn: ConnId) -> Option<ConnKey> {
        let key = conn.key();
        self.conns
            .get(key as usize)
            .is_some_and(|s| s.conn.id() == conn && s.conn.is_live())
            .then_some(key)
    }

    /// Queues `payload` to live connection `key` under the outbound cap; a connection over the
    /// cap is evicted with 4413, as a slow subscriber would be.
    fn send_payload(
        &mut self,
        key: ConnKey,
        payload: &Payload,
        ts: &str,
    ) -> Result<SendOutcome, CommandError> {
        let Some(slot) = self.conns.get_mut(key as usize) else {
            return Err(CommandError::UnknownConnection);
        };
        let frame = match payload {
            Payload::Text(text) => codec::encode_frame(OpCode::Text, text),
            Payload::Binary(bytes) => codec::encode_frame(OpCode::Binary, bytes),
            Payload::Event(event) => {
                if !self.app.recent_ids.first_time(slot.conn.id(), &event.id) {
                    return Ok(SendOutcome {
                        bytes: 0,
                        duplicate: true,
                    });
                }
                let seq = slot
                    .conn
                    .next_seq()
                    .ok_or(CommandError::UnknownConnection)?;
                let (wire, bytes) = protocol::encode_for_connection(
                    event.envelope(ts, seq),
                    slot.conn.is_msgpack(),
                    self.run.cfg().protocol.compression_threshold,
                );
                let op = match wire {
                    Wire::Text if !self.run.cfg().protocol.binary_event_frames => OpCode::Text,
                    Wire::Text | Wire::Binary => OpCode::Binary,
                };
                codec::encode_frame(op, &bytes)
            }
        };
        let bytes = frame.len();
        let max = self.run.cfg().limits.max_outbound_queue_bytes;
        if slot.offer(
            key,
            &mut Delivery::new(None, &frame),
            max,
            &self.metrics,
            &mut self.turn,
        ) {
            self.metrics.messages_out_total.inc();
            Ok(SendOutcome {
                bytes,
                duplicate: false,
            })
        } else {
            self.turn.evict(key);
            Err(CommandError::SlowConsumer)
        }
    }

    fn app_subscribe(
        &mut self,
        conn: ConnId,
        request: &AppSubscribe,
        reply: Responder<Result<SubscribeOutcome, CommandError>>,
        clock: Clock,
    ) {
        let req = self.live_key(conn).and_then(|key| {
            let slot = self.conns.get(key as usize)?;
            let req = slot.conn.admit_subscription(
                &request.topics,
                request.presence.as_deref(),
                request.queue_group.as_deref(),
                &request.recover,
                self.run.cfg(),
            )?;
            Some((key, req))
        });
        match req {
            Some((key, req)) => self.subscribe(key, req, Some(reply), clock),
            None => reply.send(Err(CommandError::UnknownConnection)),
        }
    }

    fn app_unsubscribe(
        &mut self,
        conn: ConnId,
        topics: Option<Vec<String>>,
        clock: Clock,
    ) -> Result<Vec<String>, CommandError> {
        let key = self.live_key(conn).ok_or(CommandError::UnknownConnection)?;
        let slot = self.conns.get(key as usize).expect("live");
        let user: Box<str> = slot.conn.user_id().unwrap_or_default().into();
        let topics = topics.unwrap_or_else(|| {
            slot.conn
                .subscriptions()
                .iter()
                .map(|t| t.to_string())
                .collect()
        });
        Ok(topics
            .into_iter()
            .filter(|t| self.drop_subscription(key, t, Some(&user), clock))
            .collect())
    }

    /// Replaces the subscribe ACL (an empty or absent allow list allows everything not denied,
    /// as upstream's `set_topic_acl`), and drops the subscriptions it no longer permits.
    fn set_acl(
        &mut self,
        conn: ConnId,
        allow: Option<Vec<String>>,
        deny: Vec<String>,
        clock: Clock,
    ) -> Result<Vec<String>, CommandError> {
        let key = self.live_key(conn).ok_or(CommandError::UnknownConnection)?;
        let acl = match allow {
            Some(allow) if !allow.is_empty() => Acl::new(allow, deny),
            _ => Acl::allow_all_but(deny),
        };
        let slot = self.conns.get_mut(key as usize).expect("live");
        slot.conn.set_subscribe_acl(acl);
        let user: Box<str> = slot.conn.user_id().unwrap_or_default().into();
        let refused: Vec<String> = slot
            .conn
            .subscriptions()
            .iter()
            .filter(|t| !slot.conn.may_subscribe(t))
            .map(|t| t.to_string())
            .collect();
        for topic in &refused {
            self.drop_subscription(key, topic, Some(&user), clock);
        }
        Ok(refused)
    }

    fn list_connections(&self) -> Vec<ConnectionInfo> {
        self.conns
            .iter()
            .filter(|(_, s)| s.conn.has_session())
            .map(|(_, s)| ConnectionInfo {
                id: s.conn.id(),
                user_id: s.conn.user_id().unwrap_or_default().to_owned(),
                topics: s.conn.subscriptions().len(),
            })
            .collect()
    }

    /// Queues `frame` to every live WSE connection; returns how many took it.
    fn broadcast_all(&mut self, frame: &Bytes) -> usize {
        // A private copy: cloning the control plane's buffer per connection would bounce its
        // reference count between cores.
        let frame = Bytes::copy_from_slice(frame);
        let max = self.run.cfg().limits.max_outbound_queue_bytes;
        let mut sent = 0;
        for (key, slot) in self.conns.iter_mut() {
            if !slot.conn.is_live() {
                continue;
            }
            let key = key as ConnKey;
            if slot.offer(
                key,
                &mut Delivery::new(None, &frame),
                max,
                &self.metrics,
                &mut self.turn,
            ) {
                sent += 1;
            } else {
                self.turn.evict(key);
            }
        }
        self.metrics.messages_out_total.add(sent as u64);
        sent
    }
}
