//! The Centrifuge client protocol v2, sans-IO: what centrifuge-js, centrifuge-python and
//! clients written for Centrifugo speak (docs/CENTRIFUGO.md; the field-by-field contract is the
//! project's spec `centrifuge.md`).
//!
//! A sibling of the WSE protocol ([`crate::protocol`]), not a layer over it: its own
//! [`codec`] (JSON lines or varint-delimited protobuf, [`proto`] for the messages), its own
//! [`session`] state machine (commands in, replies, pushes and requests out), its own
//! [`codes`], and the [`channel`] rules and namespaces ([`config`]) that decide what a
//! connection may do on a channel. A channel is a topic of the one topic space WSE clients use.
//!
//! Reading order: [`session`] (the state machine), [`requests`] (what it asks of the shard),
//! [`codec`], [`proto`], [`channel`], [`codes`], [`config`].
//!
//! Never: touches sockets, the shard, or a clock (callers pass the time).

pub mod channel;
pub mod codec;
pub mod codes;
pub mod config;
pub mod proto;
pub mod requests;
pub mod session;

pub use codec::Format;
pub use codes::{DisconnectCode, ErrorCode, UnsubscribeCode};
pub use config::{CentrifugeConfig, NamespaceConfig};
pub use requests::{
    Answer, Request, RpcError, Ticket, encode_join_leave, encode_publication, encode_subscribe,
    encode_unsubscribe,
};
pub use session::{Cx, Session, Settings};
