//! The WSE JSON layer (protocol.md §2–§7), sans-IO: inbound message bytes in, typed messages out;
//! outbound messages as compact JSON bytes with the field order the clients expect.
//!
//! Owns: message shapes and their encodings (`C:` zlib, `M:` MessagePack). Never: decides what to
//! do with a message (the connection does), reads a clock (callers pass [`Clock`]).

use std::borrow::Cow;
use std::io::{Read, Write};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::{Config, PROTOCOL_VERSION, TOPIC_LEN_MAX};
use crate::msgpack_json::{TranscodeError, msgpack_to_json};

/// The server version reported in `server_hello`.
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Deepest nesting accepted in an inbound MessagePack message.
pub const MSGPACK_DEPTH_MAX: usize = 64;
/// Deepest nesting of arrays and objects accepted in an inbound JSON message, the message's own
/// object counting as one level (the same bound as [`MSGPACK_DEPTH_MAX`]). Deeper messages are
/// refused with `INVALID_MESSAGE` and never reach subscribers, presence or the event stream:
/// what we relay, backends and browsers parse, often recursively (Python's `json` raises
/// `RecursionError` near 1 000 levels, and 10 KB hold 5 000).
pub const JSON_DEPTH_MAX: usize = 64;

/// The time as the protocol layer needs it: monotonic for deadlines, wall for timestamps.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Monotonic time, for deadlines (pings, idle, rate limits).
    pub now: Instant,
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
}

impl Clock {
    /// Reads both clocks. Only the I/O layer calls this; everything below takes a `Clock`.
    pub fn read() -> Self {
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            now: Instant::now(),
            wall_ms,
        }
    }

    /// Milliseconds on the monotonic clock since the process first asked: for durations that a
    /// step of the wall clock (NTP, an operator) must not stretch or shrink, like rate limits.
    pub fn mono_ms(&self) -> u64 {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let origin = *ORIGIN.get_or_init(|| self.now);
        self.now.saturating_duration_since(origin).as_millis() as u64
    }

    /// `2026-11-22T04:17:12.065Z`.
    pub fn iso(&self) -> String {
        iso8601(self.wall_ms)
    }
}

/// Formats Unix milliseconds as ISO 8601 UTC with millisecond precision.
pub fn iso8601(wall_ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(wall_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

// ------------------------------------------------------------------------------------------------
// Inbound
// ------------------------------------------------------------------------------------------------

/// Why an inbound message could not be understood; sent back as an `error` event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    /// Neither JSON nor a known binary encoding.
    #[error("message is not valid JSON")]
    NotJson,
    /// JSON, but without a string `t`.
    #[error("message has no type ('t')")]
    NoType,
    /// `C:` data that zlib cannot inflate.
    #[error("compressed message could not be inflated")]
    BadCompression,
    /// `C:` or `M:` data whose JSON would be over `limits.max_message_size`.
    #[error("message inflates past the size limit")]
    InflatedTooLarge,
    /// `M:` data that is not MessagePack the server takes (malformed, too deep, `bin`/ext, non-string keys).
    #[error("MessagePack message could not be decoded")]
    BadMsgpack,
    /// An `E:` (encrypted) frame: encryption is not offered.
    #[error("encrypted frames are not enabled on this server")]
    EncryptionNotEnabled,
    /// A message of a known type (named) whose `p` has the wrong shape.
    #[error("invalid {0} payload")]
    BadPayload(&'static str),
    /// Nested deeper than [`JSON_DEPTH_MAX`].
    #[error("message nests arrays and objects deeper than {JSON_DEPTH_MAX} levels")]
    TooDeep,
}

impl InboundError {
    /// The WSE error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            InboundError::BadPayload("subscription_update") => ErrorCode::InvalidSubscription,
            _ => ErrorCode::InvalidMessage,
        }
    }
}

/// Turns a binary frame into JSON bytes: `C:` inflates, `M:` converts MessagePack
/// (depth-capped), anything else is taken as JSON. What `C:` and `M:` produce is capped at
/// `max_len`.
///
/// # Errors
/// A payload that cannot be decoded.
pub fn binary_to_json(payload: &[u8], max_len: usize) -> Result<Cow<'_, [u8]>, InboundError> {
    if let Some(z) = payload.strip_prefix(b"C:") {
        let mut out = Vec::new();
        let mut dec = flate2::read::ZlibDecoder::new(z).take(max_len as u64 + 1);
        dec.read_to_end(&mut out)
            .map_err(|_| InboundError::BadCompression)?;
        if out.len() > max_len {
            return Err(InboundError::InflatedTooLarge);
        }
        return Ok(Cow::Owned(out));
    }
    if let Some(m) = payload.strip_prefix(b"M:") {
        // Straight to JSON text under the cap: JSON is up to 6x longer than MessagePack
        // (`\u0001` for a 1-byte char, `null,` for nil), and no `Value` tree is built.
        return match msgpack_to_json(m, max_len, MSGPACK_DEPTH_MAX) {
            Ok(json) => Ok(Cow::Owned(json)),
            Err(TranscodeError::TooLarge) => Err(InboundError::InflatedTooLarge),
            Err(TranscodeError::Invalid) => Err(InboundError::BadMsgpack),
        };
    }
    if payload.starts_with(b"E:") {
        return Err(InboundError::EncryptionNotEnabled);
    }
    Ok(Cow::Borrowed(payload))
}

/// A parsed client message, borrowing the message bytes.
#[derive(Debug)]
pub enum ClientMessage<'a> {
    /// `client_hello`: answered with `server_hello`.
    Hello {
        /// The client's protocol version; the answer uses the lower of it and ours.
        protocol_version: u32,
    },
    /// `{"t":"ping","p":{"timestamp":<ms>}}`; the timestamp is echoed verbatim.
    Ping {
        /// The client's timestamp, echoed in the PONG.
        timestamp: Option<&'a RawValue>,
    },
    /// The client's answer to our ping: activity only.
    Pong,
    /// `subscription_update` with `action: subscribe`.
    Subscribe(Subscription<'a>),
    /// `subscription_update` with `action: unsubscribe`.
    Unsubscribe {
        /// The topics to leave.
        topics: Vec<Cow<'a, str>>,
    },
    /// `publish`: a publication to a topic, if the connection's publish rights allow it.
    Publish {
        /// The topic to publish to.
        topic: Cow<'a, str>,
        /// The event type subscribers get as `t`.
        event: Cow<'a, str>,
        /// The payload subscribers get as `p`, verbatim.
        data: &'a RawValue,
        /// Answer with `publish_ack` once the owner has sequenced it.
        ack: bool,
    },
    /// `{"t":"batch","p":{"messages":[...]}}`: each element is a message of its own.
    Batch(Vec<&'a RawValue>),
    /// `{"t":"presence_update","p":{"data":{..}}}`: new presence data for all the user's topics.
    PresenceUpdate {
        /// The new data, verbatim JSON.
        data: &'a RawValue,
    },
    /// Any other type: an application event for the event stream.
    App {
        /// The message's type.
        t: Cow<'a, str>,
    },
}

/// The payload of a subscribe request (protocol.md §3).
#[derive(Debug, Default)]
pub struct Subscription<'a> {
    /// Topics to subscribe to, as sent (validated later, one by one).
    pub topics: Vec<Cow<'a, str>>,
    /// `recover: true`: replay what was missed from the positions in `recovery`.
    pub recover: bool,
    /// `{"<topic>": {"epoch": "..", "offset": n}}`, passed through to recovery.
    pub recovery: Option<&'a RawValue>,
    /// Presence data for this subscription (protocol.md §8).
    pub presence: Option<&'a RawValue>,
    /// \[ext\] Join the topics in this queue group (PROTOCOL.md, "Queue groups").
    pub queue_group: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    t: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    type_: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    p: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct HelloPayload {
    #[serde(default)]
    protocol_version: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct PingPayload<'a> {
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SubscriptionPayload<'a> {
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    topics: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    recover: Option<bool>,
    #[serde(borrow, default)]
    recovery: Option<&'a RawValue>,
    #[serde(borrow, default)]
    presence: Option<&'a RawValue>,
    #[serde(borrow, default)]
    queue_group: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct PublishPayload<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    ack: Option<bool>,
}

#[derive(Deserialize)]
struct PresencePayload<'a> {
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct BatchPayload<'a> {
    #[serde(borrow)]
    messages: Vec<&'a RawValue>,
}

fn null_raw() -> &'static RawValue {
    serde_json::from_str("null").expect("null is JSON")
}

fn empty_object_raw() -> &'static RawValue {
    serde_json::from_str("{}").expect("{} is JSON")
}

/// Parses one inbound JSON message (the legacy `WSE{`, `S{`, `U{` prefixes are accepted).
///
/// # Errors
/// Nested deeper than [`JSON_DEPTH_MAX`] (checked first: the payloads are kept as raw JSON,
/// which serde does not depth-check, and relayed), not JSON, no type, or a known type with a
/// malformed payload.
pub fn parse_client_message(json: &[u8]) -> Result<ClientMessage<'_>, InboundError> {
    let json = strip_legacy_prefix(json);
    if looks_like_json(json) && nests_deeper_than(json, JSON_DEPTH_MAX) {
        return Err(InboundError::TooDeep);
    }
    let env: Envelope<'_> = serde_json::from_slice(json).map_err(|_| InboundError::NotJson)?;
    let t = env.t.or(env.type_).ok_or(InboundError::NoType)?;
    // An absent payload reads as an empty object.
    let p = env.p.or(env.payload).unwrap_or_else(|| empty_object_raw());
    match t.as_ref() {
        "client_hello" => {
            let h: HelloPayload = parse_payload(p, "client_hello")?;
            let v = h
                .protocol_version
                .and_then(|v| v.as_u64())
                .map_or(PROTOCOL_VERSION, |v| v.min(u64::from(u32::MAX)) as u32);
            Ok(ClientMessage::Hello {
                protocol_version: v,
            })
        }
        "ping" | "PING" => {
            let p: PingPayload<'_> = parse_payload(p, "ping")?;
            Ok(ClientMessage::Ping {
                timestamp: p.timestamp,
            })
        }
        "PONG" | "pong" => Ok(ClientMessage::Pong),
        "subscription_update" | "subscription" | "subscribe" | "unsubscribe" => {
            let s: SubscriptionPayload<'_> = parse_payload(p, "subscription_update")?;
            let action = match t.as_ref() {
                "subscribe" | "unsubscribe" => t.clone(),
                _ => s.action.unwrap_or(Cow::Borrowed("subscribe")),
            };
            let topics = s
                .topics
                .ok_or(InboundError::BadPayload("subscription_update"))?;
            match action.as_ref() {
                "subscribe" => Ok(ClientMessage::Subscribe(Subscription {
                    topics,
                    recover: s.recover.unwrap_or(false),
                    recovery: s.recovery,
                    presence: s.presence,
                    queue_group: s.queue_group,
                })),
                "unsubscribe" => Ok(ClientMessage::Unsubscribe { topics }),
                _ => Err(InboundError::BadPayload("subscription_update")),
            }
        }
        "publish" => {
            let p: PublishPayload<'_> = parse_payload(p, "publish")?;
            Ok(ClientMessage::Publish {
                topic: p.topic,
                event: p.event.unwrap_or(Cow::Borrowed("publication")),
                data: p.data.unwrap_or_else(|| null_raw()),
                ack: p.ack.unwrap_or(false),
            })
        }
        "batch" => {
            let b: BatchPayload<'_> = parse_payload(p, "batch")?;
            Ok(ClientMessage::Batch(b.messages))
        }
        "presence_update" => {
            let u: PresencePayload<'_> = parse_payload(p, "presence_update")?;
            Ok(ClientMessage::PresenceUpdate { data: u.data })
        }
        _ => Ok(ClientMessage::App { t }),
    }
}

fn parse_payload<'a, T: Deserialize<'a>>(
    raw: &'a RawValue,
    what: &'static str,
) -> Result<T, InboundError> {
    serde_json::from_str(raw.get()).map_err(|_| InboundError::BadPayload(what))
}

/// Whether `json` nests arrays and objects more than `max` levels deep.
///
/// A byte scan counting `[`/`{` against `]`/`}` outside strings, not a parse: it runs on every
/// inbound message before serde does, costs one pass without allocating, and sees through the
/// payloads we keep as [`RawValue`] (`data`, `presence`, `recovery`, batch items, application
/// messages), which serde_json validates with its own recursion limit (128) only when it parses
/// them into types. It does not validate: unbalanced or malformed input is serde's to refuse.
pub fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut bytes = json.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'"' => {
                // Skip the string: brackets inside it are text, and `\"` does not end it.
                while let Some(&c) = bytes.next() {
                    match c {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        _ => {}
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Whether the message starts as a JSON object or array would (after blanks). Anything else is
/// not JSON to us, however many brackets it holds: it goes on as not JSON (and, unparsable as
/// it is, to the event stream as `raw`/`bin`), never refused as too deep.
fn looks_like_json(json: &[u8]) -> bool {
    json.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| matches!(b, b'{' | b'['))
}

fn strip_legacy_prefix(json: &[u8]) -> &[u8] {
    if json.starts_with(b"WSE{") {
        &json[3..]
    } else if json.starts_with(b"S{") || json.starts_with(b"U{") {
        &json[1..]
    } else {
        json
    }
}

/// Why a topic name is refused, or `None` when it is acceptable (protocol.md §3).
pub fn topic_problem(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        Some("empty topic")
    } else if topic.len() > TOPIC_LEN_MAX {
        Some("topic longer than 1024 bytes")
    } else if topic.chars().any(char::is_control) {
        Some("topic contains control characters")
    } else {
        None
    }
}

/// Longest queue-group name, bytes.
pub const QUEUE_GROUP_LEN_MAX: usize = 256;

/// Why a queue-group name is refused (the subscription's topics fail with this reason), or
/// `None` when it is acceptable.
pub fn queue_group_problem(group: &str) -> Option<ErrorCode> {
    if group.is_empty() || group.len() > QUEUE_GROUP_LEN_MAX || group.chars().any(char::is_control)
    {
        Some(ErrorCode::InvalidQueueGroup)
    } else {
        None
    }
}

// ------------------------------------------------------------------------------------------------
// Outbound
// ------------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Out<'a, P: Serialize> {
    c: &'a str,
    t: &'a str,
    p: P,
    v: u32,
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("our own message types serialise")
}

#[derive(Serialize)]
struct Features {
    compression: bool,
    encryption: bool,
    batching: bool,
    priority_queue: bool,
    circuit_breaker: bool,
    rust_transport: bool,
    rust_jwt: bool,
    recovery: bool,
}

/// `server_ready`: always the first frame on a connection (protocol.md §2).
pub fn server_ready(connection_id: &str, user_id: &str, recovery: bool, clock: &Clock) -> Vec<u8> {
    #[derive(Serialize)]
    struct Details<'a> {
        version: u32,
        features: Features,
        connection_id: &'a str,
        server_time: &'a str,
        user_id: &'a str,
    }
    #[derive(Serialize)]
    struct P<'a> {
        message: &'a str,
        details: Details<'a>,
    }
    #[derive(Serialize)]
    struct Ready<'a> {
        c: &'a str,
        t: &'a str,
        p: P<'a>,
        id: String,
        ts: &'a str,
        seq: u64,
        v: u32,
    }
    let now = clock.iso();
    to_json(&Ready {
        c: "WSE",
        t: "server_ready",
        p: P {
            message: "Connection established",
            details: Details {
                version: PROTOCOL_VERSION,
                features: Features {
                    compression: true,
                    encryption: false,
                    batching: true,
                    // Not implemented here: no priority queue, no server-side circuit breaker
                    // (protocol.md §2: every flag states what this server really does).
                    priority_queue: false,
                    circuit_breaker: false,
                    rust_transport: true,
                    rust_jwt: true,
                    recovery,
                },
                connection_id,
                server_time: &now,
                user_id,
            },
        },
        id: uuid::Uuid::now_v7().to_string(),
        ts: &now,
        seq: 1,
        v: PROTOCOL_VERSION,
    })
}

/// `server_hello`: the answer to every `client_hello` (protocol.md §2).
pub fn server_hello(
    connection_id: &str,
    protocol_version: u32,
    recovery: bool,
    cfg: &Config,
    clock: &Clock,
) -> Vec<u8> {
    #[derive(Serialize)]
    struct HelloFeatures {
        compression: bool,
        recovery: bool,
        cluster: bool,
        batching: bool,
        priority_queue: bool,
        msgpack: bool,
        encryption: bool,
    }
    #[derive(Serialize)]
    struct Limits {
        max_message_size: usize,
        rate_limit_capacity: u32,
        rate_limit_refill: u32,
        max_queue_size: usize,
    }
    #[derive(Serialize)]
    struct P<'a> {
        server_version: &'a str,
        protocol_version: u32,
        features: HelloFeatures,
        limits: Limits,
        ping_interval: u64,
        connection_id: &'a str,
        server_time: String,
    }
    to_json(&Out {
        c: "WSE",
        t: "server_hello",
        p: P {
            server_version: SERVER_VERSION,
            protocol_version: protocol_version.min(PROTOCOL_VERSION),
            features: HelloFeatures {
                compression: true,
                recovery,
                // Publications and interest cross nodes whenever the cluster runs.
                cluster: cfg.cluster.enabled,
                batching: true,
                priority_queue: false,
                msgpack: true,
                encryption: false,
            },
            limits: Limits {
                max_message_size: cfg.limits.max_message_size,
                rate_limit_capacity: cfg.protocol.rate_limit_capacity,
                rate_limit_refill: cfg.protocol.rate_limit_refill,
                max_queue_size: cfg.limits.max_outbound_queue_bytes,
            },
            ping_interval: cfg.protocol.ping_interval.as_millis() as u64,
            connection_id,
            server_time: clock.iso(),
        },
        v: PROTOCOL_VERSION,
    })
}

/// The server's ping: compact text with `"t":"ping"` in the first 25 characters (the Python
/// client's liveness watchdog looks there).
pub fn ping(clock: &Clock) -> Vec<u8> {
    #[derive(Serialize)]
    struct P {
        server_time: String,
    }
    #[derive(Serialize)]
    struct Ping<'a> {
        c: &'a str,
        t: &'a str,
        p: P,
    }
    to_json(&Ping {
        c: "WSE",
        t: "ping",
        p: P {
            server_time: clock.iso(),
        },
    })
}

/// The answer to a client ping: compact text with `"t":"PONG"` in the first 25 characters.
pub fn pong(client_timestamp: Option<&RawValue>, clock: &Clock) -> Vec<u8> {
    #[derive(Serialize)]
    struct P<'a> {
        client_timestamp: &'a RawValue,
        server_timestamp: u64,
        latency: u64,
    }
    let client = client_timestamp.unwrap_or_else(|| null_raw());
    // Latency is only meaningful when the client sent a plausible epoch-milliseconds stamp.
    let latency = serde_json::from_str::<f64>(client.get())
        .ok()
        .filter(|ts| *ts > 0.0 && *ts <= clock.wall_ms as f64)
        .map_or(0, |ts| clock.wall_ms - ts as u64);
    to_json(&Out {
        c: "WSE",
        t: "PONG",
        p: P {
            client_timestamp: client,
            server_timestamp: clock.wall_ms,
            latency,
        },
        v: PROTOCOL_VERSION,
    })
}

/// Every error code the server puts on the wire: the `code` of an `error` message
/// (PROTOCOL.md §10) and the `reason` of a topic refused in a `subscription_update`. One
/// mapping to the wire string: [`ErrorCode::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The upgrade's token was refused (bad signature, expired, wrong claims); close 4401
    /// follows.
    AuthFailed,
    /// Authentication is on and the upgrade carried no token; close 4401 follows.
    AuthRequired,
    /// A message was dropped by the inbound rate limit (at most one notice per second); the
    /// only code sent with `retry_after`.
    RateLimited,
    /// A message over `limits.max_message_size`; close 1009 follows.
    MessageTooLarge,
    /// Not JSON, no `t`, a payload of the wrong shape, a nested batch, presence while presence
    /// is off, a malformed topic in a publish.
    InvalidMessage,
    /// A `subscription_update` whose payload has the wrong shape.
    InvalidSubscription,
    /// The connection's ACL does not permit the publish or subscribe.
    Forbidden,
    /// A subscription past `limits.max_subscriptions_per_connection`.
    SubscriptionLimit,
    /// Presence data over `presence.max_data_size`.
    PresenceDataTooLarge,
    /// The topic already has `presence.max_members` members.
    PresenceLimit,
    /// A queue-group name that is empty, too long or has control characters.
    InvalidQueueGroup,
    /// The connection may not join the queue group it names.
    QueueGroupForbidden,
    /// The topic already has `QUEUE_GROUPS_PER_TOPIC_MAX` queue groups.
    QueueGroupLimit,
    /// The server could not reach the topic's owner shard: the cross-shard fabric was over its
    /// budget (`limits.fabric_memory_per_shard`) and dropped the request. Retrying later may
    /// succeed.
    ServerBusy,
}

impl ErrorCode {
    /// The string on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AuthFailed => "AUTH_FAILED",
            Self::AuthRequired => "AUTH_REQUIRED",
            Self::RateLimited => "RATE_LIMITED",
            Self::MessageTooLarge => "MESSAGE_TOO_LARGE",
            Self::InvalidMessage => "INVALID_MESSAGE",
            Self::InvalidSubscription => "INVALID_SUBSCRIPTION",
            Self::Forbidden => "FORBIDDEN",
            Self::SubscriptionLimit => "SUBSCRIPTION_LIMIT",
            Self::PresenceDataTooLarge => "PRESENCE_DATA_TOO_LARGE",
            Self::PresenceLimit => "PRESENCE_LIMIT",
            Self::InvalidQueueGroup => "INVALID_QUEUE_GROUP",
            Self::QueueGroupForbidden => "QUEUE_GROUP_FORBIDDEN",
            Self::QueueGroupLimit => "QUEUE_GROUP_LIMIT",
            Self::ServerBusy => "SERVER_BUSY",
        }
    }
}

/// An `error` event (protocol.md §10). `recoverable: false` only when the connection is about to
/// be closed.
pub fn error(code: ErrorCode, message: &str, recoverable: bool, clock: &Clock) -> Vec<u8> {
    #[derive(Serialize)]
    struct P<'a> {
        code: &'a str,
        message: &'a str,
        recoverable: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after: Option<f64>,
        timestamp: String,
    }
    let retry_after = (code == ErrorCode::RateLimited).then_some(1.0);
    to_json(&Out {
        c: "WSE",
        t: "error",
        p: P {
            code: code.as_str(),
            message,
            recoverable,
            retry_after,
            timestamp: clock.iso(),
        },
        v: PROTOCOL_VERSION,
    })
}

/// `rate_limit_warning` (protocol.md §7).
pub fn rate_limit_warning(current_rate: u32, limit: u32, remaining: u32) -> Vec<u8> {
    #[derive(Serialize)]
    struct P {
        current_rate: u32,
        limit: u32,
        remaining: u32,
        retry_after: f64,
    }
    to_json(&Out {
        c: "WSE",
        t: "rate_limit_warning",
        p: P {
            current_rate,
            limit,
            remaining,
            retry_after: 1.0,
        },
        v: PROTOCOL_VERSION,
    })
}

/// A topic refused in a subscription, with why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailedTopic {
    /// The topic as the client sent it.
    pub topic: String,
    /// Why it was refused: an [`ErrorCode`]'s string, or what is wrong with the topic's name
    /// ([`topic_problem`]).
    pub reason: String,
}

/// Where a topic's history stands for one connection, as the acknowledgement reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryInfo {
    /// The topic history's epoch; a client's offsets are only meaningful within one epoch.
    pub epoch: u32,
    /// The inclusive last offset the connection has now (replayed or current).
    pub offset: u64,
    /// The replay covered the whole gap (exactly the missed offsets, in order).
    pub recovered: bool,
    /// Frames replayed.
    pub count: u32,
}

/// The `subscription_update` acknowledgement (protocol.md §3). `success` is true when no topic
/// failed (the TS client confirms topics only then). `recovery` lists the topics a recovery was
/// asked for (omitted when empty).
pub fn subscription_ack(
    action: &str,
    success_topics: &[&str],
    failed_topics: &[FailedTopic],
    recovery: &[(String, RecoveryInfo)],
) -> Vec<u8> {
    #[derive(Serialize)]
    struct Info {
        epoch: String,
        offset: u64,
        recovered: bool,
        count: u32,
    }
    #[derive(Serialize)]
    struct P<'a> {
        action: &'a str,
        success: bool,
        success_topics: &'a [&'a str],
        failed_topics: &'a [FailedTopic],
        #[serde(skip_serializing_if = "Option::is_none")]
        recovery: Option<std::collections::BTreeMap<&'a str, Info>>,
    }
    let recovery = (!recovery.is_empty()).then(|| {
        recovery
            .iter()
            .map(|(t, r)| {
                let info = Info {
                    epoch: epoch_hex(r.epoch),
                    offset: r.offset,
                    recovered: r.recovered,
                    count: r.count,
                };
                (t.as_str(), info)
            })
            .collect()
    });
    to_json(&Out {
        c: "WSE",
        t: "subscription_update",
        p: P {
            action,
            success: failed_topics.is_empty(),
            success_topics,
            failed_topics,
            recovery,
        },
        v: PROTOCOL_VERSION,
    })
}

/// An epoch as the clients see it: 8 lowercase hex digits.
pub fn epoch_hex(epoch: u32) -> String {
    format!("{epoch:08x}")
}

/// Parses an epoch sent back by a client.
pub fn parse_epoch(s: &str) -> Option<u32> {
    (s.len() == 8)
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
}

/// `publish_ack` for a client publish with `ack: true`: the publication's per-topic offset, and
/// the topic history's epoch when recovery is on.
pub fn publish_ack(topic: &str, epoch: Option<u32>, offset: u64) -> Vec<u8> {
    #[derive(Serialize)]
    struct P<'a> {
        topic: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        offset: u64,
    }
    to_json(&Out {
        c: "WSE",
        t: "publish_ack",
        p: P {
            topic,
            epoch: epoch.map(epoch_hex),
            offset,
        },
        v: PROTOCOL_VERSION,
    })
}

/// A publication frame's text with recovery stamps: `{"tp":<topic>,"e":"<epoch>","o":<offset>,`
/// followed by the unstamped text after its opening brace (protocol.md §5: stamps before `c`).
pub fn stamped(topic: &str, epoch: u32, offset: u64, body: &[u8]) -> Vec<u8> {
    debug_assert_eq!(body.first(), Some(&b'{'), "a publication is a JSON object");
    let mut out = Vec::with_capacity(body.len() + topic.len() + 40);
    out.extend_from_slice(b"{\"tp\":");
    serde_json::to_writer(&mut out, topic).expect("a str serialises");
    out.extend_from_slice(b",\"e\":\"");
    out.extend_from_slice(epoch_hex(epoch).as_bytes());
    out.extend_from_slice(b"\",\"o\":");
    out.extend_from_slice(offset.to_string().as_bytes());
    let rest = &body[1..];
    // An empty object (`{}`, `{ }`) has no member to put a comma before.
    if rest.trim_ascii_start().first() != Some(&b'}') {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    out
}

/// `presence_join` / `presence_leave` / `presence_update` for a topic's subscribers.
pub fn presence_event(kind: &str, topic: &str, user_id: &str, data: &[u8]) -> Vec<u8> {
    #[derive(Serialize)]
    struct P<'a> {
        topic: &'a str,
        user_id: &'a str,
        data: &'a RawValue,
    }
    let data: &RawValue = std::str::from_utf8(data)
        .ok()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_else(|| empty_object_raw());
    to_json(&Out {
        c: "WSE",
        t: kind,
        p: P {
            topic,
            user_id,
            data,
        },
        v: PROTOCOL_VERSION,
    })
}

/// The frame text every subscriber of a topic receives: `{"c":"U","t":<event>,"p":<data>,"v":1}`.
/// Built once per publication.
pub fn publication(event: &str, data: &RawValue) -> Bytes {
    let mut b = BytesMut::with_capacity(event.len() + data.get().len() + 32);
    b.put_slice(b"{\"c\":\"U\",\"t\":");
    serde_json::to_writer((&mut b).writer(), event).expect("a str serialises");
    b.put_slice(b",\"p\":");
    b.put_slice(data.get().as_bytes());
    b.put_slice(b",\"v\":1}");
    b.freeze()
}

/// How a per-connection JSON message goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// A text frame of JSON.
    Text,
    /// A binary frame (`M:` MessagePack, or `C:` zlib over the compression threshold).
    Binary,
}

/// Encodes a per-connection send (protocol.md §6): `M:` MessagePack on msgpack connections,
/// else `C:` zlib when over `compression_threshold`, else plain text.
pub fn encode_for_connection(
    json: Vec<u8>,
    msgpack: bool,
    compression_threshold: usize,
) -> (Wire, Vec<u8>) {
    if msgpack
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&json)
        && let Ok(packed) = rmp_serde::to_vec_named(&v)
    {
        let mut out = Vec::with_capacity(packed.len() + 2);
        out.extend_from_slice(b"M:");
        out.extend_from_slice(&packed);
        return (Wire::Binary, out);
    }
    if json.len() > compression_threshold {
        let mut out = Vec::with_capacity(json.len() / 2 + 2);
        out.extend_from_slice(b"C:");
        let mut enc = flate2::write::ZlibEncoder::new(out, flate2::Compression::fast());
        if enc.write_all(&json).is_ok()
            && let Ok(out) = enc.finish()
        {
            return (Wire::Binary, out);
        }
    }
    (Wire::Text, json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> Clock {
        Clock {
            now: Instant::now(),
            wall_ms: 1_795_321_032_951,
        }
    }

    #[test]
    fn iso_format() {
        assert_eq!(iso8601(1_795_321_032_951), "2026-11-22T04:17:12.951Z");
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn ping_and_pong_carry_their_type_in_the_first_25_chars() {
        let c = clock();
        let ping = String::from_utf8(ping(&c)).unwrap();
        assert!(ping[..25].contains(r#""t":"ping""#), "{ping}");
        let ts: &RawValue = serde_json::from_str("1795321032900").unwrap();
        let pong = String::from_utf8(pong(Some(ts), &c)).unwrap();
        assert!(pong[..25].contains(r#""t":"PONG""#), "{pong}");
        assert_eq!(
            pong,
            r#"{"c":"WSE","t":"PONG","p":{"client_timestamp":1795321032900,"server_timestamp":1795321032951,"latency":51},"v":1}"#
        );
    }

    #[test]
    fn server_ready_shape() {
        let v: serde_json::Value =
            serde_json::from_slice(&server_ready("c1", "alice", false, &clock())).unwrap();
        assert_eq!(v["t"], "server_ready");
        assert_eq!(v["p"]["details"]["connection_id"], "c1");
        assert_eq!(v["p"]["details"]["user_id"], "alice");
        // Every flag exactly: each states what this server does (protocol.md §2).
        assert_eq!(
            v["p"]["details"]["features"],
            serde_json::json!({"compression": true, "encryption": false, "batching": true,
                "priority_queue": false, "circuit_breaker": false, "rust_transport": true,
                "rust_jwt": true, "recovery": false})
        );
        assert_eq!(v["seq"], 1);
        let text = String::from_utf8(server_ready("c1", "a", false, &clock())).unwrap();
        assert!(text.starts_with(r#"{"c":"WSE","t":"server_ready","p":{"message""#));
    }

    #[test]
    fn server_hello_features_are_what_the_server_does() {
        let cfg = Config::default();
        let v: serde_json::Value =
            serde_json::from_slice(&server_hello("c1", 7, true, &cfg, &clock())).unwrap();
        assert_eq!(v["p"]["protocol_version"], PROTOCOL_VERSION);
        assert_eq!(
            v["p"]["features"],
            serde_json::json!({"compression": true, "recovery": true, "cluster": false,
                "batching": true, "priority_queue": false, "msgpack": true, "encryption": false})
        );
    }

    #[test]
    fn parses_what_the_python_client_sends() {
        let hello = br#"{"c":"WSE","t":"client_hello","p":{"client_version":"2.0.7","protocol_version":1,"features":{}},"id":"x","ts":"y","v":1,"pri":10}"#;
        assert!(matches!(
            parse_client_message(hello),
            Ok(ClientMessage::Hello {
                protocol_version: 1
            })
        ));
        let sub = br#"{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":["a","b"]},"id":"x","seq":2}"#;
        match parse_client_message(sub).unwrap() {
            ClientMessage::Subscribe(s) => assert_eq!(s.topics, vec!["a", "b"]),
            other => panic!("{other:?}"),
        }
        let ping = br#"{"c":"WSE","t":"ping","p":{"timestamp":123},"v":1}"#;
        match parse_client_message(ping).unwrap() {
            ClientMessage::Ping { timestamp } => assert_eq!(timestamp.unwrap().get(), "123"),
            other => panic!("{other:?}"),
        }
        let publish = br#"{"c":"U","t":"publish","p":{"topic":"T","event":"chat","data":{"x":[1,2]},"ack":true}}"#;
        match parse_client_message(publish).unwrap() {
            ClientMessage::Publish {
                topic,
                event,
                data,
                ack,
            } => {
                assert_eq!(
                    (topic.as_ref(), event.as_ref(), data.get(), ack),
                    ("T", "chat", r#"{"x":[1,2]}"#, true)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_client_message(br#"U{"t":"custom","p":{}}"#),
            Ok(ClientMessage::App { .. })
        ));
    }

    #[test]
    fn malformed_messages() {
        assert_eq!(
            parse_client_message(b"not json").unwrap_err(),
            InboundError::NotJson
        );
        assert_eq!(
            parse_client_message(b"{\"p\":{}}").unwrap_err(),
            InboundError::NoType
        );
        assert_eq!(
            parse_client_message(b"[1,2]").unwrap_err(),
            InboundError::NotJson
        );
        let e =
            parse_client_message(br#"{"t":"subscription_update","p":{"topics":"a"}}"#).unwrap_err();
        assert_eq!(e.code().as_str(), "INVALID_SUBSCRIPTION");
        let e = parse_client_message(br#"{"t":"publish","p":{"event":"x"}}"#).unwrap_err();
        assert_eq!(e.code().as_str(), "INVALID_MESSAGE");
    }

    #[test]
    fn stamps_come_first_and_keep_the_body() {
        let data: &RawValue = serde_json::from_str(r#"{"n":1}"#).unwrap();
        let body = publication("tick", data);
        let stamped = String::from_utf8(stamped("a\"b", 0xdead_beef, 42, &body)).unwrap();
        assert_eq!(
            stamped,
            r#"{"tp":"a\"b","e":"deadbeef","o":42,"c":"U","t":"tick","p":{"n":1},"v":1}"#
        );
        for empty in [&b"{}"[..], b"{ }"] {
            let out = super::stamped("t", 1, 2, empty);
            let v: serde_json::Value = serde_json::from_slice(&out).expect("stamped {} is JSON");
            assert_eq!(v, serde_json::json!({"tp": "t", "e": "00000001", "o": 2}));
        }
        assert_eq!(parse_epoch("deadbeef"), Some(0xdead_beef));
        assert_eq!(parse_epoch("xyz"), None);
        assert_eq!(epoch_hex(1), "00000001");
    }

    #[test]
    fn ack_with_recovery_positions() {
        let info = RecoveryInfo {
            epoch: 0xab,
            offset: 7,
            recovered: true,
            count: 3,
        };
        let ack = String::from_utf8(subscription_ack(
            "subscribe",
            &["t"],
            &[],
            &[("t".into(), info)],
        ))
        .unwrap();
        assert!(ack.ends_with(r#""recovery":{"t":{"epoch":"000000ab","offset":7,"recovered":true,"count":3}}},"v":1}"#), "{ack}");
        let plain = String::from_utf8(subscription_ack("subscribe", &["t"], &[], &[])).unwrap();
        assert!(!plain.contains("recovery"));
    }

    #[test]
    fn publication_frame_text() {
        let data: &RawValue = serde_json::from_str(r#"{"n":1}"#).unwrap();
        assert_eq!(
            &publication("chat\"msg", data)[..],
            br#"{"c":"U","t":"chat\"msg","p":{"n":1},"v":1}"#
        );
    }

    #[test]
    fn binary_encodings_round_trip() {
        let json = br#"{"t":"x","p":{"k":"v"}}"#.to_vec();
        let (w, packed) = encode_for_connection(json.clone(), true, 1024);
        assert_eq!(w, Wire::Binary);
        let back: serde_json::Value =
            serde_json::from_slice(&binary_to_json(&packed, 1 << 20).unwrap()).unwrap();
        assert_eq!(back["p"]["k"], "v");
        let big = format!(r#"{{"t":"x","p":"{}"}}"#, "a".repeat(5000)).into_bytes();
        let (w, z) = encode_for_connection(big.clone(), false, 1024);
        assert_eq!(w, Wire::Binary);
        assert!(z.starts_with(b"C:") && z.len() < big.len());
        assert_eq!(binary_to_json(&z, 1 << 20).unwrap().as_ref(), &big[..]);
        assert_eq!(
            binary_to_json(&z, 100).unwrap_err(),
            InboundError::InflatedTooLarge
        );
        assert_eq!(
            binary_to_json(b"C:garbage", 100).unwrap_err(),
            InboundError::BadCompression
        );
        assert_eq!(
            binary_to_json(b"E:xx", 100).unwrap_err(),
            InboundError::EncryptionNotEnabled
        );
    }

    #[test]
    fn msgpack_depth_is_capped() {
        // 100 nested one-element arrays.
        let mut m = vec![0x91u8; 100];
        m.push(0xc0);
        let mut input = b"M:".to_vec();
        input.extend_from_slice(&m);
        assert_eq!(
            binary_to_json(&input, 1 << 20).unwrap_err(),
            InboundError::BadMsgpack
        );
    }

    /// `n` nested arrays around `0`.
    fn nested(n: usize) -> String {
        format!("{}0{}", "[".repeat(n), "]".repeat(n))
    }

    #[test]
    fn depth_counts_the_message_object_and_stops_at_the_limit() {
        // The message object and `p` are two levels: data may add 62 more.
        let publish = |n| {
            format!(
                r#"{{"t":"publish","p":{{"topic":"T","data":{}}}}}"#,
                nested(n)
            )
        };
        match parse_client_message(publish(JSON_DEPTH_MAX - 2).as_bytes()).unwrap() {
            ClientMessage::Publish { data, .. } => assert_eq!(data.get(), nested(62)),
            other => panic!("{other:?}"),
        }
        let e = parse_client_message(publish(JSON_DEPTH_MAX - 1).as_bytes()).unwrap_err();
        assert_eq!(e, InboundError::TooDeep);
        assert_eq!(e.code().as_str(), "INVALID_MESSAGE");
        assert!(e.to_string().contains("64 levels"), "{e}");
    }

    #[test]
    fn every_relayed_payload_is_depth_checked() {
        let deep = nested(5000);
        for message in [
            format!(r#"{{"t":"publish","p":{{"topic":"T","data":{deep}}}}}"#),
            format!(r#"{{"t":"presence_update","p":{{"data":{{"x":{deep}}}}}}}"#),
            format!(r#"{{"t":"subscription_update","p":{{"topics":["a"],"presence":{deep}}}}}"#),
            format!(
                r#"{{"t":"subscription_update","p":{{"topics":["a"],"recover":true,"recovery":{{"a":{deep}}}}}}}"#
            ),
            format!(r#"{{"t":"chat","p":{deep}}}"#),
            format!(r#"{{"t":"chat","extra":{deep}}}"#),
            format!(r#"{{"t":"batch","p":{{"messages":[{{"t":"chat","p":{deep}}}]}}}}"#),
            format!(r#"U{{"t":"chat","p":{deep}}}"#),
            format!(" \n{deep}"),
            // Unbalanced: refused on depth before serde sees it.
            "{".repeat(100),
        ] {
            assert_eq!(
                parse_client_message(message.as_bytes()).unwrap_err(),
                InboundError::TooDeep,
                "{}",
                &message[..40.min(message.len())]
            );
        }
    }

    #[test]
    fn depth_scan_skips_strings_and_their_escapes() {
        let brackets = "[".repeat(1000);
        let m = format!(r#"{{"t":"chat","p":{{"text":"{brackets}\"{brackets}\\"}}}}"#);
        assert!(matches!(
            parse_client_message(m.as_bytes()),
            Ok(ClientMessage::App { .. })
        ));
        assert!(!nests_deeper_than(br#"{"a":"\\"}"#, 1));
        assert!(nests_deeper_than(br#"{"a":"\\","b":[1]}"#, 1));
        assert!(!nests_deeper_than(br#"[[1],[2],{"x":[]}]"#, 3));
        assert!(nests_deeper_than(br#"[[1],[2],{"x":[]}]"#, 2));
        assert!(!nests_deeper_than(b"", 0));
    }

    #[test]
    fn text_that_is_not_json_is_not_refused_as_too_deep() {
        let m = format!("hello {}", "[".repeat(1000));
        assert_eq!(
            parse_client_message(m.as_bytes()).unwrap_err(),
            InboundError::NotJson
        );
    }

    #[test]
    fn topic_rules() {
        assert!(topic_problem("chat:lobby").is_none());
        assert!(topic_problem("").is_some());
        assert!(topic_problem("a\nb").is_some());
        assert!(topic_problem(&"x".repeat(1025)).is_some());
        assert!(topic_problem(&"x".repeat(1024)).is_none());
    }
}
