//! The connection side of the engine API: sends, disconnects, subscriptions and ACLs made by the
//! application, listings, drain, health — each routed over the fabric to the shard that serves
//! the connection (named in its id) or to every shard, and answered through a [`Responder`].
//!
//! Owns: routing and combining answers. Never: touches connection state (the shard does), or
//! takes a lock a shard also takes (the control endpoint's lock is the control plane's own).
//!
//! The futures returned are runtime-agnostic (await them in tokio, or drive them with
//! [`crate::block_on`]). A command sent while the server stops may stay unanswered: the faces
//! that wait on them (the binary's server API) put a timeout around each.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Server;
use crate::close::CloseCode;
use crate::codec::{self, OpCode};
use crate::command::{
    AppSubscribe, Command, CommandError, ConnectionInfo, OutboundEvent, Payload, SendOutcome,
    SubscribeOutcome, close_code_allowed,
};
use crate::conn::ConnId;
use crate::fabric::{FabricMsg, Sent};
use crate::metrics::DropReason;
use crate::reply::Responder;

/// Bytes of one application send (text, binary or event): the server's inbound message limit
/// does not apply outbound, but one frame must still fit in a connection's outbound queue.
fn fits_queue(len: usize, server: &Server) -> Result<(), CommandError> {
    if len > server.config().limits.max_outbound_queue_bytes {
        return Err(CommandError::SlowConsumer);
    }
    Ok(())
}

impl Server {
    /// Sends `text` to connection `conn` as one text frame, verbatim. Upstream's `send`.
    ///
    /// ```no_run
    /// # async fn demo(server: &wse_shards::Server, id: &str) {
    /// use wse_shards::ConnId;
    /// let conn = ConnId::parse(id).expect("16 hex digits");
    /// match server.send(conn, r#"{"c":"U","t":"hello","p":{}}"#).await {
    ///     Ok(outcome) => println!("queued {} bytes", outcome.bytes),
    ///     Err(e) => println!("not sent: {e}"),
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`CommandError::UnknownConnection`] when `conn` is not live; `SlowConsumer` when the frame
    /// does not fit in its outbound queue (it is then closed with 4413); `Overloaded`,
    /// `NotRunning`.
    pub async fn send(&self, conn: ConnId, text: &str) -> Result<SendOutcome, CommandError> {
        let payload = Payload::Text(Bytes::copy_from_slice(text.as_bytes()));
        self.send_payload(conn, payload).await
    }

    /// Sends `bytes` to connection `conn` as one binary frame, verbatim. Upstream's
    /// `send_bytes`.
    ///
    /// # Errors
    /// As [`Server::send`].
    pub async fn send_bytes(
        &self,
        conn: ConnId,
        bytes: &[u8],
    ) -> Result<SendOutcome, CommandError> {
        self.send_payload(conn, Payload::Binary(Bytes::copy_from_slice(bytes)))
            .await
    }

    /// Sends an application event to `conn` in the WSE envelope
    /// (`{"c","t","p","id","ts","seq","v"}`, see [`OutboundEvent`]): MessagePack on
    /// `format=msgpack` connections, `C:`+zlib over `protocol.compression_threshold`, and not at
    /// all when the same event id went to this connection recently
    /// ([`crate::shard::SEND_DEDUP_WINDOW`]; the outcome says `duplicate`). `event` is a JSON
    /// object with `t` (or `type`) and optional `p`, `id`, `c`.
    ///
    /// ```no_run
    /// # async fn demo(server: &wse_shards::Server, conn: wse_shards::ConnId) {
    /// let event = r#"{"t":"notification","p":{"text":"hi"},"id":"n-42"}"#;
    /// let first = server.send_event(conn, event).await.unwrap();
    /// let again = server.send_event(conn, event).await.unwrap();
    /// assert!(!first.duplicate && again.duplicate);
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`CommandError::InvalidEvent`], and as [`Server::send`].
    pub async fn send_event(&self, conn: ConnId, event: &str) -> Result<SendOutcome, CommandError> {
        let event = OutboundEvent::parse(event)?;
        self.send_payload(conn, Payload::Event(Arc::new(event)))
            .await
    }

    async fn send_payload(
        &self,
        conn: ConnId,
        payload: Payload,
    ) -> Result<SendOutcome, CommandError> {
        if let Payload::Text(b) | Payload::Binary(b) = &payload {
            fits_queue(b.len(), self)?;
        }
        let (reply, answer) = Responder::pair();
        self.to_connection(
            conn,
            Command::Send {
                conn,
                payload,
                reply,
            },
        )?;
        answer.await.ok_or(CommandError::NotRunning)?
    }

    /// Sends `payload` (text, binary or an event) to every connection of `user` on every shard;
    /// returns how many connections it went to. A user with no connection is not an error (0).
    ///
    /// # Errors
    /// An invalid event; a shard that cannot be asked.
    pub async fn send_user(&self, user: &str, payload: Payload) -> Result<usize, CommandError> {
        let user: Arc<str> = Arc::from(user);
        let counts = self
            .gather(|reply| Command::SendUser {
                user: user.clone(),
                payload: payload.clone(),
                reply,
            })
            .await?;
        Ok(counts.into_iter().sum())
    }

    /// Answers Centrifuge connection `conn`'s `rpc` number `request` (an `rpc` event's
    /// `request`) with `result`: the result's data (JSON text; empty: none) or an error, which
    /// the client gets as its reply.
    ///
    /// # Errors
    /// `UnknownConnection`; `UnknownRequest` when no such call waits (answered already, timed
    /// out); `Overloaded`, `NotRunning`.
    pub async fn rpc_reply(
        &self,
        conn: ConnId,
        request: u64,
        result: Result<Bytes, crate::centrifuge::RpcError>,
    ) -> Result<(), CommandError> {
        let (reply, answer) = Responder::pair();
        self.to_connection(
            conn,
            Command::RpcReply {
                conn,
                request,
                result,
                reply,
            },
        )?;
        answer.await.ok_or(CommandError::NotRunning)?
    }

    /// Says whether an application answers Centrifuge `rpc`s (it consumes the event stream, or
    /// a webhook is set). While none does, an `rpc` is answered with error 108 at once rather
    /// than becoming an event nobody will answer.
    pub fn set_rpc_handler(&self, present: bool) {
        self.shared
            .app_rpc
            .store(present, std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes `conn` with `code` (1000 or 3000..=4999; the clients reconnect on 4xxx, and treat
    /// 1000 as final) and `reason` (at most 123 bytes; longer is cut).
    ///
    /// # Errors
    /// `InvalidCloseCode`, `UnknownConnection`, `Overloaded`, `NotRunning`.
    pub async fn disconnect(
        &self,
        conn: ConnId,
        code: u16,
        reason: &str,
    ) -> Result<(), CommandError> {
        if !close_code_allowed(code) {
            return Err(CommandError::InvalidCloseCode(code));
        }
        self.close_connection(conn, code, truncate_reason(reason).into())
            .await
    }

    /// Closes `conn` with a close frame that has no status code (nor reason): what upstream's
    /// Python `disconnect(conn_id)` sends, which clients report as 1005 ("no status received").
    /// Counted as a close with 1005.
    ///
    /// # Errors
    /// `UnknownConnection`, `Overloaded`, `NotRunning`.
    pub async fn disconnect_without_status(&self, conn: ConnId) -> Result<(), CommandError> {
        self.close_connection(conn, CloseCode::NoStatus.code(), "".into())
            .await
    }

    /// Refreshes a Centrifuge connection's expiry as Centrifugo's server API `refresh` does:
    /// `expired` closes it now with 3005; else `expire_at` (Unix seconds, 0: never) replaces
    /// its token's expiry (`None`: unchanged). `Ok(false)`: `conn` is a WSE connection, left as
    /// it is.
    ///
    /// # Errors
    /// `UnknownConnection`, `Overloaded`, `NotRunning`.
    pub async fn refresh_connection(
        &self,
        conn: ConnId,
        expire_at: Option<u64>,
        expired: bool,
    ) -> Result<bool, CommandError> {
        let (reply, answer) = Responder::pair();
        self.to_connection(
            conn,
            Command::Refresh {
                conn,
                expire_at,
                expired,
                reply,
            },
        )?;
        answer.await.ok_or(CommandError::NotRunning)?
    }

    async fn close_connection(
        &self,
        conn: ConnId,
        code: u16,
        reason: Box<str>,
    ) -> Result<(), CommandError> {
        let (reply, answer) = Responder::pair();
        self.to_connection(
            conn,
            Command::Disconnect {
                conn,
                code,
                reason,
                reply,
            },
        )?;
        answer.await.ok_or(CommandError::NotRunning)?
    }

    /// Subscribes `conn` as if it had asked: its subscribe ACL, the subscription limit, presence
    /// (with `sub.presence` as its data) and recovery (`sub.recover`) apply, and the answer
    /// comes once the topics' owners have confirmed — from then on every publication reaches
    /// it. The client gets no acknowledgement frame (it did not ask); replayed publications do
    /// reach it. With `sub.queue_group`, the topics are joined in that queue group instead: the
    /// connection gets its share of the publications (one member of the group gets each), without
    /// recovery stamps, replacing a plain subscription it had (see [`crate::queue_groups`]).
    ///
    /// ```no_run
    /// # async fn demo(server: &wse_shards::Server, conn: wse_shards::ConnId) {
    /// use wse_shards::command::AppSubscribe;
    /// let sub = AppSubscribe { topics: vec!["room:1".into()], ..Default::default() };
    /// let outcome = server.subscribe_connection(conn, sub).await.unwrap();
    /// assert_eq!(outcome.success_topics, ["room:1"]);
    /// # }
    /// ```
    ///
    /// # Errors
    /// `UnknownConnection`, `Overloaded`, `NotRunning`. Refused topics are not errors: they are
    /// listed in the outcome with their reasons.
    pub async fn subscribe_connection(
        &self,
        conn: ConnId,
        sub: AppSubscribe,
    ) -> Result<SubscribeOutcome, CommandError> {
        let (reply, answer) = Responder::pair();
        self.to_connection(
            conn,
            Command::Subscribe {
                conn,
                request: Box::new(sub),
                reply,
            },
        )?;
        answer.await.ok_or(CommandError::NotRunning)?
    }

    /// [`Server::subscribe_connection`] replaying each topic from `(epoch, offset)` — the
    /// client's last position, as a recovering client would send it. The outcome's `recovery`
    /// says per topic what was replayed (recovery must be enabled; without it nothing is).
    ///
    /// # Errors
    /// As [`Server::subscribe_connection`].
    pub async fn subscribe_with_recovery(
        &self,
        conn: ConnId,
        topics: &[String],
        epoch: Option<u32>,
        offset: u64,
    ) -> Result<SubscribeOutcome, CommandError> {
        let sub = AppSubscribe {
            topics: topics.to_vec(),
            recover: topics.iter().map(|t| (t.clone(), epoch, offset)).collect(),
            ..Default::default()
        };
        self.subscribe_connection(conn, sub).await
    }

    /// Unsubscribes `conn` from `topics`, or from every topic when `None`; returns the topics it
    /// was on and left. No acknowledgement frame goes to the client.
    ///
    /// # Errors
    /// `UnknownConnection`, `Overloaded`, `NotRunning`.
    pub async fn unsubscribe_connection(
        &self,
        conn: ConnId,
        topics: Option<Vec<String>>,
    ) -> Result<Vec<String>, CommandError> {
        let (reply, answer) = Responder::pair();
        self.to_connection(
            conn,
            Command::Unsubscribe {
                conn,
                topics,
                reply,
            },
        )?;
        answer.await.ok_or(CommandError::NotRunning)?
    }

    /// Replaces `conn`'s subscribe ACL: globs with `*` and `?`, deny wins, an absent or empty
    /// allow list allows everything not denied (upstream's `set_topic_acl`). Subscriptions the
    /// new ACL refuses are dropped; returns them. It applies to later subscribes and recovery
    /// requests too.
    ///
    /// # Errors
    /// `UnknownConnection`, `Overloaded`, `NotRunning`.
    pub async fn set_topic_acl(
        &self,
        conn: ConnId,
        allow: Option<Vec<String>>,
        deny: Vec<String>,
    ) -> Result<Vec<String>, CommandError> {
        let (reply, answer) = Responder::pair();
        self.to_connection(
            conn,
            Command::SetAcl {
                conn,
                allow,
                deny,
                reply,
            },
        )?;
        answer.await.ok_or(CommandError::NotRunning)?
    }

    /// Replaces `conn`'s presence data in every topic it is present in (upstream's
    /// `update_presence`; the same as the client's own `presence_update`). `data` is a JSON
    /// object's text within `presence.max_data_size` (the caller checks).
    ///
    /// # Errors
    /// `UnknownConnection`, `Overloaded`, `NotRunning`.
    pub async fn update_presence(&self, conn: ConnId, data: Bytes) -> Result<(), CommandError> {
        let (reply, answer) = Responder::pair();
        self.to_connection(conn, Command::UpdatePresence { conn, data, reply })?;
        answer.await.ok_or(CommandError::NotRunning)?
    }

    /// Every live WSE connection, gathered from every shard (each as it was when it answered).
    ///
    /// # Errors
    /// A shard that cannot be asked.
    pub async fn get_connections(&self) -> Result<Vec<ConnectionInfo>, CommandError> {
        let lists = self
            .gather(|reply| Command::ListConnections { reply })
            .await?;
        Ok(lists.into_iter().flatten().collect())
    }

    /// Live WebSocket connections across all shards: the admission counter, read without
    /// asking any shard.
    pub fn get_connection_count(&self) -> usize {
        self.connection_count()
    }

    /// Sends `payload` (text or binary, verbatim; an event is wrapped per connection) to every
    /// live WSE connection on every shard, subscribed or not; returns how many.
    ///
    /// # Errors
    /// A shard that cannot be asked.
    pub async fn broadcast_all(&self, payload: Payload) -> Result<usize, CommandError> {
        let frame = match &payload {
            Payload::Text(t) => codec::encode_frame(OpCode::Text, t),
            Payload::Binary(b) => codec::encode_frame(OpCode::Binary, b),
            Payload::Event(_) => {
                // Per connection (seq, encodings): what send_user does for each user.
                return Err(CommandError::InvalidEvent(
                    "broadcast_all takes text or binary",
                ));
            }
        };
        fits_queue(frame.len(), self)?;
        let counts = self
            .gather(|reply| Command::BroadcastAll {
                frame: frame.clone(),
                reply,
            })
            .await?;
        Ok(counts.into_iter().sum())
    }

    /// Starts a graceful drain ("lame duck"): every shard stops accepting and closes its
    /// connections with `close_code` (4000..=4999, so clients reconnect elsewhere; 4300 is the
    /// convention) and `reason`, then exits once they are gone or `timeout` has passed. Returns
    /// at once; [`Server::drain`] waits. The server is not running afterwards.
    ///
    /// # Errors
    /// `InvalidCloseCode`; `NotRunning` when already stopping.
    pub fn begin_drain(
        &self,
        close_code: u16,
        reason: &str,
        timeout: Duration,
    ) -> Result<(), CommandError> {
        if !crate::close::RECONNECT_CODES.contains(&close_code) {
            return Err(CommandError::InvalidCloseCode(close_code));
        }
        if !self.is_running() {
            return Err(CommandError::NotRunning);
        }
        self.draining.store(true, Ordering::Release);
        let reason: Arc<str> = Arc::from(truncate_reason(reason));
        let mut lost = false;
        {
            let mut ep = self.control.lock().unwrap_or_else(|e| e.into_inner());
            for shard in 0..self.shared.shards {
                // Nobody waits for these answers: the shards' exit is what `drain` waits for.
                let (reply, _) = Responder::pair();
                let cmd = Command::Drain {
                    close_code,
                    reason: reason.clone(),
                    timeout,
                    reply,
                };
                lost |= ep.send(shard, FabricMsg::Command(Box::new(cmd))) == Sent::Dropped;
            }
            self.flusher.flush(&mut ep);
        }
        if lost {
            // A shard whose queue is that full still drains on the shutdown flag, with
            // `server.shutdown_close_code`; the others keep the drain they began.
            self.shutdown();
        }
        Ok(())
    }

    /// [`Server::begin_drain`], then waits until every shard has exited (at most `timeout` and
    /// a second). Returns whether all did; call [`Server::stop`] afterwards to join them.
    ///
    /// # Errors
    /// As [`Server::begin_drain`].
    pub fn drain(
        &self,
        close_code: u16,
        reason: &str,
        timeout: Duration,
    ) -> Result<bool, CommandError> {
        self.begin_drain(close_code, reason, timeout)?;
        let deadline = Instant::now() + timeout + Duration::from_secs(1);
        while Instant::now() < deadline {
            if self.shards_exited() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(self.shards_exited())
    }

    /// Whether the server serves: every shard running, and no drain or shutdown requested.
    pub fn is_running(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && !self.shared.shutdown.load(Ordering::Acquire)
            && self.shards_running()
    }

    /// Whether a drain was requested ([`Server::begin_drain`]).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Figures for a health check, read from the shards' metrics without asking them.
    pub fn health_snapshot(&self) -> HealthSnapshot {
        let sum = |f: fn(&crate::metrics::ShardMetrics) -> u64| -> u64 {
            self.metrics.iter().map(|m| f(m)).sum()
        };
        let cfg = self.config();
        HealthSnapshot {
            running: self.is_running(),
            draining: self.draining.load(Ordering::Acquire),
            shards: self.shared.shards,
            connections: self.connection_count(),
            uptime: self.uptime(),
            inbound_queue_depth: sum(|m| m.app_event_queue_depth.get()),
            inbound_dropped: sum(|m| m.dropped(DropReason::AppEventOverflow).get()),
            slow_consumer_drops: sum(|m| m.dropped(DropReason::SlowConsumer).get()),
            fabric_overflow_drops: sum(|m| m.dropped(DropReason::FabricOverflow).get()),
            recovery_enabled: cfg.recovery.enabled,
            presence_enabled: cfg.presence.enabled,
            recovery_topics: sum(|m| m.recovery_topics.get()),
            recovery_bytes: sum(|m| m.recovery_bytes.get()),
            presence_topics: sum(|m| m.presence_topics.get()),
            presence_users: sum(|m| m.presence_users.get()),
        }
    }

    /// Sends `cmd` to the shard named in `conn`.
    fn to_connection(&self, conn: ConnId, cmd: Command) -> Result<(), CommandError> {
        if conn.shard() >= self.shared.shards {
            // Not an id this server gave out.
            return Err(CommandError::UnknownConnection);
        }
        self.to_shard(conn.shard(), cmd)
    }

    pub(super) fn to_shard(&self, shard: usize, cmd: Command) -> Result<(), CommandError> {
        if !self.shards_running() {
            return Err(CommandError::NotRunning);
        }
        let mut ep = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let sent = ep.send(shard, FabricMsg::Command(Box::new(cmd)));
        self.flusher.flush(&mut ep);
        match sent {
            Sent::Queued => Ok(()),
            Sent::Dropped => Err(CommandError::Overloaded),
        }
    }

    /// Sends the command `make` builds to every shard and collects their answers, in shard
    /// order.
    pub(super) async fn gather<T>(
        &self,
        make: impl Fn(Responder<T>) -> Command,
    ) -> Result<Vec<T>, CommandError> {
        if !self.shards_running() {
            return Err(CommandError::NotRunning);
        }
        let mut answers = Vec::with_capacity(self.shared.shards);
        {
            let mut ep = self.control.lock().unwrap_or_else(|e| e.into_inner());
            for shard in 0..self.shared.shards {
                let (reply, answer) = Responder::pair();
                if ep.send(shard, FabricMsg::Command(Box::new(make(reply)))) == Sent::Dropped {
                    self.flusher.flush(&mut ep);
                    return Err(CommandError::Overloaded);
                }
                answers.push(answer);
            }
            self.flusher.flush(&mut ep);
        }
        let mut out = Vec::with_capacity(answers.len());
        for answer in answers {
            out.push(answer.await.ok_or(CommandError::NotRunning)?);
        }
        Ok(out)
    }

    /// Every shard thread has finished.
    fn shards_exited(&self) -> bool {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.iter().all(|t| t.is_finished())
    }
}

/// A close reason fits in a control frame: 125 bytes less the 2-byte code, cut at a character
/// boundary.
fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// What [`Server::health_snapshot`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSnapshot {
    /// The server was started and has not been asked to stop.
    pub running: bool,
    /// A shutdown is in progress: connections are being closed.
    pub draining: bool,
    /// Shard threads (one per core).
    pub shards: usize,
    /// Live WebSocket connections, all shards.
    pub connections: usize,
    /// Time since the server started.
    pub uptime: Duration,
    /// Application events waiting in the shards' queues.
    pub inbound_queue_depth: u64,
    /// Application events dropped because a shard's queue was full.
    pub inbound_dropped: u64,
    /// Connections evicted for not reading (4413).
    pub slow_consumer_drops: u64,
    /// Cross-shard entries dropped because a queue and its overflow were full.
    pub fabric_overflow_drops: u64,
    /// `recovery.enabled` in the running configuration.
    pub recovery_enabled: bool,
    /// `presence.enabled` in the running configuration.
    pub presence_enabled: bool,
    /// Topics with a recovery history ring, all shards.
    pub recovery_topics: u64,
    /// Bytes held for recovery history, all shards (allocated at start).
    pub recovery_bytes: u64,
    /// Topics with at least one presence member, all shards.
    pub presence_topics: u64,
    /// Presence members (distinct users per topic), summed over topics.
    pub presence_users: u64,
}
