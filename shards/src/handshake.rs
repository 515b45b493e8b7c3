//! The HTTP/1.1 upgrade (RFC 6455 §4), sans-IO.
//!
//! Owns: parsing the client's upgrade request (httparse), validating it, deriving
//! `Sec-WebSocket-Accept`, and writing the 101 or error responses; reading cookies and query
//! parameters out of the request.
//!
//! Never: authenticates (see `auth`), touches sockets or clocks.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use percent_encoding::percent_decode_str;
use sha1::{Digest, Sha1};

/// Headers httparse parses into a stack array; a request with more is rejected with 431.
const HEADERS_MAX: usize = 64;
/// `httparse::Request::version` of HTTP/1.1; RFC 6455 §4.1 requires at least that.
const HTTP_1_1: u8 = 1;
/// RFC 6455 §1.3: appended to the client key before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The only protocol version RFC 6455 defines.
const WEBSOCKET_VERSION: &str = "13";
/// `Sec-WebSocket-Key` is a base64-encoded 16-byte nonce: 24 characters with padding.
const KEY_NONCE_BYTES: usize = 16;
const KEY_BASE64_LEN: usize = 24;
/// What base64 needs as output room for a key of `KEY_BASE64_LEN` characters.
const KEY_DECODE_ROOM: usize = KEY_BASE64_LEN / 4 * 3;

const STATUS_BAD_REQUEST: u16 = 400;
const STATUS_FORBIDDEN: u16 = 403;
const STATUS_METHOD_NOT_ALLOWED: u16 = 405;
const STATUS_UPGRADE_REQUIRED: u16 = 426;
const STATUS_TOO_LARGE: u16 = 431;

const MALFORMED: Reject = Reject {
    status: STATUS_BAD_REQUEST,
    reason: "Malformed HTTP request",
};
/// HTTP/1.0 has no `Upgrade` mechanism, so 426 would ask for something it cannot do.
const NOT_HTTP_1_1: Reject = Reject {
    status: STATUS_BAD_REQUEST,
    reason: "WebSocket upgrade requires HTTP/1.1",
};
const NOT_GET: Reject = Reject {
    status: STATUS_METHOD_NOT_ALLOWED,
    reason: "WebSocket upgrade requires GET",
};
const NOT_UPGRADE: Reject = Reject {
    status: STATUS_UPGRADE_REQUIRED,
    reason: "Upgrade Required: this endpoint only speaks WebSocket",
};
const BAD_VERSION: Reject = Reject {
    status: STATUS_UPGRADE_REQUIRED,
    reason: "Unsupported Sec-WebSocket-Version: 13 required",
};
const BAD_KEY: Reject = Reject {
    status: STATUS_BAD_REQUEST,
    reason: "Missing or invalid Sec-WebSocket-Key",
};
/// A repeated identity header could be read differently by a proxy in front of us.
const DUPLICATE_HEADER: Reject = Reject {
    status: STATUS_BAD_REQUEST,
    reason: "Repeated Sec-WebSocket-Key, Authorization or Origin header",
};
const NOT_UTF8: Reject = Reject {
    status: STATUS_BAD_REQUEST,
    reason: "Header value is not valid UTF-8",
};
/// A browser page whose origin `server.allowed_origins` does not list (cross-site WebSocket
/// hijacking guard: the browser sends the page's cookies with the upgrade).
pub const ORIGIN_NOT_ALLOWED: Reject = Reject {
    status: STATUS_FORBIDDEN,
    reason: "Origin not allowed: add it to server.allowed_origins",
};
const TOO_LARGE: Reject = Reject {
    status: STATUS_TOO_LARGE,
    reason: "Request Header Fields Too Large",
};

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
    /// The `Sec-WebSocket-Protocol` offers, comma-separated (several headers joined with `, `).
    pub protocols: Option<String>,
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
        /// The parsed request: path, query, headers the server reads.
        request: UpgradeRequest,
        /// Bytes of the buffer the request took.
        consumed: usize,
    },
    /// Not an acceptable upgrade: answer with this HTTP status and close.
    Reject(Reject),
}

/// Parses the request at the front of `buf`. A request not complete within `max_bytes` is
/// rejected with 431.
pub fn parse(buf: &[u8], max_bytes: usize) -> Outcome {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(consumed)) if consumed <= max_bytes => {
            match validate(&request) {
                Ok(request) => Outcome::Upgrade { request, consumed },
                Err(reject) => Outcome::Reject(reject),
            }
        }
        Ok(httparse::Status::Partial) if buf.len() < max_bytes => Outcome::Partial,
        Ok(_) | Err(httparse::Error::TooManyHeaders) => Outcome::Reject(TOO_LARGE),
        Err(_) => Outcome::Reject(MALFORMED),
    }
}

/// Whether an upgrade with this `Origin` header may proceed under `server.allowed_origins`:
/// always without one (not a browser, or a same-origin request from an old one); otherwise when
/// an entry is `*` or matches it, case-insensitively, with `*` and `?` as in topic globs.
pub fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let origin = origin.trim().to_ascii_lowercase();
    allowed.iter().any(|entry| {
        entry == crate::config::ORIGIN_ANY
            || crate::auth::glob_match(&entry.to_ascii_lowercase(), &origin)
    })
}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key + GUID)).
pub fn accept_key(client_key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(client_key.as_bytes());
    sha1.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

/// The 101 Switching Protocols response (no subprotocol, no extensions).
pub fn response_101(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\
         \r\n"
    )
    .into_bytes()
}

/// The 101 Switching Protocols response selecting `protocol`, one of the subprotocols the
/// client offered (RFC 6455 §4.2.2: a browser that offered subprotocols fails a response that
/// selects none).
pub fn response_101_with_protocol(accept: &str, protocol: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\
         Sec-WebSocket-Protocol: {protocol}\r\n\
         \r\n"
    )
    .into_bytes()
}

/// An HTTP error response with `Connection: close`, a text body and, for 426,
/// `Sec-WebSocket-Version: 13` and `Upgrade: websocket`.
pub fn response_reject(reject: &Reject) -> Vec<u8> {
    let status = reject.status;
    let body = format!("{}\n", reject.reason);
    let mut response = format!(
        "HTTP/1.1 {status} {}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n",
        reason_phrase(status),
        body.len(),
    );
    match status {
        STATUS_UPGRADE_REQUIRED => response.push_str(&format!(
            "Upgrade: websocket\r\nSec-WebSocket-Version: {WEBSOCKET_VERSION}\r\n"
        )),
        // RFC 9110 §15.5.6: a 405 must say which methods are allowed.
        STATUS_METHOD_NOT_ALLOWED => response.push_str("Allow: GET\r\n"),
        _ => {}
    }
    response.push_str("\r\n");
    response.push_str(&body);
    response.into_bytes()
}

/// The first value of query parameter `name`, percent-decoded (`+` as space).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| decode_query_value(value))
    })
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie_value<'a>(cookie_header: &'a str, name: &str) -> Option<&'a str> {
    cookie_header.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key.trim() == name).then(|| unquote(value.trim()))
    })
}

/// Checks a complete request and copies out what the connection keeps.
fn validate(request: &httparse::Request<'_, '_>) -> Result<UpgradeRequest, Reject> {
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(MALFORMED);
    };
    if method != "GET" {
        return Err(NOT_GET);
    }
    if version != HTTP_1_1 {
        return Err(NOT_HTTP_1_1);
    }
    let fields = Fields::collect(request.headers)?;
    if !(fields.upgrade_websocket && fields.connection_upgrade) {
        return Err(NOT_UPGRADE);
    }
    if fields.version != Some(true) {
        return Err(BAD_VERSION);
    }
    let key = fields.key.filter(|key| is_valid_key(key)).ok_or(BAD_KEY)?;
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    Ok(UpgradeRequest {
        path: path.to_owned(),
        query,
        key: key.to_owned(),
        cookie: fields.cookie,
        authorization: fields.authorization.map(str::to_owned),
        origin: fields.origin.map(str::to_owned),
        protocols: fields.protocols,
    })
}

/// The headers the upgrade looks at, gathered in one pass; names match case-insensitively.
#[derive(Debug, Default)]
struct Fields<'b> {
    /// `Upgrade` lists the `websocket` token.
    upgrade_websocket: bool,
    /// `Connection` lists the `upgrade` token.
    connection_upgrade: bool,
    /// `None` when absent, else whether every `Sec-WebSocket-Version` said 13.
    version: Option<bool>,
    key: Option<&'b str>,
    cookie: Option<String>,
    authorization: Option<&'b str>,
    origin: Option<&'b str>,
    protocols: Option<String>,
}

impl<'b> Fields<'b> {
    fn collect(headers: &[httparse::Header<'b>]) -> Result<Self, Reject> {
        let mut fields = Self::default();
        for header in headers {
            fields.add(header.name, header.value)?;
        }
        Ok(fields)
    }

    fn add(&mut self, name: &str, value: &'b [u8]) -> Result<(), Reject> {
        let is = |expected: &str| name.eq_ignore_ascii_case(expected);
        if is("upgrade") {
            self.upgrade_websocket |= has_token(value, "websocket");
        } else if is("connection") {
            self.connection_upgrade |= has_token(value, "upgrade");
        } else if is("sec-websocket-version") {
            let is_13 = value.trim_ascii() == WEBSOCKET_VERSION.as_bytes();
            self.version = Some(self.version.unwrap_or(true) && is_13);
        } else if is("sec-websocket-key") {
            set_once(&mut self.key, text(value)?)?;
        } else if is("authorization") {
            set_once(&mut self.authorization, text(value)?)?;
        } else if is("origin") {
            set_once(&mut self.origin, text(value)?)?;
        } else if is("cookie") {
            self.add_cookie(text(value)?);
        } else if is("sec-websocket-protocol") {
            // RFC 6455 §11.3.4: the header may repeat; its values form one list.
            let value = text(value)?;
            match &mut self.protocols {
                Some(list) => {
                    list.push_str(", ");
                    list.push_str(value);
                }
                None => self.protocols = Some(value.to_owned()),
            }
        }
        Ok(())
    }

    /// RFC 6265 §5.4: several `Cookie` headers are read as one, joined with "; ".
    fn add_cookie(&mut self, value: &str) {
        match &mut self.cookie {
            Some(cookie) => {
                cookie.push_str("; ");
                cookie.push_str(value);
            }
            None => self.cookie = Some(value.to_owned()),
        }
    }
}

fn set_once<'b>(slot: &mut Option<&'b str>, value: &'b str) -> Result<(), Reject> {
    if slot.replace(value).is_some() {
        return Err(DUPLICATE_HEADER);
    }
    Ok(())
}

fn text(value: &[u8]) -> Result<&str, Reject> {
    std::str::from_utf8(value.trim_ascii()).map_err(|_| NOT_UTF8)
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&byte| byte == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn is_valid_key(key: &str) -> bool {
    let mut nonce = [0; KEY_DECODE_ROOM];
    key.len() == KEY_BASE64_LEN
        && matches!(BASE64.decode_slice(key, &mut nonce), Ok(KEY_NONCE_BYTES))
}

/// `+` means space only in query strings, so it is replaced before percent-decoding (which
/// keeps `%2B` a plus). Invalid UTF-8 after decoding becomes U+FFFD rather than hiding the
/// parameter.
fn decode_query_value(value: &str) -> Cow<'_, str> {
    if value.contains('+') {
        let spaced = value.replace('+', " ");
        Cow::Owned(percent_decode_str(&spaced).decode_utf8_lossy().into_owned())
    } else {
        percent_decode_str(value).decode_utf8_lossy()
    }
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(value)
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 16 * 1024;
    const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const VALID_HEADERS: [&str; 8] = [
        "Host: example.com",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Origin: https://example.com",
        "Cookie: session=abc",
        "Authorization: Bearer t0k3n",
    ];

    fn request(start_line: &str, headers: &[&str]) -> String {
        let mut text = format!("{start_line}\r\n");
        for header in headers {
            text.push_str(header);
            text.push_str("\r\n");
        }
        text.push_str("\r\n");
        text
    }

    fn valid_request() -> String {
        request("GET /wse?token=a%20b&x HTTP/1.1", &VALID_HEADERS)
    }

    /// The valid request with every header whose name starts with `name` removed, plus `extra`.
    fn replacing(name: &str, extra: &[&str]) -> String {
        let mut headers: Vec<&str> = VALID_HEADERS
            .into_iter()
            .filter(|header| {
                !header
                    .to_ascii_lowercase()
                    .starts_with(&name.to_ascii_lowercase())
            })
            .collect();
        headers.extend_from_slice(extra);
        request("GET /wse HTTP/1.1", &headers)
    }

    fn upgrade(text: &str) -> UpgradeRequest {
        match parse(text.as_bytes(), MAX) {
            Outcome::Upgrade { request, .. } => request,
            other => panic!("expected an upgrade, got {other:?}"),
        }
    }

    fn status(text: &str) -> u16 {
        match parse(text.as_bytes(), MAX) {
            Outcome::Reject(reject) => reject.status,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn valid_request_with_pipelined_frames() {
        let head = valid_request();
        let mut buf = head.clone().into_bytes();
        buf.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4, 5]);
        let expected = UpgradeRequest {
            path: "/wse".into(),
            query: Some("token=a%20b&x".into()),
            key: RFC_KEY.into(),
            cookie: Some("session=abc".into()),
            authorization: Some("Bearer t0k3n".into()),
            origin: Some("https://example.com".into()),
            protocols: None,
        };
        let outcome = parse(&buf, MAX);
        assert_eq!(
            outcome,
            Outcome::Upgrade {
                request: expected,
                consumed: head.len()
            }
        );
    }

    #[test]
    fn minimal_request_has_no_optional_fields() {
        let text = request(
            "GET / HTTP/1.1",
            &[
                "Upgrade: websocket",
                "Connection: upgrade",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==",
            ],
        );
        let expected = UpgradeRequest {
            path: "/".into(),
            key: "AAAAAAAAAAAAAAAAAAAAAA==".into(),
            ..UpgradeRequest::default()
        };
        assert_eq!(upgrade(&text), expected);
    }

    #[test]
    fn subprotocol_offers_are_one_list() {
        let text = replacing(
            "origin",
            &[
                "Sec-WebSocket-Protocol: centrifuge-json",
                "sec-websocket-protocol:  centrifuge-protobuf, other ",
            ],
        );
        assert_eq!(
            upgrade(&text).protocols.as_deref(),
            Some("centrifuge-json, centrifuge-protobuf, other")
        );
        let response =
            String::from_utf8(response_101_with_protocol("k", "centrifuge-json")).unwrap();
        assert!(response.ends_with(
            "Sec-WebSocket-Accept: k\r\nSec-WebSocket-Protocol: centrifuge-json\r\n\r\n"
        ));
    }

    #[test]
    fn every_prefix_is_partial() {
        let text = valid_request();
        for cut in 0..text.len() {
            assert_eq!(
                parse(&text.as_bytes()[..cut], MAX),
                Outcome::Partial,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn oversized_requests_get_431() {
        let text = valid_request();
        let bytes = text.as_bytes();
        let too_large = Outcome::Reject(TOO_LARGE);
        assert_eq!(
            parse(&bytes[..100], 100),
            too_large,
            "incomplete at the limit"
        );
        assert_eq!(
            parse(&bytes[..99], 100),
            Outcome::Partial,
            "incomplete under the limit"
        );
        assert_eq!(
            parse(bytes, text.len() - 1),
            too_large,
            "complete but over the limit"
        );
        assert!(matches!(
            parse(bytes, text.len()),
            Outcome::Upgrade { consumed, .. } if consumed == text.len()
        ));
    }

    #[test]
    fn too_many_headers_are_rejected() {
        let filler: Vec<String> = (0..HEADERS_MAX)
            .map(|i| format!("X-Filler-{i}: y"))
            .collect();
        let mut headers: Vec<&str> = VALID_HEADERS.to_vec();
        headers.extend(filler.iter().map(String::as_str));
        let text = request("GET / HTTP/1.1", &headers);
        assert_eq!(status(&text), 431);
    }

    #[test]
    fn rejections_carry_their_status() {
        let cases: Vec<(&str, String, u16)> = vec![
            ("garbage", "GARBAGE\r\n\r\n".into(), 400),
            (
                "bad header line",
                request("GET / HTTP/1.1", &["No colon here"]),
                400,
            ),
            ("POST", request("POST /wse HTTP/1.1", &VALID_HEADERS), 405),
            (
                "lowercase get",
                request("get /wse HTTP/1.1", &VALID_HEADERS),
                405,
            ),
            (
                "HTTP/1.0",
                request("GET /wse HTTP/1.0", &VALID_HEADERS),
                400,
            ),
            ("no Upgrade", replacing("upgrade", &[]), 426),
            ("Upgrade: h2c", replacing("upgrade", &["Upgrade: h2c"]), 426),
            ("no Connection", replacing("connection", &[]), 426),
            (
                "Connection: keep-alive",
                replacing("connection", &["Connection: keep-alive"]),
                426,
            ),
            (
                "Connection: upgraded",
                replacing("connection", &["Connection: upgraded"]),
                426,
            ),
            ("no version", replacing("sec-websocket-version", &[]), 426),
            (
                "version 8",
                replacing("sec-websocket-version", &["Sec-WebSocket-Version: 8"]),
                426,
            ),
            (
                "versions 13 and 8",
                replacing(
                    "sec-websocket-version",
                    &["Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"],
                ),
                426,
            ),
            ("no key", replacing("sec-websocket-key", &[]), 400),
            (
                "short key",
                replacing(
                    "sec-websocket-key",
                    &["Sec-WebSocket-Key: dGhlIHNhbXBsZQ=="],
                ),
                400,
            ),
            (
                "17-byte key",
                replacing(
                    "sec-websocket-key",
                    &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA="],
                ),
                400,
            ),
            (
                "not base64",
                replacing(
                    "sec-websocket-key",
                    &["Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!=="],
                ),
                400,
            ),
            (
                "two keys",
                replacing("x", &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="]),
                400,
            ),
            (
                "two origins",
                replacing("x", &["Origin: https://evil.example"]),
                400,
            ),
            (
                "two authorizations",
                replacing("x", &["Authorization: Basic eA=="]),
                400,
            ),
        ];
        for (name, text, expected) in cases {
            assert_eq!(status(&text), expected, "{name}");
        }
    }

    #[test]
    fn non_utf8_identity_header_is_rejected() {
        let mut bytes = replacing("origin", &[]).into_bytes();
        let end = bytes.len() - 2;
        bytes.splice(end..end, b"Origin: \xFF\r\n".iter().copied());
        assert_eq!(parse(&bytes, MAX), Outcome::Reject(NOT_UTF8));
    }

    #[test]
    fn header_names_and_tokens_are_case_insensitive() {
        let text = request(
            "GET /x HTTP/1.1",
            &[
                "UPGRADE: WebSocket",
                "connection: UPGRADE",
                "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
                "SEC-WEBSOCKET-VERSION: 13",
                "cookie: a=1",
            ],
        );
        let request = upgrade(&text);
        assert_eq!(request.key, RFC_KEY);
        assert_eq!(request.cookie.as_deref(), Some("a=1"));
    }

    #[test]
    fn connection_token_lists() {
        for value in [
            "Connection: keep-alive, Upgrade",
            "Connection: Upgrade,keep-alive",
            "Connection:  keep-alive ,  upgrade  ",
        ] {
            upgrade(&replacing("connection", &[value]));
        }
        upgrade(&replacing(
            "connection",
            &["Connection: keep-alive", "Connection: Upgrade"],
        ));
        upgrade(&replacing("upgrade", &["Upgrade: h2c, websocket"]));
    }

    #[test]
    fn multiple_cookie_headers_are_joined() {
        let text = replacing("cookie", &["Cookie: a=1; b=2", "Cookie: c=3"]);
        assert_eq!(upgrade(&text).cookie.as_deref(), Some("a=1; b=2; c=3"));
    }

    #[test]
    fn target_splits_at_the_first_question_mark() {
        let cases = [
            ("/wse", "/wse", None),
            ("/wse?", "/wse", Some("")),
            ("/a/b?x=1?y=2", "/a/b", Some("x=1?y=2")),
        ];
        for (target, path, query) in cases {
            let text = request(&format!("GET {target} HTTP/1.1"), &VALID_HEADERS);
            let request = upgrade(&text);
            assert_eq!(request.path, path);
            assert_eq!(request.query.as_deref(), query);
        }
    }

    #[test]
    fn accept_key_rfc_vector() {
        assert_eq!(accept_key(RFC_KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn response_101_is_exact() {
        let expected = "HTTP/1.1 101 Switching Protocols\r\n\
                        Upgrade: websocket\r\n\
                        Connection: Upgrade\r\n\
                        Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(response_101(&accept_key(RFC_KEY)), expected.as_bytes());
    }

    /// Status line, headers and body of a response.
    fn split_response(bytes: &[u8]) -> (String, Vec<String>, String) {
        let text = String::from_utf8(bytes.to_vec()).expect("UTF-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("blank line");
        let mut lines = head.split("\r\n").map(str::to_owned);
        let status = lines.next().expect("status line");
        (status, lines.collect(), body.to_owned())
    }

    #[test]
    fn rejection_responses() {
        let cases = [
            (MALFORMED, "HTTP/1.1 400 Bad Request"),
            (NOT_GET, "HTTP/1.1 405 Method Not Allowed"),
            (BAD_VERSION, "HTTP/1.1 426 Upgrade Required"),
            (TOO_LARGE, "HTTP/1.1 431 Request Header Fields Too Large"),
            (
                Reject {
                    status: 503,
                    reason: "overloaded",
                },
                "HTTP/1.1 503 Service Unavailable",
            ),
        ];
        for (reject, status_line) in cases {
            let (status, headers, body) = split_response(&response_reject(&reject));
            assert_eq!(status, status_line);
            assert_eq!(body, format!("{}\n", reject.reason));
            let has = |line: &str| headers.iter().any(|header| header == line);
            assert!(has("Content-Type: text/plain; charset=utf-8"));
            assert!(has(&format!("Content-Length: {}", body.len())));
            assert!(has("Connection: close"));
            let is_426 = reject.status == 426;
            assert_eq!(has("Upgrade: websocket"), is_426, "{status_line}");
            assert_eq!(has("Sec-WebSocket-Version: 13"), is_426, "{status_line}");
            assert_eq!(has("Allow: GET"), reject.status == 405, "{status_line}");
        }
    }

    #[test]
    fn query_param_lookup() {
        let query = "token=a%20b%2Bc&plus=x+y&bare&empty=&dup=1&dup=2&tokenx=no&utf=%C3%A9";
        let cases = [
            ("token", Some("a b+c")),
            ("plus", Some("x y")),
            ("bare", Some("")),
            ("empty", Some("")),
            ("dup", Some("1")),
            ("tokenx", Some("no")),
            ("utf", Some("é")),
            ("tok", None),
            ("missing", None),
        ];
        for (name, expected) in cases {
            assert_eq!(query_param(query, name).as_deref(), expected, "{name}");
        }
        assert_eq!(query_param("", "token"), None);
        assert_eq!(query_param("bad=%FF", "bad").as_deref(), Some("\u{FFFD}"));
    }

    #[test]
    fn query_param_borrows_when_nothing_is_encoded() {
        assert!(matches!(
            query_param("a=plain", "a"),
            Some(Cow::Borrowed("plain"))
        ));
        assert!(matches!(query_param("a=x%41", "a"), Some(Cow::Owned(v)) if v == "xA"));
    }

    #[test]
    fn cookie_value_lookup() {
        let header = "session=abc; theme = dark ;quoted=\"q v\"; eq=a=b; flag; s=1; sess=no";
        let cases = [
            ("session", Some("abc")),
            ("theme", Some("dark")),
            ("quoted", Some("q v")),
            ("eq", Some("a=b")),
            ("flag", None),
            ("sess", Some("no")),
            ("Session", None),
            ("missing", None),
        ];
        for (name, expected) in cases {
            assert_eq!(cookie_value(header, name), expected, "{name}");
        }
        assert_eq!(cookie_value("a=\"", "a"), Some("\""));
        assert_eq!(cookie_value("", "a"), None);
    }

    #[test]
    fn origins_pass_when_absent_listed_or_any() {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let allowed = list(&["https://app.example.com", "http://*.local.test:8080"]);
        assert!(origin_allowed(None, &allowed), "no Origin: not a browser");
        assert!(
            origin_allowed(None, &[]),
            "no Origin passes even an empty list"
        );
        assert!(origin_allowed(Some("https://app.example.com"), &allowed));
        assert!(origin_allowed(Some("HTTPS://App.Example.COM"), &allowed));
        assert!(origin_allowed(Some("http://a.b.local.test:8080"), &allowed));
        assert!(!origin_allowed(Some("https://evil.example"), &allowed));
        assert!(!origin_allowed(
            Some("https://app.example.com.evil"),
            &allowed
        ));
        assert!(!origin_allowed(Some("http://x.local.test:9090"), &allowed));
        assert!(!origin_allowed(Some("null"), &allowed));
        assert!(!origin_allowed(Some("https://app.example.com"), &[]));
        assert!(origin_allowed(Some("null"), &list(&["*"])));
    }

    #[test]
    fn a_refused_origin_is_a_403_with_its_reason() {
        let text = String::from_utf8(response_reject(&ORIGIN_NOT_ALLOWED)).unwrap();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
        assert!(text.ends_with("server.allowed_origins\n"), "{text}");
    }
}
