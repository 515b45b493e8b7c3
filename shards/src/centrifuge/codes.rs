//! The Centrifuge protocol's numeric codes: reply errors, disconnect (close) codes and
//! unsubscribe codes, with the messages and reasons the reference server sends.
//!
//! Owns: the one mapping from what happened to the code and text a client sees. Never: decides
//! when to send one (the session does).
//!
//! Invariant: no reason is valid JSON (centrifuge-js tries to parse a close reason as a legacy
//! `{reason, reconnect}` object before it applies the code ranges) and every reason fits a close
//! frame's 123 bytes; a test checks both.

/// An error in a reply (`{"id":N,"error":{"code","message","temporary"}}`). Clients retry a
/// subscribe or connect on `temporary` and on [`ErrorCode::TokenExpired`]; any other code is
/// final for that subscription or connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// 100: something failed on our side; temporary.
    Internal,
    /// 101: the connection is not allowed.
    Unauthorized,
    /// 102: the channel's namespace is not configured.
    UnknownChannel,
    /// 103: the namespace or the channel's rules do not let this connection do that.
    PermissionDenied,
    /// 104: no such method (an RPC method the application does not serve).
    MethodNotFound,
    /// 105: the connection is already subscribed to the channel (server-side subscriptions
    /// included; token-bowl-chat expects and ignores it).
    AlreadySubscribed,
    /// 106: the per-connection channel limit is reached.
    LimitExceeded,
    /// 107: a request the server understood but refuses (a channel name too long, data that
    /// is not JSON).
    BadRequest,
    /// 108: the feature is off for this channel (history, presence) or not served (map and
    /// shared-poll subscriptions, tags filters, RPC without a backend).
    NotAvailable,
    /// 109: the token has expired; the client fetches a new one and retries.
    TokenExpired,
    /// 110: expired (a subscription's token, on sub_refresh).
    Expired,
    /// 111: too many requests; temporary.
    TooManyRequests,
    /// 112: the stream position asked for cannot be recovered (subscribe with flag bit 2, or
    /// history `since` in another epoch).
    UnrecoverablePosition,
}

impl ErrorCode {
    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Self::Internal => 100,
            Self::Unauthorized => 101,
            Self::UnknownChannel => 102,
            Self::PermissionDenied => 103,
            Self::MethodNotFound => 104,
            Self::AlreadySubscribed => 105,
            Self::LimitExceeded => 106,
            Self::BadRequest => 107,
            Self::NotAvailable => 108,
            Self::TokenExpired => 109,
            Self::Expired => 110,
            Self::TooManyRequests => 111,
            Self::UnrecoverablePosition => 112,
        }
    }

    /// The message the reference server sends with the code.
    pub fn message(self) -> &'static str {
        match self {
            Self::Internal => "internal server error",
            Self::Unauthorized => "unauthorized",
            Self::UnknownChannel => "unknown channel",
            Self::PermissionDenied => "permission denied",
            Self::MethodNotFound => "method not found",
            Self::AlreadySubscribed => "already subscribed",
            Self::LimitExceeded => "limit exceeded",
            Self::BadRequest => "bad request",
            Self::NotAvailable => "not available",
            Self::TokenExpired => "token expired",
            Self::Expired => "expired",
            Self::TooManyRequests => "too many requests",
            Self::UnrecoverablePosition => "unrecoverable position",
        }
    }

    /// Whether clients should retry (the `temporary` field, sent only when true).
    pub fn temporary(self) -> bool {
        matches!(self, Self::Internal | Self::TooManyRequests)
    }

    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 13] = [
        Self::Internal,
        Self::Unauthorized,
        Self::UnknownChannel,
        Self::PermissionDenied,
        Self::MethodNotFound,
        Self::AlreadySubscribed,
        Self::LimitExceeded,
        Self::BadRequest,
        Self::NotAvailable,
        Self::TokenExpired,
        Self::Expired,
        Self::TooManyRequests,
        Self::UnrecoverablePosition,
    ];
}

/// Why the server closes a Centrifuge connection: the WebSocket close code and reason. Codes
/// below 3500 make the clients reconnect with backoff; 3500..=3999 are terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectCode {
    /// 3001: the server is shutting down or draining.
    Shutdown,
    /// 3004: an internal error.
    Internal,
    /// 3005: the connection's token expired and was not refreshed in time.
    ConnectionExpired,
    /// 3006: a subscription's token expired and was not refreshed in time.
    SubscriptionExpired,
    /// 3008: the client reads too slowly (outbound queue over its cap).
    Slow,
    /// 3009: writing to the connection failed.
    WriteError,
    /// 3010: a gap in a positioned stream was seen.
    InsufficientState,
    /// 3011: the server asks the client to reconnect (and recover).
    ForceReconnect,
    /// 3012: no pong within the pong timeout after a ping.
    NoPong,
    /// 3013: too many requests.
    TooManyRequests,
    /// 3014: the client's state (token, recovery position) is no longer valid.
    StateInvalidated,
    /// 3500: the connection token (or a refresh token) is invalid; terminal.
    InvalidToken,
    /// 3501: a malformed or out-of-order command (anything before connect, a second connect, an
    /// unknown method, a missing id, a pong with no ping outstanding); terminal.
    BadRequest,
    /// 3502: no connect command in time; terminal.
    Stale,
    /// 3503: disconnected by the server API; terminal.
    ForceDisconnect,
    /// 3504: the connection limit is reached; terminal.
    ConnectionLimit,
    /// 3505: the channel limit is reached; terminal.
    ChannelLimit,
    /// 3506: data the connection's format cannot carry (binary data to a JSON client); terminal.
    InappropriateProtocol,
    /// 3507: permission denied; terminal.
    PermissionDenied,
    /// 3508: not available; terminal.
    NotAvailable,
    /// 3509: too many errors; terminal.
    TooManyErrors,
}

impl DisconnectCode {
    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Self::Shutdown => 3001,
            Self::Internal => 3004,
            Self::ConnectionExpired => 3005,
            Self::SubscriptionExpired => 3006,
            Self::Slow => 3008,
            Self::WriteError => 3009,
            Self::InsufficientState => 3010,
            Self::ForceReconnect => 3011,
            Self::NoPong => 3012,
            Self::TooManyRequests => 3013,
            Self::StateInvalidated => 3014,
            Self::InvalidToken => 3500,
            Self::BadRequest => 3501,
            Self::Stale => 3502,
            Self::ForceDisconnect => 3503,
            Self::ConnectionLimit => 3504,
            Self::ChannelLimit => 3505,
            Self::InappropriateProtocol => 3506,
            Self::PermissionDenied => 3507,
            Self::NotAvailable => 3508,
            Self::TooManyErrors => 3509,
        }
    }

    /// The close reason: plain words, never valid JSON.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Internal => "internal server error",
            Self::ConnectionExpired => "connection expired",
            Self::SubscriptionExpired => "subscription expired",
            Self::Slow => "slow",
            Self::WriteError => "write error",
            Self::InsufficientState => "insufficient state",
            Self::ForceReconnect => "force reconnect",
            Self::NoPong => "no pong",
            Self::TooManyRequests => "too many requests",
            Self::StateInvalidated => "state invalidated",
            Self::InvalidToken => "invalid token",
            Self::BadRequest => "bad request",
            Self::Stale => "stale",
            Self::ForceDisconnect => "force disconnect",
            Self::ConnectionLimit => "connection limit",
            Self::ChannelLimit => "channel limit",
            Self::InappropriateProtocol => "inappropriate protocol",
            Self::PermissionDenied => "permission denied",
            Self::NotAvailable => "not available",
            Self::TooManyErrors => "too many errors",
        }
    }

    /// Whether the clients reconnect after it (codes below 3500).
    pub fn reconnect(self) -> bool {
        self.code() < 3500
    }

    /// Every code, in wire order.
    pub const ALL: [DisconnectCode; 21] = [
        Self::Shutdown,
        Self::Internal,
        Self::ConnectionExpired,
        Self::SubscriptionExpired,
        Self::Slow,
        Self::WriteError,
        Self::InsufficientState,
        Self::ForceReconnect,
        Self::NoPong,
        Self::TooManyRequests,
        Self::StateInvalidated,
        Self::InvalidToken,
        Self::BadRequest,
        Self::Stale,
        Self::ForceDisconnect,
        Self::ConnectionLimit,
        Self::ChannelLimit,
        Self::InappropriateProtocol,
        Self::PermissionDenied,
        Self::NotAvailable,
        Self::TooManyErrors,
    ];
}

/// Why a subscription ends from the server's side (the `unsubscribe` push's `code`): below
/// 2500 the client stays unsubscribed, from 2500 it resubscribes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsubscribeCode {
    /// 2000: unsubscribed by the server (the server API); final.
    Server,
    /// 2500: a gap in a positioned stream; resubscribe and recover.
    InsufficientState,
    /// 2501: the subscription token expired; resubscribe with a new one.
    Expired,
    /// 2502: the cached state is invalid; resubscribe without it.
    StateInvalidated,
}

impl UnsubscribeCode {
    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Self::Server => 2000,
            Self::InsufficientState => 2500,
            Self::Expired => 2501,
            Self::StateInvalidated => 2502,
        }
    }

    /// The reason sent with it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Server => "server unsubscribe",
            Self::InsufficientState => "insufficient state",
            Self::Expired => "subscription expired",
            Self::StateInvalidated => "state invalidated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest close reason a close frame carries (125 bytes of payload less the 2-byte code).
    const CLOSE_REASON_MAX: usize = 123;

    #[test]
    fn close_reasons_are_short_and_never_json() {
        for d in DisconnectCode::ALL {
            let reason = d.reason();
            assert!(reason.len() < CLOSE_REASON_MAX, "{d:?}");
            assert!(reason.is_ascii(), "{d:?}");
            assert!(
                serde_json::from_str::<serde_json::Value>(reason).is_err(),
                "{d:?}: {reason} parses as JSON"
            );
        }
    }

    #[test]
    fn codes_and_terminality_match_the_protocol() {
        let codes: Vec<u16> = DisconnectCode::ALL.iter().map(|d| d.code()).collect();
        assert_eq!(
            codes,
            [
                3001, 3004, 3005, 3006, 3008, 3009, 3010, 3011, 3012, 3013, 3014, 3500, 3501, 3502,
                3503, 3504, 3505, 3506, 3507, 3508, 3509
            ]
        );
        assert!(DisconnectCode::NoPong.reconnect());
        assert!(DisconnectCode::ConnectionExpired.reconnect());
        assert!(!DisconnectCode::InvalidToken.reconnect());
        assert!(!DisconnectCode::BadRequest.reconnect());
        let errors: Vec<u32> = ErrorCode::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(errors, (100..=112).collect::<Vec<_>>());
        let temporary: Vec<u32> = ErrorCode::ALL
            .iter()
            .filter(|e| e.temporary())
            .map(|e| e.code())
            .collect();
        assert_eq!(temporary, [100, 111]);
    }
}
