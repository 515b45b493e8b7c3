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
    RefreshResult, Reply, RpcRequest, RpcResult, StreamPosition, SubRefreshResult,
    SubscribeRequest, SubscribeResult,
};
use super::requests::encode_unsubscribe;
pub use super::requests::{Answer, Request, RpcError, Ticket, encode_publication};
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
/// `rpc` calls one connection may have waiting for the application's backend; past it an
/// `rpc` gets error 106 (limit exceeded).
pub const RPC_PENDING_MAX: usize = 64;
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
    /// Time the application's backend has to answer an `rpc`; past it the client gets error
    /// 100 (temporary).
    pub rpc_timeout: Duration,
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
            rpc_timeout: cfg.rpc_timeout,
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
    /// `rpc` calls waiting for the backend, oldest first (their deadlines in that order too):
    /// (ticket, command id, deadline); at most [`RPC_PENDING_MAX`]. They hold no slot in
    /// `out`: an rpc reply goes out when it comes (the clients match replies by id), so a slow
    /// backend never holds back the connection's other replies and publications.
    rpcs: VecDeque<(Ticket, u32, Instant)>,
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
            rpcs: VecDeque::new(),
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
        // Calls the backend did not answer in time: Centrifugo's answer to a proxy that failed.
        while let Some(&(_, id, at)) = self.rpcs.front()
            && now >= at
        {
            self.rpcs.pop_front();
            self.reply(error_reply(id, ErrorCode::Internal))?;
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
            self.rpcs.front().map(|(_, _, at)| *at),
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

    /// Whether replies or pushes are held back behind a reply that waits for the shard: a push
    /// must then go through [`Session::push`] to keep its place; otherwise it may go straight
    /// to the socket (already framed, shared with the channel's other subscribers).
    pub fn holds_output(&self) -> bool {
        !self.out.is_empty()
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

    /// Whether `ticket` is an `rpc` still waiting for the backend (not answered, not timed out).
    pub fn rpc_pending(&self, ticket: Ticket) -> bool {
        self.rpcs.iter().any(|(t, _, _)| *t == ticket)
    }

    /// The answer to a waiting `rpc`: its reply goes out now, behind what is queued.
    fn answer_rpc(&mut self, at: usize, answer: Answer) -> Result<(), DisconnectCode> {
        let Some((_, id, _)) = self.rpcs.remove(at) else {
            return Ok(());
        };
        let reply = match answer {
            Answer::Rpc {
                result: Ok(data), ..
            } => Reply {
                id,
                rpc: Some(RpcResult { data }),
                ..Default::default()
            },
            Answer::Rpc { result: Err(e), .. } => Reply {
                id,
                error: Some(Error {
                    code: e.code,
                    message: e.message,
                    temporary: false,
                }),
                ..Default::default()
            },
            Answer::Failed { code, .. } => error_reply(id, code),
            _ => {
                debug_assert!(false, "answer of the wrong kind for an rpc");
                error_reply(id, ErrorCode::Internal)
            }
        };
        self.reply(reply)
    }

    fn apply(&mut self, answer: Answer) -> Result<(), DisconnectCode> {
        let ticket = match &answer {
            Answer::Subscribed { ticket, .. }
            | Answer::Published { ticket }
            | Answer::Presence { ticket, .. }
            | Answer::PresenceStats { ticket, .. }
            | Answer::History { ticket, .. }
            | Answer::Rpc { ticket, .. }
            | Answer::Failed { ticket, .. } => *ticket,
        };
        if let Some(at) = self.rpcs.iter().position(|(t, _, _)| *t == ticket) {
            return self.answer_rpc(at, answer);
        }
        if matches!(answer, Answer::Rpc { .. }) {
            // Timed out meanwhile (the client already has its error), or not ours.
            return Ok(());
        }
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

mod commands;
mod helpers;

use helpers::error_reply;

#[cfg(test)]
mod tests;
