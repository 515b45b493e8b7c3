//! What a Centrifuge session asks of the shard and what the shard answers: the dialect's side
//! of the seam between a client protocol and the shard's topics, recovery and presence.
//!
//! Owns: [`Request`], [`Answer`], their [`Ticket`], and the one-per-format encoding of a
//! publication push ([`encode_publication`]). Channels are topics of the one topic space that
//! WSE clients share; data is JSON text; stream positions are a topic's recovery epoch and
//! offset. Never: performs an operation (the shard does) or holds state.

use std::sync::Arc;

use bytes::Bytes;

use super::codec::{self, Format};
use super::codes::{ErrorCode, UnsubscribeCode};
use super::proto::{
    ClientInfo, JoinLeave, Publication, Push, Reply, StreamPosition, SubscribePush, UnsubscribePush,
};

/// Correlates a [`Request`] with its [`Answer`]; unique within a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket(pub u64);

/// An operation the session needs from the shard, in command order. Channels are topics of
/// the one topic space; data is JSON text.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// Subscribe the connection to `channel`; answer [`Answer::Subscribed`] once publications
    /// of the channel reach it, or [`Answer::Failed`].
    Subscribe {
        /// For the answer.
        ticket: Ticket,
        /// The channel.
        channel: Arc<str>,
        /// Report the stream's top position (the subscription is recoverable or positioned).
        stream: bool,
        /// Replay from this position (publications after `offset`, if `epoch` matches or is
        /// empty), at most [`Settings::history_limit_max`] of them.
        recover: Option<StreamPosition>,
        /// Count the connection in the channel's presence, as this client.
        presence: Option<ClientInfo>,
        /// Send the connection join/leave pushes of the channel.
        join_leave: bool,
    },
    /// Unsubscribe the connection from `channel` (no answer).
    Unsubscribe {
        /// The channel.
        channel: Arc<str>,
    },
    /// Publish `data` to `channel`; answer [`Answer::Published`].
    Publish {
        /// For the answer.
        ticket: Ticket,
        /// The channel.
        channel: Arc<str>,
        /// The payload, JSON text.
        data: Bytes,
        /// The publishing connection.
        info: ClientInfo,
    },
    /// The channel's members; answer [`Answer::Presence`].
    Presence {
        /// For the answer.
        ticket: Ticket,
        /// The channel.
        channel: Arc<str>,
    },
    /// The channel's member counts; answer [`Answer::PresenceStats`].
    PresenceStats {
        /// For the answer.
        ticket: Ticket,
        /// The channel.
        channel: Arc<str>,
    },
    /// The channel's history; answer [`Answer::History`] (or 112 for a `since` in another
    /// epoch).
    History {
        /// For the answer.
        ticket: Ticket,
        /// The channel.
        channel: Arc<str>,
        /// Most publications to return (0 = only the stream's top).
        limit: usize,
        /// Only publications after this position.
        since: Option<StreamPosition>,
        /// Newest first.
        reverse: bool,
    },
    /// A call to the application's backend (an `rpc` application event); answer
    /// [`Answer::Rpc`] with the backend's reply, or [`Answer::Failed`] (no backend: 108).
    Rpc {
        /// For the answer; also the request number the backend replies to.
        ticket: Ticket,
        /// The method the client named.
        method: String,
        /// The payload, JSON text (empty: none).
        data: Bytes,
    },
    /// An asynchronous message to the application (no answer).
    Send {
        /// The payload, JSON text.
        data: Bytes,
    },
}

/// The shard's answer to a [`Request`].
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// Subscribed.
    Subscribed {
        /// The request's.
        ticket: Ticket,
        /// The stream's top (epoch, offset), when the request asked for it and the channel
        /// keeps a history.
        top: Option<StreamPosition>,
        /// Whether the replay covered every publication after the asked position, and those
        /// publications in order (when it did).
        recovery: Option<(bool, Vec<Publication>)>,
    },
    /// Published.
    Published {
        /// The request's.
        ticket: Ticket,
    },
    /// The channel's members.
    Presence {
        /// The request's.
        ticket: Ticket,
        /// One per connection.
        clients: Vec<ClientInfo>,
    },
    /// The channel's member counts.
    PresenceStats {
        /// The request's.
        ticket: Ticket,
        /// Connections.
        num_clients: u32,
        /// Distinct users.
        num_users: u32,
    },
    /// The channel's history.
    History {
        /// The request's.
        ticket: Ticket,
        /// The publications, in the order asked for.
        publications: Vec<Publication>,
        /// The stream's top.
        top: StreamPosition,
    },
    /// The backend's reply to an [`Request::Rpc`].
    Rpc {
        /// The request's.
        ticket: Ticket,
        /// The result's data (JSON text; empty: none), or the backend's error.
        result: Result<Bytes, RpcError>,
    },
    /// The operation failed with this reply error.
    Failed {
        /// The request's.
        ticket: Ticket,
        /// The error.
        code: ErrorCode,
    },
}

/// An error the application's backend answered an `rpc` with, sent to the client as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcError {
    /// The code (Centrifugo advises 400..=1999 for application errors).
    pub code: u32,
    /// What it means, in words.
    pub message: String,
}

/// Encodes a publication push once for every subscriber of that format.
///
/// # Errors
/// [`codec::EncodeError::NotJson`] for data that is not JSON text, in [`Format::Json`].
pub fn encode_publication(
    format: Format,
    channel: &str,
    publication: Publication,
) -> Result<Bytes, codec::EncodeError> {
    push(
        format,
        Push {
            channel: channel.to_owned(),
            publication: Some(publication),
            ..Default::default()
        },
    )
}

/// Encodes a join (`joined`) or leave push of `who`, once for every subscriber of that format
/// that asked for join/leave pushes.
///
/// # Errors
/// [`codec::EncodeError::NotJson`] when `conn_info` or `chan_info` is not JSON text, in
/// [`Format::Json`].
pub fn encode_join_leave(
    format: Format,
    channel: &str,
    joined: bool,
    who: ClientInfo,
) -> Result<Bytes, codec::EncodeError> {
    let body = Some(JoinLeave { info: Some(who) });
    let (join, leave) = if joined { (body, None) } else { (None, body) };
    push(
        format,
        Push {
            channel: channel.to_owned(),
            join,
            leave,
            ..Default::default()
        },
    )
}

/// Encodes the push that tells a connection the server ended its subscription to `channel`.
pub fn encode_unsubscribe(format: Format, channel: &str, code: UnsubscribeCode) -> Bytes {
    push(
        format,
        Push {
            channel: channel.to_owned(),
            unsubscribe: Some(UnsubscribePush {
                code: code.code(),
                reason: code.reason().to_owned(),
            }),
            ..Default::default()
        },
    )
    .expect("no bytes field to check")
}

/// Encodes the push that tells a connection the server subscribed it to `channel` (a
/// server-side subscription added while it is connected), with the stream's position when the
/// channel keeps a history.
pub fn encode_subscribe(format: Format, channel: &str, top: Option<StreamPosition>) -> Bytes {
    let subscribe = match top {
        Some(top) => SubscribePush {
            recoverable: true,
            positioned: true,
            epoch: top.epoch,
            offset: top.offset,
        },
        None => SubscribePush::default(),
    };
    push(
        format,
        Push {
            channel: channel.to_owned(),
            subscribe: Some(subscribe),
            ..Default::default()
        },
    )
    .expect("no bytes field to check")
}

fn push(format: Format, push: Push) -> Result<Bytes, codec::EncodeError> {
    codec::encode(
        format,
        &Reply {
            push: Some(push),
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn text(b: Result<Bytes, codec::EncodeError>) -> String {
        String::from_utf8(b.unwrap().to_vec()).unwrap()
    }

    #[test]
    fn pushes_have_centrifuges_shapes() {
        let alice = ClientInfo {
            user: "alice".into(),
            client: "c1".into(),
            conn_info: Bytes::from_static(b"{\"name\":\"Alice\"}"),
            chan_info: Bytes::new(),
        };
        assert_eq!(
            text(encode_join_leave(
                Format::Json,
                "room:main",
                true,
                alice.clone()
            )),
            r#"{"push":{"channel":"room:main","join":{"info":{"user":"alice","client":"c1","conn_info":{"name":"Alice"}}}}}"#
        );
        assert_eq!(
            text(encode_join_leave(Format::Json, "room:main", false, alice)),
            r#"{"push":{"channel":"room:main","leave":{"info":{"user":"alice","client":"c1","conn_info":{"name":"Alice"}}}}}"#
        );
        assert_eq!(
            text(Ok(encode_unsubscribe(
                Format::Json,
                "room:main",
                UnsubscribeCode::Server
            ))),
            r#"{"push":{"channel":"room:main","unsubscribe":{"code":2000,"reason":"server unsubscribe"}}}"#
        );
        assert_eq!(
            text(Ok(encode_subscribe(
                Format::Json,
                "user:bob",
                Some(StreamPosition {
                    offset: 7,
                    epoch: "0000beef".into()
                })
            ))),
            r#"{"push":{"channel":"user:bob","subscribe":{"recoverable":true,"epoch":"0000beef","offset":7,"positioned":true}}}"#
        );
        assert_eq!(
            text(Ok(encode_subscribe(Format::Json, "plain", None))),
            r#"{"push":{"channel":"plain","subscribe":{}}}"#
        );
        // Protobuf: Reply{push (4): Push{channel (2), unsubscribe (7): {code (2), reason (3)}}}.
        let bytes = encode_unsubscribe(Format::Protobuf, "c", UnsubscribeCode::InsufficientState);
        let reply = Reply::decode_length_delimited(&bytes[..]).unwrap();
        let unsub = reply.push.unwrap().unsubscribe.unwrap();
        assert_eq!(
            (unsub.code, unsub.reason.as_str()),
            (2500, "insufficient state")
        );
        let reason = b"insufficient state";
        let mut unsub_body = vec![0x10, 0xc4, 0x13, 0x1a, reason.len() as u8];
        unsub_body.extend_from_slice(reason);
        let mut push_body = vec![0x12, 1, b'c', 0x3a, unsub_body.len() as u8];
        push_body.extend_from_slice(&unsub_body);
        let mut want = vec![2 + push_body.len() as u8, 0x22, push_body.len() as u8];
        want.extend_from_slice(&push_body);
        assert_eq!(&bytes[..], &want[..]);
    }
}
