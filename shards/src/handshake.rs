//! The HTTP/1.1 upgrade (RFC 6455 §4), sans-IO.
//!
//! Owns: parsing the client's upgrade request (httparse), validating it, deriving
//! `Sec-WebSocket-Accept`, and writing the 101 or error responses; reading cookies and query
//! parameters out of the request.
//!
//! Never: authenticates (see `auth`), touches sockets or clocks.

use std::borrow::Cow;

/// What a valid upgrade request told us. Owned: the read buffer is reused after parsing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// Request path without the query, e.g. `/wse`.
    pub path: String,
    /// Raw query string (after `?`, still percent-encoded), if any.
    pub query: Option<String>,
    /// `Sec-WebSocket-Key` as sent.
    pub key: String,
    /// The `Cookie` header(s), joined with `; ` when sent more than once.
    pub cookie: Option<String>,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Origin` header.
    pub origin: Option<String>,
}

/// Why a request cannot be upgraded; written back as an HTTP error and the socket closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// 400 malformed, 405 not GET, 426 not a WebSocket upgrade or wrong version,
    /// 431 request too large, 503 overloaded.
    pub status: u16,
    /// Short human text, also the body.
    pub reason: &'static str,
}

/// Result of feeding the bytes received so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The request is incomplete (and still under the size limit): read more.
    Partial,
    /// A valid upgrade; `consumed` bytes belong to the request, the rest are WebSocket frames
    /// the client pipelined after it.
    Upgrade {
        request: UpgradeRequest,
        consumed: usize,
    },
    Reject(Reject),
}

/// Parses the request at the front of `buf`. A request not complete within `max_bytes` is
/// rejected with 431.
pub fn parse(buf: &[u8], max_bytes: usize) -> Outcome {
    let _ = (buf, max_bytes);
    todo!()
}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key + GUID)).
pub fn accept_key(client_key: &str) -> String {
    let _ = client_key;
    todo!()
}

/// The 101 Switching Protocols response (no subprotocol, no extensions).
pub fn response_101(accept: &str) -> Vec<u8> {
    let _ = accept;
    todo!()
}

/// An HTTP error response with `Connection: close`, a text body and, for 426,
/// `Sec-WebSocket-Version: 13` and `Upgrade: websocket`.
pub fn response_reject(reject: &Reject) -> Vec<u8> {
    let _ = reject;
    todo!()
}

/// The first value of query parameter `name`, percent-decoded (`+` as space).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    let _ = (query, name);
    todo!()
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie_value<'a>(cookie_header: &'a str, name: &str) -> Option<&'a str> {
    let _ = (cookie_header, name);
    todo!()
}
