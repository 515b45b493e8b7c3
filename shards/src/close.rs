//! Every WebSocket close code the server sends or interprets, in one enum with one mapping to
//! the wire (PROTOCOL.md, "Close codes").
//!
//! Owns: the codes and the reasons that go with them. Never: decides when to close (the
//! connection's state machine does) or counts closes (`metrics` counts by the number on the
//! wire, so labels stay the numbers clients see).
//!
//! Codes an application or the operator chooses (a `disconnect` command's code, a drain's
//! `server.shutdown_close_code`) are plain `u16`s checked against the allowed ranges; the
//! variants below are the codes the server itself picks or reads.

use std::ops::RangeInclusive;

/// Close codes RFC 6455 §7.4.2 leaves to libraries (3000..=3999) and applications
/// (4000..=4999): with [`CloseCode::Normal`], what an application may close a connection with.
pub const APPLICATION_CODES: RangeInclusive<u16> = 3000..=4999;

/// Close codes on which the clients reconnect (PROTOCOL.md): a drain's code must be one, so
/// its clients come back (elsewhere).
pub const RECONNECT_CODES: RangeInclusive<u16> = 4000..=4999;

/// A close code the server sends, or reads in a peer's close frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000, normal closure: the default of an application's `disconnect` (a kick: clients do
    /// not reconnect); also what a peer sends when it leaves.
    Normal,
    /// 1001, going away: read from peers that leave (a browser tab closed); counted.
    GoingAway,
    /// 1002, protocol error: a frame that breaks RFC 6455 (unmasked, reserved bits, bad
    /// continuation, bad close payload, ...).
    ProtocolError,
    /// 1005, no status received: never on the wire (RFC 6455 §7.4.1); stands for a peer's close
    /// frame without a code, when counting closes.
    NoStatus,
    /// 1007, invalid payload: a text message that is not UTF-8.
    InvalidPayload,
    /// 1009, message too big: a message over `limits.max_message_size` (after a
    /// `MESSAGE_TOO_LARGE` error when the connection is live).
    MessageTooBig,
    /// 1011, internal error: read from peers; counted.
    InternalError,
    /// 1013, try again later: sent right after the upgrade when `server.max_connections` live
    /// connections are already held.
    TryAgainLater,
    /// 4300, the server is shutting down or draining: the default of
    /// `server.shutdown_close_code`; clients reconnect (elsewhere).
    Shutdown,
    /// 4401, authentication failed: after the `AUTH_FAILED` / `AUTH_REQUIRED` error; final for
    /// clients (they drop the token).
    Unauthorized,
    /// 4408, idle timeout: no inbound frame for `protocol.idle_timeout`.
    IdleTimeout,
    /// 4413, slow consumer: the connection's outbound queue passed
    /// `limits.max_outbound_queue_bytes`; clients reconnect and recover.
    SlowConsumer,
    /// 4429, rate-limit abuse: `protocol.rate_limit_abuse_drops` drops within
    /// `protocol.rate_limit_abuse_window`.
    RateLimited,
}

impl CloseCode {
    /// Every variant, in the order of their numbers.
    pub const ALL: [CloseCode; 13] = [
        Self::Normal,
        Self::GoingAway,
        Self::ProtocolError,
        Self::NoStatus,
        Self::InvalidPayload,
        Self::MessageTooBig,
        Self::InternalError,
        Self::TryAgainLater,
        Self::Shutdown,
        Self::Unauthorized,
        Self::IdleTimeout,
        Self::SlowConsumer,
        Self::RateLimited,
    ];

    /// The number on the wire.
    pub const fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::ProtocolError => 1002,
            Self::NoStatus => 1005,
            Self::InvalidPayload => 1007,
            Self::MessageTooBig => 1009,
            Self::InternalError => 1011,
            Self::TryAgainLater => 1013,
            Self::Shutdown => 4300,
            Self::Unauthorized => 4401,
            Self::IdleTimeout => 4408,
            Self::SlowConsumer => 4413,
            Self::RateLimited => 4429,
        }
    }

    /// The reason the server's close frame carries with this code.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Normal => "",
            Self::GoingAway => "going away",
            Self::ProtocolError => "protocol error",
            Self::NoStatus => "",
            Self::InvalidPayload => "invalid UTF-8",
            Self::MessageTooBig => "message too large",
            Self::InternalError => "internal error",
            Self::TryAgainLater => "server at connection limit",
            Self::Shutdown => "server shutting down",
            Self::Unauthorized => "Authentication failed",
            Self::IdleTimeout => "idle timeout",
            Self::SlowConsumer => "slow consumer",
            Self::RateLimited => "rate limit exceeded",
        }
    }
}

impl From<CloseCode> for u16 {
    fn from(c: CloseCode) -> u16 {
        c.code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_distinct_and_in_order() {
        let codes: Vec<u16> = CloseCode::ALL.iter().map(|c| c.code()).collect();
        assert!(codes.windows(2).all(|w| w[0] < w[1]), "{codes:?}");
    }

    #[test]
    fn reasons_fit_a_close_frame() {
        // A close frame's payload is at most 125 bytes, two of them the code.
        assert!(CloseCode::ALL.iter().all(|c| c.reason().len() <= 123));
    }
}
