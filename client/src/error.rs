//! The client's error type.

use tokio_tungstenite::tungstenite;

use crate::event::Event;

/// Result alias with this crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a WSE server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// I/O error (connecting, or writing to the socket).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// WebSocket-level error: a failed upgrade (e.g. an HTTP 401 is `WebSocket(Http(..))`),
    /// a protocol violation by the server, an invalid URL...
    #[error("WebSocket error: {0}")]
    WebSocket(tungstenite::Error),
    /// The server closed the connection. `code` is the close code from the server's close frame,
    /// 1005 when its close frame had no code, 1006 when the connection dropped without a close
    /// frame. `last_error` is the last `error` event received on this connection, if any.
    #[error("connection closed: code {code}, reason {reason:?}{}", describe_last_error(.last_error))]
    Closed {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
        /// The last `error` event the server sent on this connection.
        last_error: Option<Box<Event>>,
    },
    /// Nothing arrived in time.
    #[error("timed out")]
    Timeout,
    /// The server sent something that is not valid WSE (or not what the protocol expects here).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// JSON (de)serialisation error.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),
}

fn describe_last_error(last_error: &Option<Box<Event>>) -> String {
    match last_error {
        Some(ev) => format!(", last error {}", ev.describe()),
        None => String::new(),
    }
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Io(io) => Error::Io(io),
            other => Error::WebSocket(other),
        }
    }
}

impl Error {
    /// The close code when this is [`Error::Closed`].
    pub fn close_code(&self) -> Option<u16> {
        match self {
            Error::Closed { code, .. } => Some(*code),
            _ => None,
        }
    }
}
