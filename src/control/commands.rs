//! The server API's commands: one shape per operation, shared by the HTTP endpoints (their body
//! is the command without `op` and without what the path names), `POST /api/v1/batch` and the
//! event stream's socket.
//!
//! Owns: reading a command from JSON (unknown fields refused, so a misspelt field is an error
//! rather than a silent default), running it on the engine with a time limit, and the JSON of its
//! result. Never: touches the transport (HTTP, WebSocket) it came from.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use wse_shards::close::CloseCode;
use wse_shards::command::{AppSubscribe, OutboundEvent};
use wse_shards::protocol::{epoch_hex, parse_epoch};
use wse_shards::{CommandError, ConnId, Payload, PublishError, QueryError, Server};

use super::{ApiError, ApiErrorCode};

/// How long one command may take before it fails with 504. Shards answer within a loop turn;
/// anything near this means one is stuck.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// One server API operation with its arguments.
#[derive(Debug)]
pub(super) enum ApiCommand {
    Send(Target, SendBody),
    SendEvent(Target, EventBody),
    RpcReply(Target, RpcReplyArgs),
    SendUser(SendUserArgs),
    Disconnect(Target, DisconnectArgs),
    Subscribe(Target, SubscribeArgs),
    Unsubscribe(Target, UnsubscribeArgs),
    SetAcl(Target, AclArgs),
    Broadcast(BroadcastArgs),
    BroadcastLocal(BroadcastArgs),
    BroadcastAll(SendBody),
    GetConnections,
    GetConnectionCount,
    GetTopicSubscriberCount(TopicArgs),
    Presence(TopicArgs),
    PresenceStats(TopicArgs),
    Health,
    Drain(DrainArgs),
}

/// Every operation name, as `op` takes it.
pub(super) const OPS: [&str; 18] = [
    "send",
    "send_event",
    "rpc_reply",
    "send_user",
    "disconnect",
    "subscribe",
    "unsubscribe",
    "set_acl",
    "broadcast",
    "broadcast_local",
    "broadcast_all",
    "get_connections",
    "get_connection_count",
    "get_topic_subscriber_count",
    "presence",
    "presence_stats",
    "health",
    "drain",
];

/// The connection a command is about.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Target {
    connection_id: String,
}

/// A frame: `{"text": ".."}` (a text frame, verbatim) or `{"binary": "<base64>"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SendBody {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    binary: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventBody {
    event: Box<RawValue>,
}

/// `rpc_reply`: the answer to a Centrifuge client's `rpc` (an `rpc` event's `request`): `data`
/// (any JSON; absent: none) or `error`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RpcReplyArgs {
    request: u64,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<RpcReplyError>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RpcReplyError {
    code: u32,
    #[serde(default)]
    message: String,
}

/// `send_user`: a frame or an event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SendUserArgs {
    user_id: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    binary: Option<String>,
    #[serde(default)]
    event: Option<Box<RawValue>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DisconnectArgs {
    /// Default 1000: a kick (the clients do not reconnect); 4000..=4999 make them reconnect.
    #[serde(default = "normal_closure")]
    code: u16,
    #[serde(default)]
    reason: String,
}

fn normal_closure() -> u16 {
    CloseCode::Normal.code()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubscribeArgs {
    topics: Vec<String>,
    #[serde(default)]
    presence: Option<Box<RawValue>>,
    #[serde(default)]
    queue_group: Option<String>,
    /// Replay from `recovery`'s positions (as a client's `recover: true`).
    #[serde(default)]
    recover: bool,
    /// `{"<topic>": {"epoch": "<8 hex>", "offset": n}}`.
    #[serde(default)]
    recovery: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UnsubscribeArgs {
    /// Absent: every topic.
    #[serde(default)]
    topics: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AclArgs {
    #[serde(default)]
    allow: Option<Vec<String>>,
    #[serde(default)]
    deny: Vec<String>,
}

/// `{"topic","event","data"}` (as `/api/v1/publish`) or `{"topic","message":{..}}` (the frame's
/// JSON object, sent verbatim).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BroadcastArgs {
    topic: String,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    message: Option<Box<RawValue>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TopicArgs {
    topic: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DrainArgs {
    #[serde(default = "shutdown_code")]
    close_code: u16,
    #[serde(default)]
    reason: Option<String>,
    /// Seconds; default `server.drain_timeout`.
    #[serde(default)]
    timeout: Option<f64>,
}

fn shutdown_code() -> u16 {
    CloseCode::Shutdown.code()
}

impl ApiCommand {
    /// Reads command `op` from its fields (`op` itself, and an event-stream `id`, removed).
    ///
    /// # Errors
    /// An unknown `op`, or fields that do not fit it (`INVALID_REQUEST`).
    pub(super) fn parse(op: &str, fields: Map<String, Value>) -> Result<ApiCommand, ApiError> {
        fn with_target<A: DeserializeOwned>(
            mut fields: Map<String, Value>,
        ) -> Result<(Target, A), ApiError> {
            let target = match fields.remove("connection_id") {
                Some(id) => args(json!({ "connection_id": id }).as_object().cloned().unwrap())?,
                None => return Err(invalid_request("missing field `connection_id`")),
            };
            Ok((target, args(fields)?))
        }
        Ok(match op {
            "send" => {
                let (t, a) = with_target(fields)?;
                ApiCommand::Send(t, a)
            }
            "send_event" => {
                let (t, a) = with_target(fields)?;
                ApiCommand::SendEvent(t, a)
            }
            "rpc_reply" => {
                let (t, a) = with_target(fields)?;
                ApiCommand::RpcReply(t, a)
            }
            "send_user" => ApiCommand::SendUser(args(fields)?),
            "disconnect" => {
                let (t, a) = with_target(fields)?;
                ApiCommand::Disconnect(t, a)
            }
            "subscribe" => {
                let (t, a) = with_target(fields)?;
                ApiCommand::Subscribe(t, a)
            }
            "unsubscribe" => {
                let (t, a) = with_target(fields)?;
                ApiCommand::Unsubscribe(t, a)
            }
            "set_acl" => {
                let (t, a) = with_target(fields)?;
                ApiCommand::SetAcl(t, a)
            }
            "broadcast" => ApiCommand::Broadcast(args(fields)?),
            "broadcast_local" => ApiCommand::BroadcastLocal(args(fields)?),
            "broadcast_all" => ApiCommand::BroadcastAll(args(fields)?),
            "get_connections" => no_args(fields, ApiCommand::GetConnections)?,
            "get_connection_count" => no_args(fields, ApiCommand::GetConnectionCount)?,
            "get_topic_subscriber_count" => ApiCommand::GetTopicSubscriberCount(args(fields)?),
            "presence" => ApiCommand::Presence(args(fields)?),
            "presence_stats" => ApiCommand::PresenceStats(args(fields)?),
            "health" => no_args(fields, ApiCommand::Health)?,
            "drain" => ApiCommand::Drain(args(fields)?),
            other => {
                return Err(invalid_request(format!(
                    "unknown op {other:?}; one of: {}",
                    OPS.join(", ")
                )));
            }
        })
    }

    /// Runs the command, at most [`COMMAND_TIMEOUT`].
    ///
    /// # Errors
    /// What the engine refused, mapped to an HTTP status and code.
    pub(super) async fn execute(self, server: &Arc<Server>) -> Result<Value, ApiError> {
        match tokio::time::timeout(COMMAND_TIMEOUT, self.run(server)).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                ApiErrorCode::Timeout,
                "a shard did not answer in time",
            )),
        }
    }

    async fn run(self, server: &Arc<Server>) -> Result<Value, ApiError> {
        match self {
            ApiCommand::Send(t, body) => {
                let payload = body.payload()?;
                let sent = match payload {
                    Payload::Text(text) => {
                        let text = std::str::from_utf8(&text).expect("from a String");
                        server.send(t.conn()?, text).await
                    }
                    Payload::Binary(bytes) => server.send_bytes(t.conn()?, &bytes).await,
                    Payload::Event(_) => unreachable!("SendBody has no event"),
                }
                .map_err(command_error)?;
                Ok(json!({"bytes": sent.bytes, "duplicate": sent.duplicate}))
            }
            ApiCommand::SendEvent(t, body) => {
                let sent = server
                    .send_event(t.conn()?, body.event.get())
                    .await
                    .map_err(command_error)?;
                Ok(json!({"bytes": sent.bytes, "duplicate": sent.duplicate}))
            }
            ApiCommand::RpcReply(t, a) => {
                let result = match (a.data, a.error) {
                    (data, None) => Ok(data.map_or_else(Bytes::new, |d| {
                        Bytes::from(String::from(Box::<str>::from(d)))
                    })),
                    (None, Some(e)) => Err(wse_shards::centrifuge::RpcError {
                        code: e.code,
                        message: e.message,
                    }),
                    (Some(_), Some(_)) => {
                        return Err(invalid_request("give `data` or `error`, not both"));
                    }
                };
                server
                    .rpc_reply(t.conn()?, a.request, result)
                    .await
                    .map_err(command_error)?;
                Ok(json!({"replied": true}))
            }
            ApiCommand::SendUser(a) => {
                let payload = match (&a.event, a.text, a.binary) {
                    (Some(event), None, None) => Payload::Event(Arc::new(
                        OutboundEvent::parse(event.get()).map_err(command_error)?,
                    )),
                    (None, text, binary) => SendBody { text, binary }.payload()?,
                    _ => return Err(invalid_request("give one of `text`, `binary`, `event`")),
                };
                let n = server
                    .send_user(&a.user_id, payload)
                    .await
                    .map_err(command_error)?;
                Ok(json!({"connections": n}))
            }
            ApiCommand::Disconnect(t, a) => {
                server
                    .disconnect(t.conn()?, a.code, &a.reason)
                    .await
                    .map_err(command_error)?;
                Ok(json!({"disconnected": true}))
            }
            ApiCommand::Subscribe(t, a) => {
                let conn = t.conn()?;
                let sub = a.into_request()?;
                let out = server
                    .subscribe_connection(conn, sub)
                    .await
                    .map_err(command_error)?;
                let recovery: Map<String, Value> = out
                    .recovery
                    .iter()
                    .map(|(topic, r)| {
                        let info = json!({"epoch": epoch_hex(r.epoch), "offset": r.offset,
                            "recovered": r.recovered, "count": r.count});
                        (topic.clone(), info)
                    })
                    .collect();
                Ok(json!({"success_topics": out.success_topics,
                    "failed_topics": out.failed_topics, "recovery": recovery}))
            }
            ApiCommand::Unsubscribe(t, a) => {
                let left = server
                    .unsubscribe_connection(t.conn()?, a.topics)
                    .await
                    .map_err(command_error)?;
                Ok(json!({"unsubscribed": left}))
            }
            ApiCommand::SetAcl(t, a) => {
                let removed = server
                    .set_topic_acl(t.conn()?, a.allow, a.deny)
                    .await
                    .map_err(command_error)?;
                Ok(json!({"removed": removed}))
            }
            ApiCommand::Broadcast(a) => a.broadcast(server, false),
            ApiCommand::BroadcastLocal(a) => a.broadcast(server, true),
            ApiCommand::BroadcastAll(body) => {
                let n = server
                    .broadcast_all(body.payload()?)
                    .await
                    .map_err(command_error)?;
                Ok(json!({"connections": n}))
            }
            ApiCommand::GetConnections => {
                let list = server.get_connections().await.map_err(command_error)?;
                let list: Vec<Value> = list
                    .into_iter()
                    .map(|c| {
                        json!({"connection_id": c.id.to_string(), "user_id": c.user_id,
                            "shard": c.id.shard(), "topics": c.topics})
                    })
                    .collect();
                Ok(json!({"count": list.len(), "connections": list}))
            }
            ApiCommand::GetConnectionCount => Ok(json!({"count": server.get_connection_count()})),
            ApiCommand::GetTopicSubscriberCount(a) => {
                let subs = server
                    .get_topic_subscribers(&a.topic)
                    .await
                    .map_err(command_error)?;
                let groups: Map<String, Value> = subs
                    .queue_groups
                    .into_iter()
                    .map(|(g, n)| (g, json!(n)))
                    .collect();
                Ok(json!({"topic": a.topic, "count": subs.count, "queue_groups": groups}))
            }
            ApiCommand::Presence(a) => {
                let members = server.presence(&a.topic).await.map_err(query_error)?;
                let members: Vec<Value> = members
                    .into_iter()
                    .map(|m| {
                        // The data was validated as JSON when the member joined.
                        let data: Value = serde_json::from_str(&m.data).unwrap_or(Value::Null);
                        json!({"user_id": m.user_id, "connections": m.connections, "data": data})
                    })
                    .collect();
                Ok(json!({"topic": a.topic, "members": members}))
            }
            ApiCommand::PresenceStats(a) => {
                let (users, connections) =
                    server.presence_stats(&a.topic).await.map_err(query_error)?;
                Ok(json!({"topic": a.topic, "users": users, "connections": connections}))
            }
            ApiCommand::Health => Ok(health(server)),
            ApiCommand::Drain(a) => {
                let timeout = match a.timeout {
                    None => server.config().server.drain_timeout,
                    Some(s) if s.is_finite() && (0.0..=3600.0).contains(&s) => {
                        Duration::from_secs_f64(s)
                    }
                    Some(_) => return Err(invalid_request("timeout: seconds in 0..=3600")),
                };
                let reason = a.reason.as_deref().unwrap_or("server draining");
                server
                    .begin_drain(a.close_code, reason, timeout)
                    .map_err(command_error)?;
                Ok(json!({"draining": true, "close_code": a.close_code,
                    "timeout_seconds": timeout.as_secs_f64()}))
            }
        }
    }
}

/// `GET /api/v1/health`: the engine's health snapshot.
pub(super) fn health(server: &Server) -> Value {
    let h = server.health_snapshot();
    json!({
        "status": if h.running { "ok" } else if h.draining { "draining" } else { "stopped" },
        "version": env!("CARGO_PKG_VERSION"),
        "running": h.running,
        "draining": h.draining,
        "shards": h.shards,
        "connections": h.connections,
        "uptime_seconds": h.uptime.as_secs_f64(),
        "inbound_queue_depth": h.inbound_queue_depth,
        "inbound_dropped": h.inbound_dropped,
        "slow_consumer_drops": h.slow_consumer_drops,
        "fabric_overflow_drops": h.fabric_overflow_drops,
        "recovery_enabled": h.recovery_enabled,
        "presence_enabled": h.presence_enabled,
    })
}

impl Target {
    fn conn(&self) -> Result<ConnId, ApiError> {
        ConnId::parse(&self.connection_id).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ApiErrorCode::InvalidConnectionId,
                format!(
                    "{:?} is not a connection id (16 hex digits)",
                    self.connection_id
                ),
            )
        })
    }
}

impl SendBody {
    fn payload(self) -> Result<Payload, ApiError> {
        match (self.text, self.binary) {
            (Some(text), None) => Ok(Payload::Text(Bytes::from(text))),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map(|b| Payload::Binary(Bytes::from(b)))
                .map_err(|_| invalid_request("binary: not standard base64")),
            _ => Err(invalid_request("give one of `text` or `binary`")),
        }
    }
}

impl SubscribeArgs {
    fn into_request(self) -> Result<AppSubscribe, ApiError> {
        let presence = self
            .presence
            .map(|p| Bytes::copy_from_slice(p.get().as_bytes()));
        let mut recover = Vec::new();
        if self.recover {
            for (topic, pos) in self.recovery.unwrap_or_default() {
                let offset = pos.get("offset").and_then(Value::as_u64).ok_or_else(|| {
                    invalid_request(format!("recovery.{topic}.offset: a non-negative integer"))
                })?;
                let epoch = pos
                    .get("epoch")
                    .and_then(Value::as_str)
                    .and_then(parse_epoch);
                recover.push((topic, epoch, offset));
            }
        }
        Ok(AppSubscribe {
            topics: self.topics,
            presence,
            queue_group: self.queue_group.map(Arc::from),
            recover,
        })
    }
}

impl BroadcastArgs {
    fn broadcast(self, server: &Server, local: bool) -> Result<Value, ApiError> {
        let published = match (self.message, self.event, self.data) {
            (Some(message), None, None) => {
                if local {
                    server.broadcast_local(&self.topic, &message)
                } else {
                    server.broadcast(&self.topic, &message)
                }
            }
            (None, event, data) => {
                let event = event.as_deref().unwrap_or("publication");
                if event.is_empty() {
                    return Err(invalid_request("event must not be empty"));
                }
                let data = data.as_deref().unwrap_or(RawValue::NULL);
                if local {
                    server.publish_local(&self.topic, event, data)
                } else {
                    server.publish(&self.topic, event, data)
                }
            }
            _ => return Err(invalid_request("give `message`, or `event` and `data`")),
        };
        published.map_err(publish_error)?;
        Ok(json!({"published": 1}))
    }
}

/// Deserialises an operation's arguments.
fn args<A: DeserializeOwned>(fields: Map<String, Value>) -> Result<A, ApiError> {
    serde_json::from_value(Value::Object(fields)).map_err(|e| invalid_request(e.to_string()))
}

fn no_args(fields: Map<String, Value>, cmd: ApiCommand) -> Result<ApiCommand, ApiError> {
    match fields.keys().next() {
        None => Ok(cmd),
        Some(k) => Err(invalid_request(format!("unknown field `{k}`"))),
    }
}

pub(super) fn invalid_request(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        ApiErrorCode::InvalidRequest,
        message,
    )
}

/// The engine's refusals as HTTP: the caller's fault is 4xx, the server's state 503.
pub(super) fn command_error(e: CommandError) -> ApiError {
    let (status, code) = match &e {
        CommandError::UnknownConnection => (StatusCode::NOT_FOUND, ApiErrorCode::UnknownConnection),
        CommandError::UnknownRequest => (StatusCode::NOT_FOUND, ApiErrorCode::UnknownRequest),
        CommandError::InvalidTopic(_) => (StatusCode::BAD_REQUEST, ApiErrorCode::InvalidTopic),
        CommandError::InvalidEvent(_) => (StatusCode::BAD_REQUEST, ApiErrorCode::InvalidEvent),
        CommandError::InvalidCloseCode(_) => {
            (StatusCode::BAD_REQUEST, ApiErrorCode::InvalidCloseCode)
        }
        // The message was refused because of the connection's state, not the request's shape.
        CommandError::SlowConsumer => (StatusCode::CONFLICT, ApiErrorCode::SlowConsumer),
        CommandError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, ApiErrorCode::Overloaded),
        CommandError::NotRunning => (StatusCode::SERVICE_UNAVAILABLE, ApiErrorCode::NotRunning),
    };
    ApiError::new(status, code, e.to_string())
}

fn publish_error(e: PublishError) -> ApiError {
    match e {
        PublishError::InvalidTopic(p) => command_error(CommandError::InvalidTopic(p)),
        PublishError::NotAnObject => invalid_request("message: must be a JSON object"),
        PublishError::Overloaded => command_error(CommandError::Overloaded),
    }
}

pub(super) fn query_error(e: QueryError) -> ApiError {
    match e {
        QueryError::InvalidTopic(p) => command_error(CommandError::InvalidTopic(p)),
        QueryError::PresenceDisabled => ApiError::new(
            StatusCode::NOT_FOUND,
            ApiErrorCode::PresenceDisabled,
            format!("{e}: set presence.enabled"),
        ),
        QueryError::Overloaded => command_error(CommandError::Overloaded),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: Value) -> Result<ApiCommand, ApiError> {
        let mut map = json.as_object().unwrap().clone();
        let op = map.remove("op").unwrap();
        ApiCommand::parse(op.as_str().unwrap(), map)
    }

    #[test]
    fn every_op_parses_its_shape() {
        let id = "0000000100000001";
        let cases = [
            json!({"op":"send","connection_id":id,"text":"hi"}),
            json!({"op":"send_event","connection_id":id,"event":{"t":"x"}}),
            json!({"op":"send_user","user_id":"u","event":{"t":"x"}}),
            json!({"op":"disconnect","connection_id":id}),
            json!({"op":"subscribe","connection_id":id,"topics":["a"],"queue_group":"g"}),
            json!({"op":"unsubscribe","connection_id":id}),
            json!({"op":"set_acl","connection_id":id,"deny":["x*"]}),
            json!({"op":"broadcast","topic":"t","event":"e","data":1}),
            json!({"op":"broadcast_local","topic":"t","message":{"t":"e"}}),
            json!({"op":"broadcast_all","binary":"AAE="}),
            json!({"op":"get_connections"}),
            json!({"op":"get_connection_count"}),
            json!({"op":"get_topic_subscriber_count","topic":"t"}),
            json!({"op":"presence","topic":"t"}),
            json!({"op":"presence_stats","topic":"t"}),
            json!({"op":"health"}),
            json!({"op":"drain","close_code":4300,"timeout":2.5}),
            json!({"op":"rpc_reply","connection_id":"0000000000000001","request":1,"data":{"x":1}}),
        ];
        assert_eq!(cases.len(), OPS.len());
        for case in cases {
            parse(case.clone()).unwrap_or_else(|e| panic!("{case}: {e:?}"));
        }
    }

    #[test]
    fn wrong_shapes_are_invalid_requests() {
        for bad in [
            json!({"op":"nope"}),
            json!({"op":"send","text":"no target"}),
            json!({"op":"send","connection_id":"x","txt":"typo"}),
            json!({"op":"subscribe","connection_id":"x"}),
            json!({"op":"health","extra":1}),
            json!({"op":"disconnect","connection_id":5}),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
                "{bad}"
            );
        }
    }
}
