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
use super::codes::ErrorCode;
use super::proto::{ClientInfo, Publication, Push, Reply, StreamPosition};

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
    /// The operation failed with this reply error.
    Failed {
        /// The request's.
        ticket: Ticket,
        /// The error.
        code: ErrorCode,
    },
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
    codec::encode(
        format,
        &Reply {
            push: Some(Push {
                channel: channel.to_owned(),
                publication: Some(publication),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}
