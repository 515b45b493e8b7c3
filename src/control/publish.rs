//! The publish API and the key that guards `/api/v1/`.
//!
//! Owns: parsing and validating publish requests, the API key check. Never: builds the wire
//! message ([`Server::publish`] does) or retries a publication.
//!
//! A request is parsed and every publication in it validated before the first is published, so
//! a bad element refuses the whole request with nothing sent. Only `OVERLOADED` (a full queue
//! to an owner shard) can stop a batch part-way; its message says how many went out before.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::error::Category;
use serde_json::value::RawValue;
use wse_shards::protocol::topic_problem;
use wse_shards::{PublishError, Server};

use super::{ApiError, ApiErrorCode, Shared};

/// The event type a publication gets when the request names none.
const DEFAULT_EVENT: &str = "publication";

/// One publication as the API takes it: `{"topic":"...","event":"...","data":<any JSON>}`.
/// Unknown fields are refused so that a misspelt `data` or `event` is not published silently
/// as `null` or `"publication"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Publication<'a> {
    topic: String,
    #[serde(default)]
    event: Option<String>,
    /// Passed through verbatim (no re-encoding); absent or `null` publish `null`.
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

impl Publication<'_> {
    fn event(&self) -> &str {
        self.event.as_deref().unwrap_or(DEFAULT_EVENT)
    }

    fn data(&self) -> &RawValue {
        self.data.unwrap_or(RawValue::NULL)
    }
}

/// `POST /api/v1/publish/batch`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch<'a> {
    #[serde(borrow)]
    messages: Vec<Publication<'a>>,
}

#[derive(Debug, Serialize)]
pub(super) struct Published {
    published: usize,
}

/// `POST /api/v1/publish`: one publication object, or an array of them.
pub(super) async fn publish(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Published>, ApiError> {
    let body = body.map_err(body_error)?;
    let publications = parse_publish(&body)?;
    publish_all(&state.server, &publications).map(Json)
}

/// `POST /api/v1/publish/batch`: `{"messages":[...]}` (a bare array is taken too).
pub(super) async fn publish_batch(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Published>, ApiError> {
    let body = body.map_err(body_error)?;
    let publications = parse_batch(&body)?;
    publish_all(&state.server, &publications).map(Json)
}

/// Route layer on `/api/v1/`: refuses the request before its body is read unless it carries
/// `control.api_key`.
pub(super) async fn require_api_key(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    {
        // Scoped: the guard must be gone before the await below.
        let key = state.api_key.read().unwrap_or_else(|e| e.into_inner());
        authorize(key.as_deref(), request.headers())?;
    }
    Ok(next.run(request).await)
}

/// Checks the key in `Authorization: Bearer <key>` or, failing that, `X-API-Key: <key>`.
pub(super) fn authorize(configured: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = configured else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ApiErrorCode::ApiDisabled,
            "the server API is disabled: set control.api_key to enable it",
        ));
    };
    let presented = bearer_token(headers)
        .or_else(|| headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii()));
    match presented {
        Some(key) if constant_time_eq(key, expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ApiErrorCode::Unauthorized,
            "invalid API key",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ApiErrorCode::Unauthorized,
            "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        )),
    }
}

/// The credentials of `Authorization: Bearer <token>` (the scheme is case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes().trim_ascii();
    let space = value.iter().position(|b| *b == b' ')?;
    let (scheme, token) = value.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
}

/// Compares without an early exit, so the time taken says nothing about how many leading bytes
/// of a guess were right. A length mismatch returns at once: that reveals only the key's
/// length, and the key is at least 16 characters of the operator's choosing.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold back into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// Parses `/api/v1/publish`'s body (an object or an array of objects) and validates it.
pub(super) fn parse_publish(body: &[u8]) -> Result<Vec<Publication<'_>>, ApiError> {
    let publications = match first_byte(body) {
        Some(b'[') => serde_json::from_slice(body).map_err(json_error)?,
        Some(b'{') => vec![serde_json::from_slice(body).map_err(json_error)?],
        _ => {
            // Tell malformed JSON apart from well-formed JSON of the wrong kind.
            serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(json_error)?;
            return Err(invalid_request(
                "expected a publication object or an array of them",
            ));
        }
    };
    validate(&publications)?;
    Ok(publications)
}

/// Parses `/api/v1/publish/batch`'s body (`{"messages":[...]}` or a bare array) and validates it.
pub(super) fn parse_batch(body: &[u8]) -> Result<Vec<Publication<'_>>, ApiError> {
    let publications = if first_byte(body) == Some(b'[') {
        serde_json::from_slice(body).map_err(json_error)?
    } else {
        serde_json::from_slice::<Batch<'_>>(body)
            .map_err(json_error)?
            .messages
    };
    validate(&publications)?;
    Ok(publications)
}

/// What serde cannot check: the topic rules the engine enforces, and a non-empty event type.
fn validate(publications: &[Publication<'_>]) -> Result<(), ApiError> {
    // Name the element only in batches; a single publication's error needs no index.
    let at = |i: usize| {
        if publications.len() > 1 {
            format!("messages[{i}]: ")
        } else {
            String::new()
        }
    };
    for (i, p) in publications.iter().enumerate() {
        if let Some(problem) = topic_problem(&p.topic) {
            return Err(invalid_topic(&format!("{}{problem}", at(i))));
        }
        if p.event().is_empty() {
            return Err(invalid_request(format!("{}event must not be empty", at(i))));
        }
    }
    Ok(())
}

/// Publishes in request order; stops at the first full queue and says how many went out.
fn publish_all(server: &Server, publications: &[Publication<'_>]) -> Result<Published, ApiError> {
    for (i, p) in publications.iter().enumerate() {
        match server.publish(&p.topic, p.event(), p.data()) {
            Ok(()) => {}
            Err(PublishError::InvalidTopic(problem)) => return Err(invalid_topic(problem)),
            Err(PublishError::NotAnObject) => {
                return Err(invalid_request("the message must be a JSON object"));
            }
            Err(PublishError::Overloaded) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ApiErrorCode::Overloaded,
                    format!(
                        "the queue to the shard owning topic {:?} is full; {i} of {} \
                         publications were published before it",
                        p.topic,
                        publications.len()
                    ),
                ));
            }
        }
    }
    Ok(Published {
        published: publications.len(),
    })
}

fn first_byte(body: &[u8]) -> Option<u8> {
    body.trim_ascii_start().first().copied()
}

/// Syntax errors are `INVALID_JSON`; well-formed JSON of the wrong shape is `INVALID_REQUEST`.
pub(super) fn json_error(e: serde_json::Error) -> ApiError {
    match e.classify() {
        Category::Data => invalid_request(e.to_string()),
        Category::Syntax | Category::Eof | Category::Io => ApiError::new(
            StatusCode::BAD_REQUEST,
            ApiErrorCode::InvalidJson,
            format!("malformed JSON: {e}"),
        ),
    }
}

/// An unreadable body: over `limits.max_message_size` (413), or cut short (400).
pub(super) fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ApiErrorCode::PayloadTooLarge,
            "the body is larger than limits.max_message_size",
        )
    } else {
        invalid_request(rejection.body_text())
    }
}

fn invalid_request(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        ApiErrorCode::InvalidRequest,
        message,
    )
}

fn invalid_topic(problem: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        ApiErrorCode::InvalidTopic,
        format!("invalid topic: {problem}"),
    )
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use serde_json::json;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    fn code(r: Result<Vec<Publication<'_>>, ApiError>) -> &'static str {
        r.expect_err("should be refused").code
    }

    #[test]
    fn constant_time_eq_compares_bytes() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"secret-key-12345", b"secret-key-12345"));
        assert!(!constant_time_eq(b"secret-key-12345", b"secret-key-12346"));
        assert!(!constant_time_eq(b"Secret-key-12345", b"secret-key-12345"));
        assert!(!constant_time_eq(b"secret", b"secret-key-12345"));
        assert!(!constant_time_eq(b"secret-key-12345", b""));
    }

    #[test]
    fn authorize_accepts_bearer_or_x_api_key() {
        let key = Some("k".repeat(16));
        let key = key.as_deref();
        let good = "k".repeat(16);
        assert!(
            authorize(
                key,
                &headers(&[("authorization", &format!("Bearer {good}"))])
            )
            .is_ok()
        );
        assert!(
            authorize(
                key,
                &headers(&[("authorization", &format!("bearer  {good} "))])
            )
            .is_ok()
        );
        assert!(authorize(key, &headers(&[("x-api-key", &good)])).is_ok());
        // A non-Bearer Authorization header does not hide a valid X-API-Key.
        let both = headers(&[
            ("authorization", "Basic Zm9vOmJhcg=="),
            ("x-api-key", &good),
        ]);
        assert!(authorize(key, &both).is_ok());
    }

    #[test]
    fn authorize_refuses_missing_wrong_or_unconfigured_keys() {
        let key = Some("k".repeat(16));
        let key = key.as_deref();
        let e = authorize(key, &HeaderMap::new()).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
        );
        let e = authorize(key, &headers(&[("authorization", "Bearer nope")])).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
        );
        let e = authorize(key, &headers(&[("authorization", &"k".repeat(16))])).unwrap_err();
        assert_eq!(e.code, "UNAUTHORIZED", "the key without the Bearer scheme");
        let e = authorize(None, &headers(&[("x-api-key", &"k".repeat(16))])).unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::FORBIDDEN, "API_DISABLED"));
        assert!(e.message.contains("control.api_key"));
    }

    #[test]
    fn single_publication_defaults_event_and_data() {
        let p = parse_publish(br#" {"topic":"news"} "#).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].topic.as_str(), p[0].event()), ("news", "publication"));
        assert_eq!(p[0].data().get(), "null");
        let p = parse_publish(br#"{"topic":"t","event":"e","data":null}"#).unwrap();
        assert_eq!(p[0].data().get(), "null");
    }

    #[test]
    fn data_passes_through_verbatim() {
        let body = br#"{"topic":"a\/b","event":"tick","data":{"x":[1,2.50,"\u00e9"]}}"#;
        let p = parse_publish(body).unwrap();
        assert_eq!(p[0].topic, "a/b");
        assert_eq!(p[0].event(), "tick");
        assert_eq!(p[0].data().get(), r#"{"x":[1,2.50,"\u00e9"]}"#);
    }

    #[test]
    fn arrays_and_message_batches_keep_their_order() {
        let body = br#"[{"topic":"a","data":1},{"topic":"b","event":"x","data":2}]"#;
        let p = parse_publish(body).unwrap();
        let got: Vec<_> = p
            .iter()
            .map(|p| (p.topic.as_str(), p.data().get()))
            .collect();
        assert_eq!(got, [("a", "1"), ("b", "2")]);
        let p = parse_batch(br#"{"messages":[{"topic":"a"},{"topic":"b"}]}"#).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(parse_batch(br#"[{"topic":"c"}]"#).unwrap().len(), 1);
        assert!(parse_publish(b"[]").unwrap().is_empty());
    }

    #[test]
    fn malformed_json_is_invalid_json() {
        for body in [
            &b""[..],
            b"{",
            b"[{\"topic\":\"a\"}",
            b"{\"topic\":\"a\"} x",
            b"nope",
        ] {
            assert_eq!(code(parse_publish(body)), "INVALID_JSON", "{body:?}");
        }
        assert_eq!(code(parse_batch(b"{\"messages\":[")), "INVALID_JSON");
    }

    #[test]
    fn wrong_shapes_are_invalid_requests() {
        let cases: [&[u8]; 7] = [
            b"42",
            b"\"news\"",
            b"{}",
            br#"{"topic":5}"#,
            br#"{"topic":"a","event":7}"#,
            br#"{"topic":"a","payload":{}}"#,
            br#"[{"topic":"a"},"b"]"#,
        ];
        for body in cases {
            assert_eq!(code(parse_publish(body)), "INVALID_REQUEST", "{body:?}");
        }
        assert_eq!(code(parse_batch(br#"{"topic":"a"}"#)), "INVALID_REQUEST");
        assert_eq!(code(parse_batch(br#"{"messages":{}}"#)), "INVALID_REQUEST");
        assert_eq!(
            code(parse_publish(br#"{"topic":"a","event":""}"#)),
            "INVALID_REQUEST"
        );
    }

    #[test]
    fn a_bad_topic_anywhere_refuses_the_whole_batch() {
        assert_eq!(code(parse_publish(br#"{"topic":""}"#)), "INVALID_TOPIC");
        let long = format!(r#"{{"topic":"{}"}}"#, "x".repeat(1025));
        assert_eq!(code(parse_publish(long.as_bytes())), "INVALID_TOPIC");
        let e = parse_batch(br#"{"messages":[{"topic":"ok"},{"topic":"bad\n"}]}"#).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, "INVALID_TOPIC")
        );
        assert!(e.message.contains("messages[1]"), "{}", e.message);
    }

    #[test]
    fn errors_have_the_documented_json_shape() {
        let e = invalid_topic("empty topic");
        assert_eq!(
            e.body(),
            json!({"error": {"code": "INVALID_TOPIC", "message": "invalid topic: empty topic"}})
        );
        let published = serde_json::to_value(Published { published: 3 }).unwrap();
        assert_eq!(published, json!({"published": 3}));
    }
}
