//! wse-shards: the per-core engine of wse-server.
//!
//! Reading order, outside in:
//! - [`server`]: boot and stop; the handle the binary and embedders hold.
//! - [`runtime`]: a shard's thread, its io_uring runtime and loop (the only I/O code), and
//!   [`accept`] for the listeners.
//! - [`shard`]: one core's state and the rules tying connections, topics and the fabric together.
//! - [`conn`]: one connection's state machine; [`codec`] and [`handshake`] below it (RFC 6455),
//!   [`protocol`] (WSE messages), [`auth`], [`ratelimit`].
//! - [`topics`], [`queue_groups`], [`fabric`], [`timer`], [`metrics`], [`alarms`]: the shard's
//!   building blocks.
//!
//! Everything below `runtime` is sans-IO: bytes and a clock in, bytes and events out.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accept;
pub mod admission;
pub mod alarms;
pub mod auth;
pub mod centrifuge;
pub mod close;
pub mod codec;
pub mod command;
pub mod config;
pub mod conn;
pub mod dialect;
pub mod fabric;
pub mod fabric_plan;
pub mod handshake;
pub mod inbound;
#[cfg(test)]
mod layering;
pub mod metrics;
pub mod msgpack_json;
pub mod presence;
pub mod protocol;
pub mod queue_groups;
pub mod ratelimit;
pub mod recovery;
pub mod reply;
pub mod runtime;
pub mod server;
pub mod shard;
pub mod timer;
pub mod topic_owner;
pub mod topics;

pub use command::{CommandError, Payload, SendOutcome};
pub use config::Config;
pub use conn::ConnId;
pub use inbound::{AppEvent, AppEventKind};
pub use server::{
    Builder, HealthSnapshot, HistoryPage, PresenceMember, PublishError, QueryError, ReloadReport,
    Server, StartError, block_on, block_on_timeout,
};
