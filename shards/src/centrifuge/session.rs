//! One Centrifuge connection's state machine, sans-IO: WebSocket messages in, replies and
//! pushes out, and the operations it needs from the shard (subscribe, publish, presence,
//! history) as [`Request`]s, answered later with [`Answer`]s.
//!
//! Calling order (quinn's shape):
//! 1. [`Session::handle_message`] with each data message; [`Session::handle_timeout`] when
//!    [`Session::poll_timeout`] is due; [`Session::answer`] with each answer of the shard;
//!    [`Session::push`] with each push (a publication encoded once per format for all its
//!    subscribers, by [`encode_publication`]).
//! 2. Then drain [`Session::poll_request`] (to the shard, in order) and
//!    [`Session::poll_transmit`] (to the socket, in order).
//! 3. Any `Err(DisconnectCode)` ends the session: close the socket with its code and reason.
//!
//! Commands are handled strictly in order, each before the next is decoded, so a subscribe
//! that follows a connect in the same message sees the connection authenticated; a command
//! after a subscribe that waits for the shard waits for that answer too (the subscribe's
//! outcome can change what it gets: 105, the channel limit), so how commands are grouped into
//! messages never changes the outcome. Other requests (publish, history, presence) are
//! pipelined. Replies go out in command order: a reply that waits for the shard holds back the
//! replies and pushes queued after it (bounded by [`Settings::queued_bytes_max`]), so a
//! subscriber never sees a publication of a channel before the reply that subscribed it. A
//! fault closes at once: replies still waiting for the shard are not sent (the fault codes are
//! terminal for the clients).
//!
//! Phases: `Connecting` (only `connect` is valid; a token-expired connect leaves the session
//! here) → `Connected` (holds the user, which only a verified token or disabled auth gives) →
//! ended by an error. Never: touches sockets, the shard or a clock.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::channel::Namespaces;
use super::codec::{self, Commands, Format};
use super::codes::{DisconnectCode, ErrorCode, UnsubscribeCode};
use super::config::CentrifugeConfig;
use super::proto::{
    ClientInfo, Command, ConnectRequest, ConnectResult, Empty, Error, HistoryRequest,
    HistoryResult, PresenceRequest, PresenceResult, PresenceStatsResult, PublishRequest,
    RefreshResult, Reply, StreamPosition, SubRefreshResult, SubscribeRequest, SubscribeResult,
};
use super::requests::encode_unsubscribe;
pub use super::requests::{Answer, Request, Ticket, encode_publication};
use crate::auth::{AuthError, Authenticator};
use crate::protocol::{JSON_DEPTH_MAX, SERVER_VERSION, nests_deeper_than};

/// Time a connection has to send its connect command; past it it is closed with 3502 (stale),
/// as Centrifugo does.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one connection may have waiting for the shard; past it a command gets error 111
/// (temporary: the client retries). Above `COMMANDS_PER_MESSAGE_MAX` plus the server-side
/// subscriptions of a connect, which one message can cause at most.
pub const PENDING_MAX: usize = 4096;
/// Commands one connection may have waiting behind its pending subscribes; past it the
/// connection is closed with 3013 (too many requests). Holds a connect and a full channel
/// limit's subscribes, which centrifuge-js sends in one message, many times over.
pub const HELD_COMMANDS_MAX: usize = 4096;
/// Subscribe request flag: reject an unrecovered subscription with error 112.
pub const FLAG_REJECT_UNRECOVERED: i64 = 2;

/// What every session of a server shares: the `[centrifuge]` settings, resolved once.
#[derive(Debug)]
pub struct Settings {
    /// Interval between pings.
    pub ping_interval: Duration,
    /// Time a client has to answer a ping.
    pub pong_timeout: Duration,
    /// Time after a token's expiry before the connection is closed with 3005.
    pub expired_close_delay: Duration,
    /// Channels per connection.
    pub channel_limit: usize,
    /// Most publications one history reply or recovery returns.
    pub history_limit_max: usize,
    /// Bytes of replies and pushes a session may hold back behind a reply that waits for the
    /// shard; past it the connection is closed with 3008 (slow). `limits.max_outbound_queue_bytes`.
    pub queued_bytes_max: usize,
    /// The namespaces.
    pub namespaces: Namespaces,
}

impl Settings {
    /// From a validated `[centrifuge]` section and the connection's outbound byte cap.
    pub fn new(cfg: &CentrifugeConfig, queued_bytes_max: usize) -> Self {
        Self {
            ping_interval: cfg.ping_interval,
            pong_timeout: cfg.pong_timeout,
            expired_close_delay: cfg.expired_close_delay,
            channel_limit: cfg.channel_limit,
            history_limit_max: cfg.history_limit_max,
            queued_bytes_max,
            namespaces: Namespaces::new(cfg),
        }
    }
}

/// What a session may use while handling input, lent by the connection for one call.
#[derive(Clone, Copy)]
pub struct Cx<'a> {
    /// The shard's monotonic time for this turn.
    pub now: Instant,
    /// Unix seconds, for token expiry.
    pub wall_s: u64,
    /// The token verifier; `None` when authentication is off (connections are anonymous).
    pub auth: Option<&'a Authenticator>,
}

/// One Centrifuge connection.
pub struct Session {
    format: Format,
    /// The client id, sent in the connect reply and presence.
    client: Box<str>,
    settings: Arc<Settings>,
    phase: Phase,
    /// Channels subscribed or being subscribed, with what their subscribe asked.
    channels: HashMap<Arc<str>, ChannelState>,
    /// The `close_at` of every channel that has one, soonest first.
    sub_deadlines: BTreeSet<(Instant, Arc<str>)>,
    /// Requests waiting for an answer.
    pending: HashMap<Ticket, Pending>,
    /// Subscribes (client or server-side) waiting for an answer: commands after them wait too.
    subscribing: usize,
    /// Commands (or the decoding fault that ended a message) waiting for the subscribes,
    /// in order; at most [`HELD_COMMANDS_MAX`].
    held: VecDeque<Result<Command, DisconnectCode>>,
    next_ticket: u64,
    requests: VecDeque<Request>,
    /// Replies and pushes in order; a `Waiting` slot holds back everything after it.
    out: VecDeque<Slot>,
    /// `Waiting` slots in `out`.
    waiting: usize,
    /// Bytes in `out` behind the first `Waiting` slot, bounded by `Settings::queued_bytes_max`.
    held_bytes: usize,
    /// The connect deadline (before connect), the ping schedule and token expiry (after).
    connect_deadline: Option<Instant>,
    next_ping: Option<Instant>,
    pong_due: Option<Instant>,
    expiry_close: Option<Instant>,
}

enum Phase {
    Connecting,
    Connected(Connected),
}

/// Only a verified connection token (or disabled auth) makes one.
struct Connected {
    user: Box<str>,
    /// The token's `info`, raw JSON; empty when none.
    info: Bytes,
    /// Unix seconds at which the token expires; `None` = never.
    expires_at: Option<u64>,
}

/// A channel the connection is on, or getting on.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChannelState {
    /// The shard confirmed the subscription.
    live: bool,
    /// Subscribed with a subscription token: only then may `sub_refresh` extend it.
    token: bool,
    /// When the subscription ends because its token expired (and was not refreshed), plus
    /// [`Settings::expired_close_delay`]; also in `Session::sub_deadlines`.
    close_at: Option<Instant>,
}

enum Slot {
    Ready(Bytes),
    Waiting(Ticket),
}

/// What a waiting request will reply, and to which command.
enum Pending {
    /// A client subscribe (`connect` = None) or a server-side one of a connect.
    Subscribe {
        id: u32,
        channel: Arc<str>,
        recoverable: bool,
        positioned: bool,
        recovering: Option<StreamPosition>,
        reject_unrecovered: bool,
        data: Bytes,
        /// Seconds until its subscription token expires.
        ttl: Option<u64>,
        /// The connect reply it belongs to (server-side subscriptions).
        connect: Option<Ticket>,
    },
    /// A connect waiting for its server-side subscriptions.
    Connect {
        id: u32,
        result: ConnectResult,
        waiting: usize,
    },
    Publish {
        id: u32,
    },
    Presence {
        id: u32,
    },
    PresenceStats {
        id: u32,
    },
    History {
        id: u32,
    },
}

/// A connection token's claims (Centrifugo's names).
#[derive(Deserialize)]
struct ConnectionClaims {
    #[serde(default)]
    sub: String,
    exp: Option<u64>,
    /// Overrides `exp` for the connection's expiry; 0 = never.
    expire_at: Option<u64>,
    info: Option<Box<RawValue>>,
    /// Server-side subscriptions.
    #[serde(default)]
    channels: Vec<String>,
    /// Server-side subscriptions with options; they take precedence over `channels`.
    #[serde(default)]
    subs: BTreeMap<String, SubClaim>,
    /// Forbidden in a connection token.
    channel: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize, Default)]
struct SubClaim {
    data: Option<Box<RawValue>>,
}

/// A subscription token's claims.
#[derive(Deserialize)]
struct SubscriptionClaims {
    #[serde(default)]
    sub: String,
    channel: String,
    client: Option<String>,
    info: Option<Box<RawValue>>,
    data: Option<Box<RawValue>>,
    exp: Option<u64>,
    /// Overrides `exp`; 0 = never.
    expire_at: Option<u64>,
}

impl SubscriptionClaims {
    /// Unix seconds at which the subscription expires; `None` = never.
    fn expires_at(&self) -> Option<u64> {
        match self.expire_at {
            Some(0) => None,
            Some(at) => Some(at),
            None => self.exp,
        }
    }
}

impl Session {
    /// A session for a connection just upgraded at `now`, with its client id.
    pub fn new(format: Format, client: Box<str>, settings: Arc<Settings>, now: Instant) -> Self {
        Self {
            format,
            client,
            settings,
            phase: Phase::Connecting,
            channels: HashMap::new(),
            sub_deadlines: BTreeSet::new(),
            pending: HashMap::new(),
            subscribing: 0,
            held: VecDeque::new(),
            next_ticket: 1,
            requests: VecDeque::new(),
            out: VecDeque::new(),
            waiting: 0,
            held_bytes: 0,
            connect_deadline: Some(now + CONNECT_TIMEOUT),
            next_ping: None,
            pong_due: None,
            expiry_close: None,
        }
    }

    /// The connection's encoding.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The client id.
    pub fn client(&self) -> &str {
        &self.client
    }

    /// The user, once connected (empty for anonymous connections).
    pub fn user(&self) -> Option<&str> {
        match &self.phase {
            Phase::Connected(c) => Some(&c.user),
            Phase::Connecting => None,
        }
    }

    /// Handles one WebSocket data message. Its commands are handled in order; a command that
    /// follows a subscribe still waiting for the shard waits too (it is handled when that
    /// subscribe is answered), since the subscribe's outcome can change what it gets.
    ///
    /// # Errors
    /// The code to close the connection with; the commands before the fault were handled.
    pub fn handle_message(&mut self, cx: Cx<'_>, message: &[u8]) -> Result<(), DisconnectCode> {
        for command in Commands::new(self.format, message) {
            let command = command.map_err(|_| DisconnectCode::BadRequest);
            if self.subscribing > 0 || !self.held.is_empty() {
                if self.held.len() >= HELD_COMMANDS_MAX {
                    return Err(DisconnectCode::TooManyRequests);
                }
                let stop = command.is_err();
                self.held.push_back(command);
                if stop {
                    break;
                }
                continue;
            }
            self.handle_command(cx, command?)?;
        }
        Ok(())
    }

    /// Runs what is due at `now`: the connect timeout (3502), a missed pong (3012), token
    /// expiry (3005), the next ping.
    ///
    /// # Errors
    /// The code to close the connection with.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), DisconnectCode> {
        if self.connect_deadline.is_some_and(|d| now >= d) {
            return Err(DisconnectCode::Stale);
        }
        if self.pong_due.is_some_and(|d| now >= d) {
            return Err(DisconnectCode::NoPong);
        }
        if self.expiry_close.is_some_and(|d| now >= d) {
            return Err(DisconnectCode::ConnectionExpired);
        }
        // Subscriptions whose token expired unrefreshed: unsubscribed with 2501, which makes
        // the clients resubscribe with a new token.
        while let Some((at, channel)) = self.sub_deadlines.first().cloned()
            && now >= at
        {
            self.forget_channel(&channel);
            self.requests.push_back(Request::Unsubscribe {
                channel: Arc::clone(&channel),
            });
            self.queue(Slot::Ready(encode_unsubscribe(
                self.format,
                &channel,
                UnsubscribeCode::Expired,
            )))?;
        }
        if let Some(at) = self.next_ping
            && now >= at
        {
            // On schedule whatever else the connection does: centrifuge-python resets its
            // liveness timer only on pings.
            self.next_ping = Some(now + self.settings.ping_interval);
            if self.pong_due.is_none() {
                self.pong_due = Some(now + self.settings.pong_timeout);
            }
            self.queue(Slot::Ready(
                codec::encode(self.format, &Reply::default())
                    .map_err(|_| DisconnectCode::Internal)?,
            ))?;
        }
        Ok(())
    }

    /// When [`Session::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.connect_deadline,
            self.pong_due,
            self.expiry_close,
            self.next_ping,
            self.sub_deadlines.first().map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next operation for the shard.
    pub fn poll_request(&mut self) -> Option<Request> {
        self.requests.pop_front()
    }

    /// The next WebSocket message to send (text for JSON, binary for protobuf).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        match self.out.front()? {
            Slot::Waiting(_) => None,
            // What is in front of every waiting slot was never counted as held.
            Slot::Ready(_) => match self.out.pop_front() {
                Some(Slot::Ready(message)) => Some(message),
                _ => unreachable!("the front slot was Ready"),
            },
        }
    }

    /// Queues a push (a publication, a join or leave) behind the replies queued before it.
    ///
    /// # Errors
    /// [`DisconnectCode::Slow`] when more than [`Settings::queued_bytes_max`] is held back.
    pub fn push(&mut self, message: Bytes) -> Result<(), DisconnectCode> {
        self.queue(Slot::Ready(message))
    }

    /// The shard's answer to one of this session's requests; then the commands that waited
    /// for it.
    ///
    /// # Errors
    /// The code to close the connection with (data the encoding cannot carry: 3506; or a fault
    /// in a command that waited).
    pub fn answer(&mut self, cx: Cx<'_>, answer: Answer) -> Result<(), DisconnectCode> {
        self.apply(answer)?;
        // Commands held behind a subscribe go on once no subscribe waits.
        while self.subscribing == 0 {
            let Some(command) = self.held.pop_front() else {
                break;
            };
            self.handle_command(cx, command?)?;
        }
        Ok(())
    }

    fn apply(&mut self, answer: Answer) -> Result<(), DisconnectCode> {
        let ticket = match &answer {
            Answer::Subscribed { ticket, .. }
            | Answer::Published { ticket }
            | Answer::Presence { ticket, .. }
            | Answer::PresenceStats { ticket, .. }
            | Answer::History { ticket, .. }
            | Answer::Failed { ticket, .. } => *ticket,
        };
        let Some(pending) = self.pending.remove(&ticket) else {
            // Not ours (a bug in the caller); nothing to reply to.
            debug_assert!(false, "answer to an unknown ticket {ticket:?}");
            return Ok(());
        };
        match (pending, answer) {
            (pending @ Pending::Subscribe { .. }, answer) => {
                self.answer_subscribe(ticket, pending, answer)
            }
            (Pending::Publish { id }, Answer::Published { .. }) => self.resolve(
                ticket,
                Reply {
                    id,
                    publish: Some(Empty {}),
                    ..Default::default()
                },
            ),
            (Pending::Presence { id }, Answer::Presence { clients, .. }) => {
                let presence = clients.into_iter().map(|c| (c.client.clone(), c)).collect();
                self.resolve(
                    ticket,
                    Reply {
                        id,
                        presence: Some(PresenceResult { presence }),
                        ..Default::default()
                    },
                )
            }
            (
                Pending::PresenceStats { id },
                Answer::PresenceStats {
                    num_clients,
                    num_users,
                    ..
                },
            ) => self.resolve(
                ticket,
                Reply {
                    id,
                    presence_stats: Some(PresenceStatsResult {
                        num_clients,
                        num_users,
                    }),
                    ..Default::default()
                },
            ),
            (
                Pending::History { id },
                Answer::History {
                    publications, top, ..
                },
            ) => self.resolve(
                ticket,
                Reply {
                    id,
                    history: Some(HistoryResult {
                        publications,
                        epoch: top.epoch,
                        offset: top.offset,
                    }),
                    ..Default::default()
                },
            ),
            (
                Pending::Publish { id }
                | Pending::Presence { id }
                | Pending::PresenceStats { id }
                | Pending::History { id },
                Answer::Failed { code, .. },
            ) => self.resolve(ticket, error_reply(id, code)),
            (Pending::Connect { .. }, _) | (_, _) => {
                debug_assert!(false, "answer of the wrong kind for {ticket:?}");
                self.resolve(ticket, Reply::default())
            }
        }
    }
}

/// Commands.
impl Session {
    fn handle_command(&mut self, cx: Cx<'_>, cmd: Command) -> Result<(), DisconnectCode> {
        let Cx { now, wall_s, auth } = cx;
        let connected = matches!(self.phase, Phase::Connected(_));
        if cmd.connect.is_some() {
            if connected {
                return Err(DisconnectCode::BadRequest);
            }
        } else if !connected {
            // Anything before a successful connect, the pong included.
            return Err(DisconnectCode::BadRequest);
        }
        if cmd.id == 0 && cmd.send.is_none() {
            if cmd != Command::default() {
                return Err(DisconnectCode::BadRequest);
            }
            // The pong: only as an answer to a ping.
            if self.pong_due.take().is_none() {
                return Err(DisconnectCode::BadRequest);
            }
            return Ok(());
        }
        let id = cmd.id;
        if let Some(req) = cmd.connect {
            self.connect(now, wall_s, auth, id, req)
        } else if let Some(req) = cmd.subscribe {
            self.subscribe(cx, id, req)
        } else if let Some(req) = cmd.unsubscribe {
            if req.channel.is_empty() {
                return Err(DisconnectCode::BadRequest);
            }
            if let Some((channel, _)) = self.channels.get_key_value(req.channel.as_str()) {
                let channel = Arc::clone(channel);
                self.forget_channel(&channel);
                self.requests.push_back(Request::Unsubscribe { channel });
            }
            self.reply(Reply {
                id,
                unsubscribe: Some(Empty {}),
                ..Default::default()
            })
        } else if let Some(req) = cmd.publish {
            self.publish(id, req)
        } else if let Some(req) = cmd.presence {
            self.presence(id, req, false)
        } else if let Some(req) = cmd.presence_stats {
            self.presence(id, req, true)
        } else if let Some(req) = cmd.history {
            self.history(id, req)
        } else if cmd.ping.is_some() {
            self.reply(Reply {
                id,
                ping: Some(Empty {}),
                ..Default::default()
            })
        } else if let Some(req) = cmd.send {
            if !req.data.is_empty() && !self.is_json(&req.data) {
                return Err(DisconnectCode::BadRequest);
            }
            self.requests.push_back(Request::Send { data: req.data });
            Ok(())
        } else if let Some(req) = cmd.sub_refresh {
            self.sub_refresh(cx, id, &req.channel, &req.token)
        } else if cmd.rpc.is_some() {
            // Not served yet (docs/CENTRIFUGO.md): Centrifugo's answer without an RPC proxy.
            self.reply(error_reply(id, ErrorCode::NotAvailable))
        } else if let Some(req) = cmd.refresh {
            self.refresh(now, wall_s, auth, id, &req.token)
        } else {
            Err(DisconnectCode::BadRequest)
        }
    }

    fn connect(
        &mut self,
        now: Instant,
        wall_s: u64,
        auth: Option<&Authenticator>,
        id: u32,
        req: ConnectRequest,
    ) -> Result<(), DisconnectCode> {
        let (user, info, expires_at, server_subs) = match auth {
            None => (Box::from(""), Bytes::new(), None, BTreeMap::new()),
            Some(auth) => {
                if req.token.is_empty() {
                    // Centrifugo: "client credentials not found".
                    return Err(DisconnectCode::BadRequest);
                }
                match verify_connection(auth, &req.token, wall_s) {
                    Ok(claims) => claims,
                    Err(Refused::Expired) => {
                        return self.reply(error_reply(id, ErrorCode::TokenExpired));
                    }
                    Err(Refused::Invalid) => return Err(DisconnectCode::InvalidToken),
                }
            }
        };
        // Server-side subscriptions: `subs` first, then `channels` not already in it.
        for channel in server_subs.keys() {
            match self.settings.namespaces.resolve(channel) {
                Ok(_) if !channel.is_empty() => {}
                Ok(_) => return Err(DisconnectCode::BadRequest),
                Err(code) => return self.reply(error_reply(id, code)),
            }
        }
        if server_subs.len() > self.settings.channel_limit {
            return self.reply(error_reply(id, ErrorCode::LimitExceeded));
        }
        let ttl = expires_at.map(|at| at.saturating_sub(wall_s));
        self.phase = Phase::Connected(Connected {
            user,
            info,
            expires_at,
        });
        self.connect_deadline = None;
        self.next_ping = Some(now + self.settings.ping_interval);
        self.expiry_close =
            ttl.map(|ttl| now + Duration::from_secs(ttl) + self.settings.expired_close_delay);
        let result = ConnectResult {
            client: self.client.to_string(),
            version: SERVER_VERSION.to_owned(),
            expires: ttl.is_some(),
            ttl: ttl.map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
            ping: u32::try_from(self.settings.ping_interval.as_secs()).unwrap_or(u32::MAX),
            pong: true,
            ..Default::default()
        };
        if server_subs.is_empty() {
            return self.reply(Reply {
                id,
                connect: Some(result),
                ..Default::default()
            });
        }
        let connect = self.ticket();
        self.pending.insert(
            connect,
            Pending::Connect {
                id,
                result,
                waiting: server_subs.len(),
            },
        );
        self.queue(Slot::Waiting(connect))?;
        for (channel, data) in server_subs {
            let asked = req.subs.get(&channel);
            let channel: Arc<str> = channel.into();
            let ns = self
                .settings
                .namespaces
                .resolve(&channel)
                .map_err(|_| DisconnectCode::Internal)?
                .namespace
                .clone();
            // The token is trusted: no permission check, as in Centrifugo.
            let recoverable =
                ns.has_history() && (ns.force_recovery || asked.is_some_and(|s| s.recover));
            let positioned = ns.has_history() && (recoverable || ns.force_positioning);
            let recovering = asked
                .filter(|s| s.recover && recoverable)
                .map(|s| StreamPosition {
                    offset: s.offset,
                    epoch: s.epoch.clone(),
                });
            self.start_subscribe(
                0,
                channel,
                SubscribeOptions {
                    recoverable,
                    positioned,
                    recovering,
                    reject_unrecovered: false,
                    presence: ns.presence,
                    join_leave: ns.join_leave && ns.force_push_join_leave,
                    close_at: None,
                    granted: Granted {
                        data,
                        ..Granted::default()
                    },
                },
                Some(connect),
            );
        }
        Ok(())
    }

    fn refresh(
        &mut self,
        now: Instant,
        wall_s: u64,
        auth: Option<&Authenticator>,
        id: u32,
        token: &str,
    ) -> Result<(), DisconnectCode> {
        let Some(auth) = auth else {
            // Nothing expires without auth.
            return self.reply(error_reply(id, ErrorCode::NotAvailable));
        };
        if token.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        let claims = match verify_connection(auth, token, wall_s) {
            Ok(claims) => claims,
            Err(Refused::Expired) => return self.reply(error_reply(id, ErrorCode::TokenExpired)),
            Err(Refused::Invalid) => return Err(DisconnectCode::InvalidToken),
        };
        let Phase::Connected(connected) = &mut self.phase else {
            unreachable!("commands other than connect need a connected session");
        };
        if *claims.0 != *connected.user {
            return Err(DisconnectCode::InvalidToken);
        }
        connected.expires_at = claims.2;
        let ttl = claims.2.map(|at| at.saturating_sub(wall_s));
        self.expiry_close =
            ttl.map(|ttl| now + Duration::from_secs(ttl) + self.settings.expired_close_delay);
        self.reply(Reply {
            id,
            refresh: Some(RefreshResult {
                client: self.client.to_string(),
                version: SERVER_VERSION.to_owned(),
                expires: ttl.is_some(),
                ttl: ttl.map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
            }),
            ..Default::default()
        })
    }

    fn sub_refresh(
        &mut self,
        cx: Cx<'_>,
        id: u32,
        channel: &str,
        token: &str,
    ) -> Result<(), DisconnectCode> {
        if channel.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        let Some((name, state)) = self.channels.get_key_value(channel) else {
            // Must be subscribed to refresh.
            return self.reply(error_reply(id, ErrorCode::PermissionDenied));
        };
        if !state.token {
            // Nothing to refresh: it was not subscribed with a token (Centrifuge: "server-side
            // sub refresh expected").
            return Err(DisconnectCode::BadRequest);
        }
        if token.is_empty() {
            return self.reply(error_reply(id, ErrorCode::BadRequest));
        }
        let (name, old) = (Arc::clone(name), state.close_at);
        let user = self.user().unwrap_or_default().to_owned();
        let claims = match self.verify_subscription(cx.auth, token, channel, &user, cx.wall_s) {
            Ok(claims) => claims,
            Err(ErrorCode::TokenExpired) => return self.reply(error_reply(id, ErrorCode::Expired)),
            Err(code) => return self.reply(error_reply(id, code)),
        };
        let ttl = claims.expires_at().map(|at| at.saturating_sub(cx.wall_s));
        let close_at =
            ttl.map(|ttl| cx.now + Duration::from_secs(ttl) + self.settings.expired_close_delay);
        if let Some(at) = old {
            self.sub_deadlines.remove(&(at, Arc::clone(&name)));
        }
        if let Some(at) = close_at {
            self.sub_deadlines.insert((at, Arc::clone(&name)));
        }
        if let Some(state) = self.channels.get_mut(&name) {
            state.close_at = close_at;
        }
        self.reply(Reply {
            id,
            sub_refresh: Some(SubRefreshResult {
                expires: ttl.is_some(),
                ttl: ttl.map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
            }),
            ..Default::default()
        })
    }

    fn subscribe(
        &mut self,
        cx: Cx<'_>,
        id: u32,
        req: SubscribeRequest,
    ) -> Result<(), DisconnectCode> {
        let Cx { now, wall_s, auth } = cx;
        if req.channel.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        if !req.delta.is_empty() && req.delta != "fossil" {
            return Err(DisconnectCode::BadRequest);
        }
        if req.kind != 0 || req.tf.is_some() {
            // Map and shared-poll subscriptions, tags filters: not served.
            return self.reply(error_reply(id, ErrorCode::NotAvailable));
        }
        let settings = Arc::clone(&self.settings);
        let channel = match settings.namespaces.resolve(&req.channel) {
            Ok(channel) => channel,
            Err(code) => return self.reply(error_reply(id, code)),
        };
        if self.channels.contains_key(req.channel.as_str()) {
            return self.reply(error_reply(id, ErrorCode::AlreadySubscribed));
        }
        if self.channels.len() >= settings.channel_limit {
            return self.reply(error_reply(id, ErrorCode::LimitExceeded));
        }
        let user = self.user().unwrap_or_default().to_owned();
        let mut granted = Granted::default();
        if !req.token.is_empty() {
            // A subscription token grants the channel whatever the namespace allows clients.
            match self.verify_subscription(auth, &req.token, &req.channel, &user, wall_s) {
                Ok(claims) => {
                    granted = Granted {
                        token: true,
                        ttl: claims.expires_at().map(|at| at.saturating_sub(wall_s)),
                        chan_info: claims.info.as_deref().map_or_else(Bytes::new, raw_bytes),
                        data: claims.data.as_deref().map_or_else(Bytes::new, raw_bytes),
                    };
                }
                Err(code) => return self.reply(error_reply(id, code)),
            }
        } else if channel.private
            || !channel.namespace.allow_subscribe_for_client
            || !channel.allows_user(&user)
        {
            return self.reply(error_reply(id, ErrorCode::PermissionDenied));
        }
        let ns = channel.namespace;
        let may_recover = ns.force_recovery || ns.allow_history_for_client;
        let recoverable = ns.has_history()
            && (ns.force_recovery || (req.recoverable || req.recover) && may_recover);
        let positioned =
            ns.has_history() && (recoverable || ns.force_positioning || req.positioned);
        let recovering = (req.recover && recoverable).then(|| StreamPosition {
            offset: req.offset,
            epoch: req.epoch.clone(),
        });
        let options = SubscribeOptions {
            recoverable,
            positioned,
            recovering,
            reject_unrecovered: req.flag & FLAG_REJECT_UNRECOVERED != 0,
            presence: ns.presence,
            join_leave: ns.join_leave && (req.join_leave || ns.force_push_join_leave),
            close_at: granted
                .ttl
                .map(|ttl| now + Duration::from_secs(ttl) + self.settings.expired_close_delay),
            granted,
        };
        if self.pending.len() >= PENDING_MAX {
            return self.reply(error_reply(id, ErrorCode::TooManyRequests));
        }
        let channel: Arc<str> = req.channel.into();
        let ticket = self.start_subscribe(id, channel, options, None);
        self.queue(Slot::Waiting(ticket))
    }

    fn publish(&mut self, id: u32, req: PublishRequest) -> Result<(), DisconnectCode> {
        if req.channel.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        if req.kind != 0 {
            return self.reply(error_reply(id, ErrorCode::NotAvailable));
        }
        let settings = Arc::clone(&self.settings);
        let channel = match settings.namespaces.resolve(&req.channel) {
            Ok(channel) => channel,
            Err(code) => return self.reply(error_reply(id, code)),
        };
        if !channel.namespace.allow_publish_for_client {
            return self.reply(error_reply(id, ErrorCode::PermissionDenied));
        }
        // The topic space is JSON: WSE subscribers and JSON clients get the data embedded.
        if req.data.is_empty() || !self.is_json(&req.data) {
            return self.reply(error_reply(id, ErrorCode::BadRequest));
        }
        let info = self.client_info();
        let Some(ticket) = self.wait(Pending::Publish { id })? else {
            return self.reply(error_reply(id, ErrorCode::TooManyRequests));
        };
        self.requests.push_back(Request::Publish {
            ticket,
            channel: req.channel.into(),
            data: req.data,
            info,
        });
        Ok(())
    }

    fn presence(
        &mut self,
        id: u32,
        req: PresenceRequest,
        stats: bool,
    ) -> Result<(), DisconnectCode> {
        if req.channel.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        let settings = Arc::clone(&self.settings);
        let ns = match settings.namespaces.resolve(&req.channel) {
            Ok(channel) => channel.namespace,
            Err(code) => return self.reply(error_reply(id, code)),
        };
        if !ns.presence {
            return self.reply(error_reply(id, ErrorCode::NotAvailable));
        }
        if !ns.allow_presence_for_client {
            return self.reply(error_reply(id, ErrorCode::PermissionDenied));
        }
        let pending = if stats {
            Pending::PresenceStats { id }
        } else {
            Pending::Presence { id }
        };
        let Some(ticket) = self.wait(pending)? else {
            return self.reply(error_reply(id, ErrorCode::TooManyRequests));
        };
        let channel = req.channel.into();
        self.requests.push_back(if stats {
            Request::PresenceStats { ticket, channel }
        } else {
            Request::Presence { ticket, channel }
        });
        Ok(())
    }

    fn history(&mut self, id: u32, req: HistoryRequest) -> Result<(), DisconnectCode> {
        if req.channel.is_empty() {
            return Err(DisconnectCode::BadRequest);
        }
        let settings = Arc::clone(&self.settings);
        let ns = match settings.namespaces.resolve(&req.channel) {
            Ok(channel) => channel.namespace,
            Err(code) => return self.reply(error_reply(id, code)),
        };
        if !ns.has_history() {
            return self.reply(error_reply(id, ErrorCode::NotAvailable));
        }
        if !ns.allow_history_for_client {
            return self.reply(error_reply(id, ErrorCode::PermissionDenied));
        }
        // 0 = only the top; negative = all, capped like any limit.
        let limit = usize::try_from(req.limit)
            .unwrap_or(usize::MAX)
            .min(settings.history_limit_max);
        let Some(ticket) = self.wait(Pending::History { id })? else {
            return self.reply(error_reply(id, ErrorCode::TooManyRequests));
        };
        self.requests.push_back(Request::History {
            ticket,
            channel: req.channel.into(),
            limit,
            since: req.since,
            reverse: req.reverse,
        });
        Ok(())
    }
}

/// What a subscribe asked for, once checked against the namespace.
struct SubscribeOptions {
    recoverable: bool,
    positioned: bool,
    recovering: Option<StreamPosition>,
    reject_unrecovered: bool,
    presence: bool,
    join_leave: bool,
    close_at: Option<Instant>,
    granted: Granted,
}

/// What a subscription token granted (all empty without one).
#[derive(Default)]
struct Granted {
    token: bool,
    /// Seconds until the token expires; `None` = never.
    ttl: Option<u64>,
    /// The token's `info`, raw JSON (`chan_info` in presence and join/leave).
    chan_info: Bytes,
    /// The token's `data`, raw JSON, returned in the subscribe result.
    data: Bytes,
}

/// Helpers.
impl Session {
    /// Drops a channel and its expiry; whether it was there.
    fn forget_channel(&mut self, channel: &Arc<str>) -> bool {
        let Some(state) = self.channels.remove(channel) else {
            return false;
        };
        if let Some(at) = state.close_at {
            self.sub_deadlines.remove(&(at, Arc::clone(channel)));
        }
        true
    }

    /// A subscription token for `channel`, for this user (and this client, if it names one).
    fn verify_subscription(
        &self,
        auth: Option<&Authenticator>,
        token: &str,
        channel: &str,
        user: &str,
        wall_s: u64,
    ) -> Result<SubscriptionClaims, ErrorCode> {
        let Some(auth) = auth else {
            return Err(ErrorCode::PermissionDenied);
        };
        match auth.verify_as::<SubscriptionClaims>(token) {
            Ok(claims) if claims.expires_at().is_some_and(|at| at <= wall_s) => {
                Err(ErrorCode::TokenExpired)
            }
            Ok(claims)
                if claims.channel == channel
                    && claims.sub == user
                    && claims.client.as_deref().is_none_or(|c| c == &*self.client) =>
            {
                Ok(claims)
            }
            Err(AuthError::Expired) => Err(ErrorCode::TokenExpired),
            Ok(_) | Err(_) => Err(ErrorCode::PermissionDenied),
        }
    }

    fn ticket(&mut self) -> Ticket {
        let t = Ticket(self.next_ticket);
        self.next_ticket += 1;
        t
    }

    /// Records a pending request and holds the reply's place; `None` when too many wait.
    fn wait(&mut self, pending: Pending) -> Result<Option<Ticket>, DisconnectCode> {
        if self.pending.len() >= PENDING_MAX {
            return Ok(None);
        }
        let ticket = self.ticket();
        self.pending.insert(ticket, pending);
        self.queue(Slot::Waiting(ticket))?;
        Ok(Some(ticket))
    }

    fn start_subscribe(
        &mut self,
        id: u32,
        channel: Arc<str>,
        o: SubscribeOptions,
        connect: Option<Ticket>,
    ) -> Ticket {
        let ticket = self.ticket();
        let presence = o.presence.then(|| {
            let mut info = self.client_info();
            info.chan_info = o.granted.chan_info.clone();
            info
        });
        self.channels.insert(
            Arc::clone(&channel),
            ChannelState {
                live: false,
                token: o.granted.token,
                close_at: o.close_at,
            },
        );
        if let Some(at) = o.close_at {
            self.sub_deadlines.insert((at, Arc::clone(&channel)));
        }
        self.subscribing += 1;
        self.requests.push_back(Request::Subscribe {
            ticket,
            channel: Arc::clone(&channel),
            stream: o.positioned,
            recover: o.recovering.clone(),
            presence,
            join_leave: o.join_leave,
        });
        self.pending.insert(
            ticket,
            Pending::Subscribe {
                id,
                channel,
                recoverable: o.recoverable,
                positioned: o.positioned,
                recovering: o.recovering,
                reject_unrecovered: o.reject_unrecovered,
                data: o.granted.data,
                ttl: o.granted.ttl,
                connect,
            },
        );
        ticket
    }

    fn answer_subscribe(
        &mut self,
        ticket: Ticket,
        pending: Pending,
        answer: Answer,
    ) -> Result<(), DisconnectCode> {
        let Pending::Subscribe {
            id,
            channel,
            recoverable,
            positioned,
            recovering,
            reject_unrecovered,
            data,
            ttl,
            connect,
        } = pending
        else {
            unreachable!("called with a subscribe");
        };
        self.subscribing -= 1;
        let outcome = match answer {
            Answer::Subscribed { top, recovery, .. } => {
                let top = top.unwrap_or_default();
                let mut result = SubscribeResult {
                    recoverable,
                    positioned,
                    data,
                    expires: ttl.is_some(),
                    ttl: ttl.map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
                    ..Default::default()
                };
                if positioned {
                    result.epoch = top.epoch.clone();
                    result.offset = top.offset;
                }
                if let Some(asked) = recovering {
                    result.was_recovering = true;
                    let (recovered, publications) = recovery.unwrap_or_default();
                    let epoch_ok = asked.epoch.is_empty() || asked.epoch == top.epoch;
                    result.recovered = recovered && epoch_ok;
                    if result.recovered {
                        // The clients catch up through the publications from where they were.
                        result.offset = asked.offset;
                        result.publications = publications;
                    }
                }
                if reject_unrecovered && result.was_recovering && !result.recovered {
                    Err(ErrorCode::UnrecoverablePosition)
                } else {
                    Ok(result)
                }
            }
            Answer::Failed { code, .. } => Err(code),
            _ => Err(ErrorCode::Internal),
        };
        match &outcome {
            Ok(_) => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    state.live = true;
                }
            }
            Err(_) => {
                // The shard may have subscribed (112 comes after it did): undo it.
                if self.forget_channel(&channel) {
                    self.requests.push_back(Request::Unsubscribe {
                        channel: Arc::clone(&channel),
                    });
                }
            }
        }
        match connect {
            None => self.resolve(
                ticket,
                match outcome {
                    Ok(result) => Reply {
                        id,
                        subscribe: Some(result),
                        ..Default::default()
                    },
                    Err(code) => error_reply(id, code),
                },
            ),
            Some(connect) => self.server_side_done(connect, &channel, outcome),
        }
    }

    /// A server-side subscription of a connect got its answer; the connect reply goes once
    /// all have.
    fn server_side_done(
        &mut self,
        connect: Ticket,
        channel: &str,
        outcome: Result<SubscribeResult, ErrorCode>,
    ) -> Result<(), DisconnectCode> {
        let Some(Pending::Connect {
            id,
            result,
            waiting,
        }) = self.pending.get_mut(&connect)
        else {
            return Ok(());
        };
        match outcome {
            Ok(sub) => {
                result.subs.insert(channel.to_owned(), sub);
            }
            // A server-side subscription the server could not make: the connection cannot be
            // what the token says.
            Err(_) => return Err(DisconnectCode::Internal),
        }
        *waiting -= 1;
        if *waiting > 0 {
            return Ok(());
        }
        let reply = Reply {
            id: *id,
            connect: Some(std::mem::take(result)),
            ..Default::default()
        };
        self.pending.remove(&connect);
        self.resolve(connect, reply)
    }

    fn client_info(&self) -> ClientInfo {
        let (user, info) = match &self.phase {
            Phase::Connected(c) => (c.user.to_string(), c.info.clone()),
            Phase::Connecting => (String::new(), Bytes::new()),
        };
        ClientInfo {
            user,
            client: self.client.to_string(),
            conn_info: info,
            chan_info: Bytes::new(),
        }
    }

    /// Whether protobuf-borne data is JSON we can relay (JSON commands were parsed whole).
    fn is_json(&self, data: &[u8]) -> bool {
        match self.format {
            Format::Json => true,
            Format::Protobuf => {
                !nests_deeper_than(data, JSON_DEPTH_MAX)
                    && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
            }
        }
    }

    fn reply(&mut self, reply: Reply) -> Result<(), DisconnectCode> {
        let message = codec::encode(self.format, &reply)
            .map_err(|_| DisconnectCode::InappropriateProtocol)?;
        self.queue(Slot::Ready(message))
    }

    /// Fills the slot `ticket` held with `reply`.
    fn resolve(&mut self, ticket: Ticket, reply: Reply) -> Result<(), DisconnectCode> {
        let message = codec::encode(self.format, &reply)
            .map_err(|_| DisconnectCode::InappropriateProtocol)?;
        let Some(at) = self
            .out
            .iter()
            .position(|s| matches!(s, Slot::Waiting(t) if *t == ticket))
        else {
            return Ok(());
        };
        self.out[at] = Slot::Ready(message);
        self.waiting -= 1;
        self.recount_held();
        Ok(())
    }

    fn queue(&mut self, slot: Slot) -> Result<(), DisconnectCode> {
        match &slot {
            Slot::Waiting(_) => self.waiting += 1,
            Slot::Ready(m) if self.waiting > 0 => {
                self.held_bytes += m.len();
                if self.held_bytes > self.settings.queued_bytes_max {
                    return Err(DisconnectCode::Slow);
                }
            }
            Slot::Ready(_) => {}
        }
        self.out.push_back(slot);
        Ok(())
    }

    fn recount_held(&mut self) {
        if self.waiting == 0 {
            self.held_bytes = 0;
            return;
        }
        let mut held = 0;
        let mut behind = false;
        for slot in &self.out {
            match slot {
                Slot::Waiting(_) => behind = true,
                Slot::Ready(m) if behind => held += m.len(),
                Slot::Ready(_) => {}
            }
        }
        self.held_bytes = held;
    }
}

enum Refused {
    Expired,
    Invalid,
}

/// The user, info, expiry and server-side subscriptions (channel → token `data`) of a
/// connection token.
type Verified = (Box<str>, Bytes, Option<u64>, BTreeMap<String, Bytes>);

fn verify_connection(auth: &Authenticator, token: &str, wall_s: u64) -> Result<Verified, Refused> {
    let claims = match auth.verify_as::<ConnectionClaims>(token) {
        Ok(claims) => claims,
        Err(AuthError::Expired) => return Err(Refused::Expired),
        Err(_) => return Err(Refused::Invalid),
    };
    if claims.channel.is_some() {
        return Err(Refused::Invalid);
    }
    let expires_at = match claims.expire_at {
        Some(0) => None,
        Some(at) => Some(at),
        None => claims.exp,
    };
    // jsonwebtoken allowed the leeway; the connection itself has no time left.
    if expires_at.is_some_and(|at| at <= wall_s) {
        return Err(Refused::Expired);
    }
    let mut subs: BTreeMap<String, Bytes> = claims
        .subs
        .into_iter()
        .map(|(channel, sub)| {
            (
                channel,
                sub.data.map_or_else(Bytes::new, |raw| raw_bytes(&raw)),
            )
        })
        .collect();
    for channel in claims.channels {
        subs.entry(channel).or_default();
    }
    Ok((
        claims.sub.into(),
        claims.info.as_deref().map_or_else(Bytes::new, raw_bytes),
        expires_at,
        subs,
    ))
}

fn raw_bytes(raw: &RawValue) -> Bytes {
    Bytes::from(raw.get().to_owned())
}

fn error_reply(id: u32, code: ErrorCode) -> Reply {
    Reply {
        id,
        error: Some(Error {
            code: code.code(),
            message: code.message().to_owned(),
            temporary: code.temporary(),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
