//! Centrifugo's HTTP server API (v5/v6): `POST /api/<method>`, so that a backend written for
//! Centrifugo (its `cent` client, or plain HTTP) publishes and administers through us unchanged.
//!
//! Owns: Centrifugo's request fields, its `{"result":..}` / `{"error":{"code","message"}}`
//! replies (or, with `X-Centrifugo-Error-Mode: transport`, the error as an HTTP status), its key
//! check, and mapping each method onto the engine calls the `/api/v1` commands make. Never:
//! interprets a publication or a connection command itself (the engine does).
//!
//! What cannot be served answers as Centrifugo answers a feature it does not have: error 108
//! "not available" (docs/CENTRIFUGO.md, "The HTTP server API", lists each case).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use wse_shards::centrifuge::channel::Namespaces;
use wse_shards::centrifuge::{DisconnectCode, ErrorCode, NamespaceConfig};
use wse_shards::command::{AppSubscribe, CommandError};
use wse_shards::protocol::{self, parse_epoch, topic_problem};
use wse_shards::{ConnId, PublishError, QueryError, Server};

use super::Shared;
use super::commands::COMMAND_TIMEOUT;
use super::publish::constant_time_eq;

/// Every method served, as `/api/<method>` and batch commands name them.
pub(super) const METHODS: [&str; 13] = [
    "publish",
    "broadcast",
    "subscribe",
    "unsubscribe",
    "disconnect",
    "refresh",
    "presence",
    "presence_stats",
    "history",
    "history_remove",
    "channels",
    "info",
    "batch",
];

/// Commands one `batch` may hold, and channels one `broadcast` may name; more is refused whole
/// (107) before any runs.
pub(super) const BATCH_COMMANDS_MAX: usize = super::api::BATCH_COMMANDS_MAX;

/// Most channels `channels` lists (the first by name). Centrifugo has no limit and warns that
/// the call is for setups of up to about 10k channels; this keeps the answer bounded.
pub(super) const CHANNELS_MAX: usize = 10_000;

/// The header that asks for errors as HTTP statuses, and its one meaningful value.
const ERROR_MODE_HEADER: &str = "x-centrifugo-error-mode";
const ERROR_MODE_TRANSPORT: &str = "transport";

/// The event type a Centrifugo publication carries to WSE subscribers: the one a Centrifuge
/// client's own publication gets, so both reach WSE clients alike.
const PUBLICATION_EVENT: &str = wse_shards::dialect::CENTRIFUGE_PUBLISH_EVENT;

/// A Centrifugo API error: the code and Centrifugo's own message for it (clients match on the
/// code; the detail goes to the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CfError(ErrorCode);

impl CfError {
    fn body(self) -> Value {
        json!({"code": self.0.code(), "message": self.0.message()})
    }

    /// Centrifugo's mapping of an error code to an HTTP status in transport mode.
    fn status(self) -> StatusCode {
        match self.0 {
            ErrorCode::UnknownChannel | ErrorCode::MethodNotFound => StatusCode::NOT_FOUND,
            ErrorCode::BadRequest | ErrorCode::NotAvailable => StatusCode::BAD_REQUEST,
            ErrorCode::UnrecoverablePosition => StatusCode::RANGE_NOT_SATISFIABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Logs why a request got `e` (Centrifugo's messages are fixed words) and passes it on.
fn refuse(e: ErrorCode, why: impl std::fmt::Display) -> CfError {
    tracing::debug!(code = e.code(), "centrifugo api: {why}");
    CfError(e)
}

fn bad_request(why: impl std::fmt::Display) -> CfError {
    refuse(ErrorCode::BadRequest, why)
}

fn not_available(why: impl std::fmt::Display) -> CfError {
    refuse(ErrorCode::NotAvailable, why)
}

type Outcome = Result<Value, CfError>;

/// Route layer on `/api/<method>`: Centrifugo's key check, before the body is read. The key is
/// `control.api_key`, presented as `X-API-Key: <key>`, `Authorization: apikey <key>` or
/// `?api_key=<key>`; missing or wrong: 401 with an empty body, as Centrifugo.
pub(super) async fn require_key(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let verdict = {
        // Scoped: the guard must be gone before the await below.
        let key = state.api_key.read().unwrap_or_else(|e| e.into_inner());
        key.as_deref()
            .map(|k| presented(request.headers(), request.uri().query(), k))
    };
    match verdict {
        Some(true) => next.run(request).await,
        Some(false) => StatusCode::UNAUTHORIZED.into_response(),
        None => (
            StatusCode::FORBIDDEN,
            "the server API is disabled: set control.api_key to enable it\n",
        )
            .into_response(),
    }
}

/// Whether the request carries `expected` in one of the three places Centrifugo reads it.
fn presented(headers: &HeaderMap, query: Option<&str>, expected: &str) -> bool {
    let expected = expected.as_bytes();
    let header = headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii());
    let authorization = headers.get(AUTHORIZATION).and_then(|v| {
        let v = v.as_bytes().trim_ascii();
        let space = v.iter().position(|b| *b == b' ')?;
        let (scheme, key) = v.split_at(space);
        scheme
            .eq_ignore_ascii_case(b"apikey")
            .then(|| key.trim_ascii())
    });
    let query = query.and_then(|q| {
        let uri: axum::http::Uri = format!("/?{q}").parse().ok()?;
        let Query(params) = Query::<Vec<(String, String)>>::try_from_uri(&uri).ok()?;
        params
            .into_iter()
            .find_map(|(k, v)| (k == "api_key").then(|| v.into_bytes()))
    });
    [header, authorization, query.as_deref()]
        .into_iter()
        .flatten()
        .any(|key| constant_time_eq(key, expected))
}

/// `POST /api/<method>`.
pub(super) async fn handle(
    State(state): State<Shared>,
    method: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let transport = headers.get(ERROR_MODE_HEADER).is_some_and(|v| {
        v.as_bytes()
            .eq_ignore_ascii_case(ERROR_MODE_TRANSPORT.as_bytes())
    });
    // A path segment that is not UTF-8 names no method.
    let method = method.map_or_else(|_| String::new(), |Path(m)| m);
    let outcome = match body {
        Err(rejection) => Err(bad_request(format!(
            "unreadable body ({}): {}",
            rejection.status(),
            rejection.body_text()
        ))),
        Ok(body) => match parse_object(&body) {
            Err(e) => Err(e),
            Ok(fields) if method == "batch" => {
                // A batch's errors are per command, in its replies, whatever the mode.
                return json_response(StatusCode::OK, batch(&state.server, fields).await);
            }
            Ok(fields) => run(&state.server, &method, fields).await,
        },
    };
    match outcome {
        Ok(result) => json_response(StatusCode::OK, json!({ "result": result })),
        Err(e) if transport => json_response(e.status(), e.body()),
        Err(e) => json_response(StatusCode::OK, json!({ "error": e.body() })),
    }
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The body as a JSON object; an empty body is `{}` (Centrifugo's `info` is often sent so).
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, CfError> {
    if body.trim_ascii().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(bad_request("the body is not a JSON object")),
        Err(e) => Err(bad_request(format!("malformed JSON: {e}"))),
    }
}

/// Runs one method (not `batch`), at most [`COMMAND_TIMEOUT`].
async fn run(server: &Arc<Server>, method: &str, fields: Map<String, Value>) -> Outcome {
    let call = async {
        match method {
            "publish" => publish(server, PublishArgs::parse(fields)?),
            "broadcast" => broadcast(server, BroadcastArgs::parse(fields)?),
            "subscribe" => subscribe(server, args(fields)?).await,
            "unsubscribe" => unsubscribe(server, args(fields)?).await,
            "disconnect" => disconnect(server, args(fields)?).await,
            "refresh" => refresh(server, args(fields)?).await,
            "presence" => presence(server, args(fields)?).await,
            "presence_stats" => presence_stats(server, args(fields)?).await,
            "history" => history(server, args(fields)?).await,
            "history_remove" => history_remove(server, args(fields)?).await,
            "channels" => channels(server, args(fields)?).await,
            "info" => info(server, args(fields)?).await,
            other => Err(refuse(
                ErrorCode::MethodNotFound,
                format!("no method {other:?}; one of {}", METHODS.join(", ")),
            )),
        }
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, call).await {
        Ok(outcome) => outcome,
        Err(_) => Err(refuse(
            ErrorCode::Internal,
            "a shard did not answer in time",
        )),
    }
}

/// `batch`: `{"commands":[{"<method>":{..}},..],"parallel":bool}` answered with
/// `{"replies":[{"<method>":<result>} | {"error":{..}},..]}` (no `result` wrapper, as
/// Centrifugo). Run in order; `parallel` is accepted and changes nothing.
async fn batch(server: &Arc<Server>, fields: Map<String, Value>) -> Value {
    let a: BatchArgs = match args(fields) {
        Ok(a) => a,
        Err(e) => return json!({ "error": e.body() }),
    };
    if a.commands.len() > BATCH_COMMANDS_MAX {
        let e = bad_request(format!("at most {BATCH_COMMANDS_MAX} commands per batch"));
        return json!({ "error": e.body() });
    }
    let mut replies = Vec::with_capacity(a.commands.len());
    for command in a.commands {
        let mut entries = command.into_iter();
        let reply = match (entries.next(), entries.next()) {
            (Some((method, Value::Object(fields))), None) if method != "batch" => {
                match run(server, &method, fields).await {
                    Ok(result) => json!({ method: result }),
                    Err(e) => json!({ "error": e.body() }),
                }
            }
            (Some((method, _)), None) if method == "batch" => {
                json!({ "error": refuse(ErrorCode::MethodNotFound, "a batch inside a batch").body() })
            }
            _ => json!({ "error": bad_request("a batch command is {\"<method>\": {..}}").body() }),
        };
        replies.push(reply);
    }
    json!({ "replies": replies })
}

/// Deserialises a method's fields: unknown ones are refused (107), so that a misspelt field is
/// an error rather than a silent default.
fn args<A: DeserializeOwned>(fields: Map<String, Value>) -> Result<A, CfError> {
    serde_json::from_value(Value::Object(fields)).map_err(bad_request)
}

/// A channel the engine takes (107 otherwise) in a configured namespace (102 otherwise).
fn channel_of(server: &Server, channel: &str) -> Result<(), CfError> {
    namespace_of(server, channel).map(|_| ())
}

/// The options of `channel`'s namespace, checked as [`channel_of`] checks the channel.
fn namespace_of(server: &Server, channel: &str) -> Result<NamespaceConfig, CfError> {
    if let Some(problem) = topic_problem(channel) {
        return Err(bad_request(format!("channel {channel:?}: {problem}")));
    }
    let cfg = server.config();
    Namespaces::new(&cfg.centrifuge)
        .resolve(channel)
        .map(|c| c.namespace.clone())
        .map_err(|e| refuse(e, format!("channel {channel:?}")))
}

// ------------------------------------------------------------------------------------------------
// publish, broadcast
// ------------------------------------------------------------------------------------------------

/// The publication fields `publish` and `broadcast` share.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicationArgs {
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    b64data: Option<String>,
    /// Accepted and not honoured: the publication is in the topic's recovery ring anyway.
    #[serde(default)]
    skip_history: Option<bool>,
    #[serde(default)]
    tags: Option<Map<String, Value>>,
    #[serde(default)]
    idempotency_key: Option<String>,
    /// Accepted and not honoured: delta compression is never negotiated here.
    #[serde(default)]
    delta: Option<bool>,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    version_epoch: Option<String>,
}

/// `publish`: `channel` and the publication fields.
#[derive(Debug)]
struct PublishArgs {
    channel: String,
    publication: PublicationArgs,
}

/// `broadcast`: `channels` and the publication fields.
#[derive(Debug)]
struct BroadcastArgs {
    channels: Vec<String>,
    publication: PublicationArgs,
}

/// Takes field `name` out of `fields` (serde's `flatten` cannot be combined with
/// `deny_unknown_fields` nor with raw values, so the target is read apart from the rest).
fn take<T: DeserializeOwned>(fields: &mut Map<String, Value>, name: &str) -> Result<T, CfError> {
    let value = fields
        .remove(name)
        .ok_or_else(|| bad_request(format!("missing field `{name}`")))?;
    serde_json::from_value(value).map_err(|e| bad_request(format!("{name}: {e}")))
}

impl PublishArgs {
    fn parse(mut fields: Map<String, Value>) -> Result<Self, CfError> {
        Ok(Self {
            channel: take(&mut fields, "channel")?,
            publication: args(fields)?,
        })
    }
}

impl BroadcastArgs {
    fn parse(mut fields: Map<String, Value>) -> Result<Self, CfError> {
        Ok(Self {
            channels: take(&mut fields, "channels")?,
            publication: args(fields)?,
        })
    }
}

impl PublicationArgs {
    /// The data to publish, or why it cannot be.
    fn data(&self) -> Result<&RawValue, CfError> {
        let _ = (self.skip_history, self.delta, &self.version_epoch);
        if self.b64data.is_some() {
            return Err(not_available(
                "b64data: the topic space is JSON (shared with WSE clients); send data",
            ));
        }
        if self.tags.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(not_available("tags: publications carry no tags here"));
        }
        if self.idempotency_key.as_ref().is_some_and(|k| !k.is_empty()) {
            return Err(not_available(
                "idempotency_key: no idempotency cache; a retry publishes again",
            ));
        }
        if self.version.is_some_and(|v| v > 0) {
            return Err(not_available(
                "version: publications are not versioned here",
            ));
        }
        self.data
            .as_deref()
            .ok_or_else(|| bad_request("data is required"))
    }
}

/// One publication through the topic's owner, as `/api/v1/publish` makes it. The result is `{}`:
/// the owner numbers it after this returns, so no `offset`/`epoch` comes back.
fn publish_one(server: &Server, channel: &str, data: &RawValue) -> Outcome {
    channel_of(server, channel)?;
    match server.publish(channel, PUBLICATION_EVENT, data) {
        Ok(()) => Ok(json!({})),
        Err(PublishError::InvalidTopic(problem)) => Err(bad_request(problem)),
        Err(PublishError::NotAnObject) => Err(bad_request("data")),
        Err(PublishError::Overloaded) => Err(refuse(
            ErrorCode::Internal,
            format!("the queue to the shard owning {channel:?} is full"),
        )),
    }
}

fn publish(server: &Server, a: PublishArgs) -> Outcome {
    let data = a.publication.data()?;
    publish_one(server, &a.channel, data)
}

/// `{"responses":[{"result":{}} | {"error":{..}},..]}`: one per channel, each published or
/// refused on its own.
fn broadcast(server: &Server, a: BroadcastArgs) -> Outcome {
    let data = a.publication.data()?;
    if a.channels.is_empty() || a.channels.len() > BATCH_COMMANDS_MAX {
        return Err(bad_request(format!(
            "channels: 1..={BATCH_COMMANDS_MAX} channels"
        )));
    }
    let responses: Vec<Value> = a
        .channels
        .iter()
        .map(|channel| match publish_one(server, channel, data) {
            Ok(result) => json!({ "result": result }),
            Err(e) => json!({ "error": e.body() }),
        })
        .collect();
    Ok(json!({ "responses": responses }))
}

// ------------------------------------------------------------------------------------------------
// subscribe, unsubscribe, disconnect, refresh
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamPosition {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    epoch: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeArgs {
    user: String,
    channel: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    session: Option<String>,
    /// The subscriber's presence data (a JSON object), as `/api/v1`'s `presence`.
    #[serde(default)]
    info: Option<Box<RawValue>>,
    #[serde(default)]
    b64info: Option<String>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    b64data: Option<String>,
    #[serde(default)]
    recover_since: Option<StreamPosition>,
    #[serde(default, rename = "override")]
    overrides: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeArgs {
    user: String,
    channel: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    session: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectObject {
    code: u16,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectArgs {
    user: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    whitelist: Vec<String>,
    #[serde(default)]
    disconnect: Option<DisconnectObject>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshArgs {
    user: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    expired: Option<bool>,
    #[serde(default)]
    expire_at: Option<i64>,
    #[serde(default)]
    info: Option<Value>,
    #[serde(default)]
    b64info: Option<String>,
}

/// The close a Centrifugo `disconnect` without a `disconnect` object sends: 3503 "force
/// disconnect", on which Centrifuge clients do not reconnect.
const FORCE_DISCONNECT: DisconnectCode = DisconnectCode::ForceDisconnect;

/// The live connections of `user` (all of them, or only `client` when given); `session`, a
/// Centrifugo notion we do not have, is refused.
async fn targets(
    server: &Server,
    user: &str,
    client: Option<&str>,
    session: Option<&str>,
) -> Result<Vec<ConnId>, CfError> {
    if session.is_some_and(|s| !s.is_empty()) {
        return Err(not_available(
            "session: connections have no session ids here",
        ));
    }
    if user.is_empty() && client.is_none_or(str::is_empty) {
        return Err(bad_request("user is required"));
    }
    let connections = server.get_connections().await.map_err(engine_error)?;
    let client = client.filter(|c| !c.is_empty());
    Ok(connections
        .into_iter()
        .filter(|c| c.user_id == user)
        .filter(|c| client.is_none_or(|want| c.id.to_string() == want))
        .map(|c| c.id)
        .collect())
}

/// Subscribes the user's WSE connections (or the one `client`) as `/api/v1`'s `subscribe` does;
/// a connection that left meanwhile is skipped, as Centrifugo skips users with no connection.
async fn subscribe(server: &Server, a: SubscribeArgs) -> Outcome {
    let unsupported = [
        ("b64info", a.b64info.is_some()),
        ("data", a.data.is_some()),
        ("b64data", a.b64data.is_some()),
        ("override", a.overrides.is_some()),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, given)| *given) {
        return Err(not_available(format!("subscribe: {field}")));
    }
    channel_of(server, &a.channel)?;
    let presence = match &a.info {
        Some(info) if info.get().trim_start().starts_with('{') => {
            Some(bytes::Bytes::copy_from_slice(info.get().as_bytes()))
        }
        Some(_) => return Err(bad_request("info: a JSON object")),
        None => None,
    };
    let recover = match &a.recover_since {
        Some(pos) => vec![(a.channel.clone(), parse_epoch(&pos.epoch), pos.offset)],
        None => Vec::new(),
    };
    for conn in targets(server, &a.user, a.client.as_deref(), a.session.as_deref()).await? {
        let sub = AppSubscribe {
            topics: vec![a.channel.clone()],
            presence: presence.clone(),
            queue_group: None,
            recover: recover.clone(),
        };
        match server.subscribe_connection(conn, sub).await {
            Ok(outcome) => {
                if let Some(failed) = outcome.failed_topics.first() {
                    return Err(subscribe_refused(&failed.reason));
                }
            }
            // Gone since it was listed, or a Centrifuge connection (not subscribed by the server
            // API yet): as Centrifugo, nobody to subscribe is not an error.
            Err(CommandError::UnknownConnection) => {}
            Err(e) => return Err(engine_error(e)),
        }
    }
    Ok(json!({}))
}

/// A subscription the engine refused, by the reason a WSE client's acknowledgement would give.
fn subscribe_refused(reason: &str) -> CfError {
    use protocol::ErrorCode as Wse;
    let code = if [
        Wse::SubscriptionLimit,
        Wse::PresenceLimit,
        Wse::QueueGroupLimit,
    ]
    .iter()
    .any(|c| c.as_str() == reason)
    {
        ErrorCode::LimitExceeded
    } else if reason == Wse::Forbidden.as_str() {
        ErrorCode::PermissionDenied
    } else if reason == Wse::ServerBusy.as_str() {
        ErrorCode::Internal
    } else {
        ErrorCode::BadRequest
    };
    refuse(code, format!("subscribe refused: {reason}"))
}

async fn unsubscribe(server: &Server, a: UnsubscribeArgs) -> Outcome {
    channel_of(server, &a.channel)?;
    for conn in targets(server, &a.user, a.client.as_deref(), a.session.as_deref()).await? {
        match server
            .unsubscribe_connection(conn, Some(vec![a.channel.clone()]))
            .await
        {
            Ok(_) | Err(CommandError::UnknownConnection) => {}
            Err(e) => return Err(engine_error(e)),
        }
    }
    Ok(json!({}))
}

/// Refreshes the user's Centrifuge connections (or the one `client`): `expired` closes them with
/// 3005 (the clients reconnect with their token), else `expire_at` (Unix seconds; 0: never)
/// becomes their expiry, after which they close with 3005 unless the client refreshes with a
/// token; without either nothing changes. WSE connections are skipped (their expiry is their
/// token's), as a user without connections is. `info` and `b64info` answer 108.
async fn refresh(server: &Server, a: RefreshArgs) -> Outcome {
    if a.info.is_some() || a.b64info.is_some() {
        return Err(not_available(
            "refresh: a connection's info comes from its token",
        ));
    }
    let expire_at = match a.expire_at {
        Some(at) => Some(u64::try_from(at).map_err(|_| bad_request("expire_at: negative"))?),
        None => None,
    };
    let expired = a.expired == Some(true);
    for conn in targets(server, &a.user, a.client.as_deref(), a.session.as_deref()).await? {
        match server.refresh_connection(conn, expire_at, expired).await {
            Ok(_) | Err(CommandError::UnknownConnection) => {}
            Err(e) => return Err(engine_error(e)),
        }
    }
    Ok(json!({}))
}

/// Closes the user's connections (or the one `client`), except those in `whitelist`, with the
/// given code and reason (default 3503 "force disconnect"); WSE and Centrifuge connections alike.
async fn disconnect(server: &Server, a: DisconnectArgs) -> Outcome {
    let (code, reason) = match &a.disconnect {
        Some(d) => (d.code, d.reason.as_str()),
        None => (FORCE_DISCONNECT.code(), FORCE_DISCONNECT.reason()),
    };
    if !wse_shards::command::close_code_allowed(code) {
        return Err(bad_request(format!("disconnect.code {code}: 3000..=4999")));
    }
    let whitelist: BTreeSet<&str> = a.whitelist.iter().map(String::as_str).collect();
    for conn in targets(server, &a.user, a.client.as_deref(), a.session.as_deref()).await? {
        if whitelist.contains(conn.to_string().as_str()) {
            continue;
        }
        match server.disconnect(conn, code, reason).await {
            Ok(()) | Err(CommandError::UnknownConnection) => {}
            Err(e) => return Err(engine_error(e)),
        }
    }
    Ok(json!({}))
}

// ------------------------------------------------------------------------------------------------
// presence, presence_stats, history, channels, info
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelArgs {
    channel: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryArgs {
    channel: String,
    /// 0 (the default): only the stream's position; negative: all, capped as any limit.
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    since: Option<StreamPosition>,
    #[serde(default)]
    reverse: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsArgs {
    #[serde(default)]
    pattern: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InfoArgs {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchArgs {
    commands: Vec<Map<String, Value>>,
    /// Accepted; commands always run in order.
    #[serde(default)]
    #[allow(dead_code)]
    parallel: Option<bool>,
}

/// `{"presence":{<client id>:{"client","user","conn_info","chan_info"}}}`: one entry per member
/// connection, as the topic's owner keeps them and a Centrifuge client's `presence` lists them
/// (a WSE connection shows as its user and connection id, without info).
async fn presence(server: &Server, a: ChannelArgs) -> Outcome {
    channel_of(server, &a.channel)?;
    let clients = server
        .presence_clients(&a.channel)
        .await
        .map_err(query_error)?;
    let mut presence = Map::new();
    for c in clients {
        let info = serde_json::to_value(&c)
            .map_err(|e| refuse(ErrorCode::Internal, format!("presence: {e}")))?;
        presence.insert(c.client, info);
    }
    Ok(json!({ "presence": presence }))
}

/// `{"publications":[{"data","offset"},..],"offset","epoch"}`: the channel's history as its
/// owner reads it for a Centrifuge client's `history`, with the same answers: 108 when the
/// namespace keeps no history (or recovery is off), 112 when `since` is in another epoch or
/// no longer followed by everything after it. At most `centrifuge.history_limit_max`
/// publications (and `recovery.max_messages`, as one replay).
async fn history(server: &Server, a: HistoryArgs) -> Outcome {
    let ns = namespace_of(server, &a.channel)?;
    if !ns.has_history() {
        return Err(not_available(format!(
            "history: the namespace of {:?} keeps none (history_size, history_ttl)",
            a.channel
        )));
    }
    let cfg = server.config();
    let limit = usize::try_from(a.limit.unwrap_or(0))
        .unwrap_or(usize::MAX)
        .min(cfg.centrifuge.history_limit_max);
    let after = a.since.as_ref().map(|p| p.offset);
    let page = server
        .history(
            &a.channel,
            after,
            limit,
            a.reverse == Some(true),
            ns.history_size,
        )
        .await
        .map_err(query_error)?
        .ok_or_else(|| not_available("history: set recovery.enabled"))?;
    let epoch = protocol::epoch_hex(page.epoch);
    let other_epoch = a
        .since
        .as_ref()
        .is_some_and(|p| !p.epoch.is_empty() && p.epoch != epoch);
    if other_epoch || !page.complete {
        return Err(refuse(
            ErrorCode::UnrecoverablePosition,
            format!("history of {:?}: since is not recoverable", a.channel),
        ));
    }
    Ok(json!({
        "publications": page.publications,
        "offset": page.offset,
        "epoch": epoch,
    }))
}

/// `{}`: the owner forgets the channel's publications and keeps its stream position, as
/// Centrifugo does: the next publication gets the next offset in the same epoch, and a `since`
/// (or a client's recovery) from before the removal is unrecoverable. 108 as for `history`.
async fn history_remove(server: &Server, a: ChannelArgs) -> Outcome {
    let ns = namespace_of(server, &a.channel)?;
    if !ns.has_history() {
        return Err(not_available(format!(
            "history_remove: the namespace of {:?} keeps no history",
            a.channel
        )));
    }
    if server
        .history_remove(&a.channel)
        .await
        .map_err(query_error)?
    {
        Ok(json!({}))
    } else {
        Err(not_available("history_remove: set recovery.enabled"))
    }
}

async fn presence_stats(server: &Server, a: ChannelArgs) -> Outcome {
    channel_of(server, &a.channel)?;
    let (users, clients) = server
        .presence_stats(&a.channel)
        .await
        .map_err(query_error)?;
    Ok(json!({"num_clients": clients, "num_users": users}))
}

/// `{"channels":{<name>:{"num_clients":n}}}`: the topics with a subscriber, WSE or Centrifuge,
/// matching `pattern` (`*` and `?`); at most [`CHANNELS_MAX`], the first by name.
async fn channels(server: &Server, a: ChannelsArgs) -> Outcome {
    let pattern = a.pattern.as_deref().filter(|p| !p.is_empty());
    let counts = server
        .channel_counts(pattern, CHANNELS_MAX)
        .await
        .map_err(engine_error)?;
    let channels: Map<String, Value> = counts
        .into_iter()
        .map(|(name, n)| (name, json!({ "num_clients": n })))
        .collect();
    Ok(json!({ "channels": channels }))
}

/// `{"nodes":[..]}`: this process, one node. `uid` is fixed for the process's life.
async fn info(server: &Server, _: InfoArgs) -> Outcome {
    let connections = server.get_connections().await.map_err(engine_error)?;
    let users: BTreeSet<&str> = connections.iter().map(|c| c.user_id.as_str()).collect();
    let subs: usize = connections.iter().map(|c| c.topics).sum();
    let channels = server
        .channel_counts(None, CHANNELS_MAX)
        .await
        .map_err(engine_error)?;
    Ok(json!({"nodes": [{
        "uid": node_uid(),
        "name": node_name(server),
        "version": env!("CARGO_PKG_VERSION"),
        "num_clients": server.connection_count(),
        "num_users": users.len(),
        "num_subs": subs,
        "num_channels": channels.len(),
        "uptime": server.uptime().as_secs(),
    }]}))
}

/// A random id made once per process, as Centrifugo's node uid.
fn node_uid() -> &'static str {
    static UID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    UID.get_or_init(|| {
        let b = rand::random::<u128>().to_be_bytes();
        let hex =
            |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
        format!(
            "{}-{}-{}-{}-{}",
            hex(0..4),
            hex(4..6),
            hex(6..8),
            hex(8..10),
            hex(10..16)
        )
    })
}

/// `<host>_<WebSocket port>`, as Centrifugo names a node.
fn node_name(server: &Server) -> String {
    let uname = rustix::system::uname();
    let host = uname.nodename().to_string_lossy();
    format!("{host}_{}", server.local_addr().port())
}

fn engine_error(e: CommandError) -> CfError {
    refuse(ErrorCode::Internal, e)
}

/// Presence off (`presence.enabled = false`) is Centrifugo's "not available".
fn query_error(e: QueryError) -> CfError {
    match e {
        QueryError::PresenceDisabled => not_available("presence: set presence.enabled"),
        QueryError::InvalidTopic(p) => bad_request(p),
        QueryError::Overloaded => refuse(ErrorCode::Internal, "the owner shard's queue is full"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAD_REQUEST: CfError = CfError(ErrorCode::BadRequest);
    const NOT_AVAILABLE: CfError = CfError(ErrorCode::NotAvailable);

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    #[test]
    fn the_key_is_read_from_the_three_places_centrifugo_reads_it() {
        let key = "k".repeat(16);
        assert!(presented(&headers(&[("x-api-key", &key)]), None, &key));
        let apikey = format!("apikey {key}");
        assert!(presented(
            &headers(&[("authorization", &apikey)]),
            None,
            &key
        ));
        let upper = format!("ApiKey  {key} ");
        assert!(presented(
            &headers(&[("authorization", &upper)]),
            None,
            &key
        ));
        let query = format!("x=1&api_key={key}");
        assert!(presented(&HeaderMap::new(), Some(&query), &key));
        assert!(!presented(&HeaderMap::new(), None, &key));
        assert!(!presented(&headers(&[("x-api-key", "nope")]), None, &key));
        let bearer = format!("Bearer {key}");
        assert!(
            !presented(&headers(&[("authorization", &bearer)]), None, &key),
            "Centrifugo's scheme is apikey"
        );
    }

    #[test]
    fn errors_have_centrifugo_codes_messages_and_transport_statuses() {
        assert_eq!(
            BAD_REQUEST.body(),
            json!({"code": 107, "message": "bad request"})
        );
        assert_eq!(BAD_REQUEST.status(), StatusCode::BAD_REQUEST);
        assert_eq!(NOT_AVAILABLE.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            CfError(ErrorCode::Internal).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            CfError(ErrorCode::MethodNotFound).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            CfError(ErrorCode::UnknownChannel).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            CfError(ErrorCode::UnrecoverablePosition).status(),
            StatusCode::RANGE_NOT_SATISFIABLE
        );
    }

    #[test]
    fn bodies_must_be_json_objects() {
        assert_eq!(parse_object(b"").unwrap(), Map::new());
        assert_eq!(parse_object(b"  ").unwrap(), Map::new());
        for bad in [&b"{"[..], b"[]", b"42", b"nope", b"{\"a\":1} x"] {
            assert_eq!(parse_object(bad).unwrap_err(), BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn publication_fields_we_cannot_honour_are_refused_with_108() {
        let parse = |v: Value| PublishArgs::parse(v.as_object().unwrap().clone()).unwrap();
        let ok = parse(json!({"channel":"c","data":{"a":1},"skip_history":true,"delta":false}));
        assert_eq!(ok.publication.data().unwrap().get(), r#"{"a":1}"#);
        for v in [
            json!({"channel":"c","b64data":"AA=="}),
            json!({"channel":"c","data":1,"tags":{"k":"v"}}),
            json!({"channel":"c","data":1,"idempotency_key":"x"}),
            json!({"channel":"c","data":1,"version":3}),
        ] {
            assert_eq!(
                parse(v.clone()).publication.data().unwrap_err(),
                NOT_AVAILABLE,
                "{v}"
            );
        }
        assert_eq!(
            parse(json!({"channel":"c"}))
                .publication
                .data()
                .unwrap_err(),
            BAD_REQUEST
        );
        let typo = json!({"channel":"c","dta":1});
        assert!(PublishArgs::parse(typo.as_object().unwrap().clone()).is_err());
    }
}
