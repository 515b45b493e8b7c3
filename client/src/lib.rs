//! A Rust client for the WSE protocol (the WebSocket protocol of wse-server and of the published
//! `wse-client` Python/TypeScript clients).
//!
//! It is built for tests and benchmarks: every message the server sends comes back from
//! [`Client::recv`] in order (decoded from text, binary JSON, `C:` zlib or `M:` MessagePack
//! frames, batches unpacked), close codes come back as [`Error::Closed`], and malformed frames are
//! reported as [`Error::Protocol`] rather than skipped. Only the server's JSON pings are answered
//! and hidden by default ([`Connector::auto_pong`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use serde_json::json;
//! use wse_client::{Connector, Error};
//!
//! # async fn demo(alice_jwt: String, publisher_jwt: String) -> Result<(), Error> {
//! let url = "ws://127.0.0.1:5007/wse";
//! let mut alice = Connector::new(url).token(alice_jwt).connect().await?;
//! println!("connected as {}", alice.connection_id());
//!
//! let reply = alice.subscribe(&["prices"]).await?;
//! assert_eq!(reply.p["success"], true);
//!
//! let mut publisher = Connector::new(url).token(publisher_jwt).connect().await?;
//! publisher.publish("prices", "tick", json!({"px": 101})).await?;
//!
//! let tick = alice.recv_until(|ev| ev.t == "tick", Duration::from_secs(5)).await?;
//! assert_eq!(tick.p["px"], 101);
//!
//! let pong = alice.ping().await?;
//! assert_eq!(pong.t, "PONG");
//!
//! // A bad token: the server sends an AUTH_FAILED error, then closes with 4401.
//! match Connector::new(url).token("garbage").connect().await {
//!     Err(Error::Closed { code: 4401, last_error: Some(err), .. }) => {
//!         assert_eq!(err.code(), Some("AUTH_FAILED"));
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! alice.close(1000, "bye").await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod error;
mod event;

pub use client::{
    CLIENT_VERSION, Client, CloseInfo, Connector, PROTOCOL_VERSION, TokenVia, WsStream, now_ms,
};
pub use error::{Error, Result};
pub use event::{Encoding, Event, MAX_DECOMPRESSED, decode_binary, decode_text};
pub use tokio_tungstenite::tungstenite;
pub use tokio_tungstenite::tungstenite::Message;
