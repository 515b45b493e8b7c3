//! Application commands: what the control participant (the binary's server API, or an
//! embedding application through [`crate::Server`]) asks of the shards, and their answers.
//!
//! Owns: the command and answer types, the command errors, and the envelope of
//! [`Server::send_event`](crate::Server::send_event). Never: executes a command (the shard's
//! `commands` module does) or routes one (the server does).
//!
//! Routing: a command about a connection goes to the shard named in its id
//! ([`ConnId::shard`]); a command about a user, every connection or a count goes to every shard,
//! and the server combines their answers. No global table is consulted, and each shard answers
//! through the [`Responder`] the command carries.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::close::{APPLICATION_CODES, CloseCode};
use crate::conn::ConnId;
use crate::inbound::AppEvent;
use crate::protocol::{FailedTopic, RecoveryInfo};
use crate::reply::Responder;

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No live connection has this id (never had, or has gone).
    #[error("no such connection")]
    UnknownConnection,
    /// The topic is empty, too long or has characters topics may not have.
    #[error("invalid topic: {0}")]
    InvalidTopic(&'static str),
    /// The event is not a JSON object with a string `t`, or is over the size limit.
    #[error("invalid event: {0}")]
    InvalidEvent(&'static str),
    /// Close codes the application may send: 1000, or 3000..=4999.
    #[error("invalid close code {0}: use 1000 or 3000..=4999")]
    InvalidCloseCode(u16),
    /// The connection has no `rpc` with this number waiting for a reply (never made, answered
    /// already, or timed out).
    #[error("no such rpc waiting for a reply")]
    UnknownRequest,
    /// The message did not fit in the connection's outbound queue
    /// (`limits.max_outbound_queue_bytes`); the connection was closed with 4413.
    #[error("the connection's outbound queue is full; it was closed with 4413")]
    SlowConsumer,
    /// A shard's queue from the control plane is full.
    #[error("a shard's queue is full")]
    Overloaded,
    /// The server is stopping or stopped.
    #[error("the server is not running")]
    NotRunning,
}

/// A frame as the application gives it.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Sent as one text frame, verbatim (UTF-8 by construction).
    Text(Bytes),
    /// Sent as one binary frame, verbatim.
    Binary(Bytes),
    /// Wrapped in the envelope (see [`OutboundEvent`]) and encoded per connection.
    Event(Arc<OutboundEvent>),
}

/// What a send did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendOutcome {
    /// Bytes queued (the frame, header included); 0 for a duplicate.
    pub bytes: usize,
    /// The event id was sent to this connection recently: nothing was sent (see
    /// [`crate::shard::SEND_DEDUP_WINDOW`]).
    pub duplicate: bool,
}

/// A subscription the application makes for a connection.
#[derive(Debug, Default, Clone)]
pub struct AppSubscribe {
    /// Topics to subscribe to (each checked as a client's would be).
    pub topics: Vec<String>,
    /// Presence data (JSON text) when presence is on; `{}` when absent.
    pub presence: Option<Bytes>,
    /// Join this queue group instead of receiving every publication: one member of the group
    /// gets each publication, unstamped; `recover` and `presence` do not apply (see
    /// [`crate::queue_groups`] and PROTOCOL.md).
    pub queue_group: Option<Arc<str>>,
    /// Replay from these positions: (topic, epoch if known, inclusive last offset).
    pub recover: Vec<(String, Option<u32>, u64)>,
}

/// What a subscription did, topic by topic (as the client acknowledgement reports it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeOutcome {
    /// Topics now subscribed (including ones the connection was already on).
    pub success_topics: Vec<String>,
    /// Topics refused, each with the reason the client acknowledgement gives.
    pub failed_topics: Vec<FailedTopic>,
    /// Per topic a recovery was asked for.
    pub recovery: Vec<(String, RecoveryInfo)>,
}

/// One live connection, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The connection's id (its first byte is the shard).
    pub id: ConnId,
    /// Its user: the token's `sub`, or the connection id when authentication is off.
    pub user_id: String,
    /// Topics it is subscribed to.
    pub topics: usize,
}

/// A topic's subscribers, on one shard or summed over all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicSubscribers {
    /// Every subscriber, queue-group members included.
    pub count: usize,
    /// Members of each queue group, by group name (in name order once summed).
    pub queue_groups: Vec<(String, usize)>,
}

/// The topics one shard owns (each topic has one owner, so the shards' answers add up), or
/// their sum over all shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicStats {
    /// Topics with a subscriber or queue-group member on any shard.
    pub subscribed: usize,
    /// The topics with the most publications since their owner started keeping them (it forgets
    /// a topic nothing holds: no subscriber, member, history or presence), most first, by name
    /// among equals; as many as were asked for.
    pub publications: Vec<(Arc<str>, u64)>,
}

type Reply<T> = Responder<Result<T, CommandError>>;

/// A command for one shard. Every variant carries the responder its answer goes to.
#[derive(Debug)]
pub enum Command {
    /// Queue `payload` to `conn` (under the outbound cap). Answer: the outcome.
    Send {
        /// The target connection.
        conn: ConnId,
        /// The frame to queue.
        payload: Payload,
        /// Answered with the outcome, or why nothing was queued.
        reply: Reply<SendOutcome>,
    },
    /// Queue `payload` to every local connection of `user`. Answer: how many got it (duplicates
    /// excluded).
    SendUser {
        /// The user id (JWT `sub`) whose connections get it.
        user: Arc<str>,
        /// The frame to queue to each.
        payload: Payload,
        /// Answered with how many connections got it.
        reply: Responder<usize>,
    },
    /// The backend's reply to `conn`'s `rpc` number `request` (an `rpc` event's): its data
    /// (JSON text) or an error, sent to the client.
    RpcReply {
        /// The connection that made the call.
        conn: ConnId,
        /// The event's `request`.
        request: u64,
        /// The result's data, or the error the client gets.
        result: Result<Bytes, crate::centrifuge::RpcError>,
        /// Answered once the reply is queued.
        reply: Reply<()>,
    },
    /// Close `conn` with `code` and `reason`.
    Disconnect {
        /// The connection to close.
        conn: ConnId,
        /// Close code: 1000 or 3000..=4999 (checked before the command is sent), or 1005 for a
        /// close frame without status (`Server::disconnect_without_status`).
        code: u16,
        /// Close reason, cut to fit a control frame.
        reason: Box<str>,
        /// Answered once the close frame is queued.
        reply: Reply<()>,
    },
    /// Refresh `conn`'s expiry, or expire it (Centrifugo's server API `refresh`). Answer:
    /// whether it is a Centrifuge connection (a WSE one is left as it is).
    Refresh {
        /// The connection to refresh.
        conn: ConnId,
        /// Its new expiry, Unix seconds (0: never); `None`: unchanged.
        expire_at: Option<u64>,
        /// Close it now with 3005.
        expired: bool,
        /// Answered once done.
        reply: Reply<bool>,
    },
    /// Subscribe `conn` (its subscribe ACL and limits apply, as to a client request); answered
    /// once the topics' owners have (as a client acknowledgement would be), not sent to the
    /// client.
    Subscribe {
        /// The connection to subscribe.
        conn: ConnId,
        /// Topics, presence data, queue group and recovery positions.
        request: Box<AppSubscribe>,
        /// Answered per topic, once every owner has confirmed.
        reply: Reply<SubscribeOutcome>,
    },
    /// Unsubscribe `conn` from `topics` (every topic when `None`). Answer: the topics it left.
    Unsubscribe {
        /// The connection to unsubscribe.
        conn: ConnId,
        /// The topics to leave; `None` leaves all.
        topics: Option<Vec<String>>,
        /// Answered with the topics actually left.
        reply: Reply<Vec<String>>,
    },
    /// Replace `conn`'s subscribe ACL; subscriptions the new ACL refuses are dropped. Answer:
    /// the topics dropped.
    SetAcl {
        /// The connection whose rights change.
        conn: ConnId,
        /// Topic globs it may subscribe to; `None` allows every topic.
        allow: Option<Vec<String>>,
        /// Topic globs it may not subscribe to (deny wins over allow).
        deny: Vec<String>,
        /// Answered with the subscriptions dropped because the new ACL refuses them.
        reply: Reply<Vec<String>>,
    },
    /// New presence data for every topic `conn` is present in, as its own `presence_update`
    /// message would set it (`presence_update` events follow). Answer: done, or the connection
    /// is unknown.
    UpdatePresence {
        /// The connection whose presence data changes.
        conn: ConnId,
        /// The new data, a JSON object's text (the caller checks its size).
        data: Bytes,
        /// Answered once the update has been sent to the topics' owners.
        reply: Reply<()>,
    },
    /// The shard's live connections.
    ListConnections {
        /// Answered with this shard's live connections.
        reply: Responder<Vec<ConnectionInfo>>,
    },
    /// The shard's subscribers of `topic` (queue-group members included), and its members of
    /// each of the topic's queue groups.
    SubscriberCount {
        /// The topic to count.
        topic: Arc<str>,
        /// Answered with this shard's figures (the caller sums the shards).
        reply: Responder<TopicSubscribers>,
    },
    /// Answer with this shard's topics that have a subscriber (queue-group members included)
    /// and match `pattern` (a glob; `None`: all), each with its local subscriber count; at most
    /// `max` of them, in name order.
    ChannelCounts {
        /// Glob with `*` and `?` (as topic ACLs).
        pattern: Option<Arc<str>>,
        /// Most topics to answer with.
        max: usize,
        /// Answered with this shard's topics (the caller sums the shards').
        reply: Responder<Vec<(Arc<str>, usize)>>,
    },
    /// Answer with the figures of the topics this shard owns: how many are subscribed, and the
    /// `top` with the most publications.
    TopicStats {
        /// How many topics to list by publications.
        top: usize,
        /// Answered with this shard's figures (the caller merges the shards').
        reply: Responder<TopicStats>,
    },
    /// Queue `frame` (a complete WebSocket frame) to every live WSE connection of the shard.
    /// Answer: how many.
    BroadcastAll {
        /// A complete WebSocket frame, shared by every connection it goes to.
        frame: Bytes,
        /// Answered with how many connections it was queued to.
        reply: Responder<usize>,
    },
    /// Stop accepting and close every connection with `close_code`; the shard exits once its
    /// connections are gone or `timeout` has passed.
    Drain {
        /// The close code every connection gets.
        close_code: u16,
        /// The close reason every connection gets.
        reason: Arc<str>,
        /// How long connections may take to go before the shard exits anyway.
        timeout: Duration,
        /// Answered when the drain has started.
        reply: Responder<()>,
    },
    /// Up to `max` application events: at once if the shard has some, else as soon as it has
    /// (the request waits in the shard). One request per shard at a time.
    TakeEvents {
        /// At most this many events in one answer.
        max: usize,
        /// Answered with the events, oldest first.
        reply: Responder<Vec<AppEvent>>,
    },
}

/// An event the application sends to a connection, checked once and wrapped per connection:
/// `{"c":<c|"U">,"t":..,"p":..,"id":<id|uuid7>,"ts":<ISO now>,"seq":<per connection>,"v":1}`
/// followed by any other fields the event had (in key order).
#[derive(Debug)]
pub struct OutboundEvent {
    /// The envelope's `c` (category); `U` when the application gave none.
    pub c: String,
    /// The event type, `t`.
    pub t: String,
    /// The payload, `p`, as JSON text.
    pub p: Box<RawValue>,
    /// The event id: the application's, or a fresh UUIDv7 (send dedup keys on it).
    pub id: String,
    extra: serde_json::Map<String, serde_json::Value>,
}

impl OutboundEvent {
    /// Reads an application event: a JSON object with `t` (or `type`), optional `p` (or
    /// `payload`; default `{}`), `id` (string; default a new UUIDv7) and `c` (default `"U"`).
    ///
    /// # Errors
    /// Not a JSON object, no string type, a non-string id or category.
    pub fn parse(json: &str) -> Result<OutboundEvent, CommandError> {
        let mut map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json)
            .map_err(|_| CommandError::InvalidEvent("not a JSON object"))?;
        let t = match map.remove("t").or_else(|| map.remove("type")) {
            Some(serde_json::Value::String(t)) if !t.is_empty() => t,
            _ => return Err(CommandError::InvalidEvent("needs a non-empty string 't'")),
        };
        let p = map
            .remove("p")
            .or_else(|| map.remove("payload"))
            .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
        let p = serde_json::value::to_raw_value(&p).expect("a JSON value serialises");
        let id = match map.remove("id") {
            None | Some(serde_json::Value::Null) => uuid::Uuid::now_v7().to_string(),
            Some(serde_json::Value::String(id)) if !id.is_empty() => id,
            _ => {
                return Err(CommandError::InvalidEvent(
                    "'id' must be a non-empty string",
                ));
            }
        };
        let c = match map.remove("c") {
            None => "U".to_owned(),
            Some(serde_json::Value::String(c)) => c,
            _ => return Err(CommandError::InvalidEvent("'c' must be a string")),
        };
        for envelope_field in ["ts", "seq", "v"] {
            map.remove(envelope_field);
        }
        Ok(OutboundEvent {
            c,
            t,
            p,
            id,
            extra: map,
        })
    }

    /// The wire JSON for one connection.
    pub fn envelope(&self, ts: &str, seq: u64) -> Vec<u8> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            c: &'a str,
            t: &'a str,
            p: &'a RawValue,
            id: &'a str,
            ts: &'a str,
            seq: u64,
            v: u32,
            #[serde(flatten)]
            extra: &'a serde_json::Map<String, serde_json::Value>,
        }
        serde_json::to_vec(&Envelope {
            c: &self.c,
            t: &self.t,
            p: &self.p,
            id: &self.id,
            ts,
            seq,
            v: crate::config::PROTOCOL_VERSION,
            extra: &self.extra,
        })
        .expect("an envelope serialises")
    }
}

/// Whether the application may close a connection with `code` (RFC 6455 §7.4: 1000, or the
/// ranges for libraries and applications; the clients reconnect on 4000..=4999).
pub fn close_code_allowed(code: u16) -> bool {
    code == CloseCode::Normal.code() || APPLICATION_CODES.contains(&code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_fills_in_id_ts_seq_and_keeps_extras() {
        let e = OutboundEvent::parse(r#"{"type":"note","payload":{"x":1},"corr":"a"}"#).unwrap();
        assert_eq!(e.c, "U");
        assert_eq!(e.id.len(), 36, "a generated uuid");
        let json: serde_json::Value =
            serde_json::from_slice(&e.envelope("2026-01-01T00:00:00.000Z", 7)).unwrap();
        assert_eq!(json["t"], "note");
        assert_eq!(json["p"], serde_json::json!({"x": 1}));
        assert_eq!(json["seq"], 7);
        assert_eq!(json["v"], 1);
        assert_eq!(json["corr"], "a");
        let e = OutboundEvent::parse(r#"{"c":"WSE","t":"x","id":"e-1","seq":99}"#).unwrap();
        let text = String::from_utf8(e.envelope("now", 2)).unwrap();
        assert_eq!(
            text,
            r#"{"c":"WSE","t":"x","p":{},"id":"e-1","ts":"now","seq":2,"v":1}"#
        );
    }

    #[test]
    fn bad_events_are_refused() {
        for bad in [
            "[]",
            "{}",
            r#"{"t":""}"#,
            r#"{"t":1}"#,
            r#"{"t":"x","id":5}"#,
            "nope",
        ] {
            assert!(OutboundEvent::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn close_codes() {
        assert!(close_code_allowed(1000) && close_code_allowed(4300) && close_code_allowed(3000));
        assert!(
            !close_code_allowed(1001) && !close_code_allowed(1005) && !close_code_allowed(5000)
        );
    }
}
