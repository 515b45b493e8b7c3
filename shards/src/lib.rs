//! wse-shards: the per-core engine of wse-server.
#![forbid(unsafe_code)]

pub mod auth;
pub mod codec;
pub mod config;
pub mod handshake;
