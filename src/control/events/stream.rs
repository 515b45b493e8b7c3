//! `GET /api/v1/events`: the event stream over WebSocket. The server sends batches of events (a
//! JSON array per text frame, at most `EVENTS_PER_FRAME` events and `events.max_frame_bytes`
//! bytes, or one larger event alone); the backend may send commands (the `/api/v1/batch` entries, with
//! an `id`) and gets one reply per command, `{"id":..,"ok":..,"result"|"error":..}`.
//!
//! Owns: the upgrade (hyper's, with tungstenite framing on the upgraded socket), the socket's
//! three duties — writing event batches, reading commands, writing replies — and running the
//! commands in the order they came. Never: chooses which events a consumer gets (the hub does).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use wse_shards::Server;

use super::{Consumer, Hub};
use crate::control::api::{command_from, outcome_json};
use crate::control::commands::invalid_request;
use crate::control::publish::{authorize, constant_time_eq};
use crate::control::{ApiError, ApiErrorCode, Shared};

/// Events per frame at most.
const EVENTS_PER_FRAME: usize = 256;
/// Commands read and not yet run; past it the socket is not read until one finishes (the
/// backend sees TCP backpressure).
const COMMANDS_QUEUED_MAX: usize = 256;
/// At shutdown, how long a consumer has to answer our close frame (after its last events).
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
pub(in crate::control) struct KeyQuery {
    api_key: Option<String>,
}

/// The upgrade. The key may come as `?api_key=` (browsers cannot set headers on a WebSocket).
pub(in crate::control) async fn upgrade(
    State(state): State<Shared>,
    Query(query): Query<KeyQuery>,
    mut request: Request,
) -> Result<Response, ApiError> {
    {
        let configured = state.api_key.read().unwrap_or_else(|e| e.into_inner());
        match (&query.api_key, configured.as_deref()) {
            (Some(given), Some(expected))
                if constant_time_eq(given.as_bytes(), expected.as_bytes()) => {}
            (Some(_), Some(_)) => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    ApiErrorCode::Unauthorized,
                    "invalid API key",
                ));
            }
            _ => authorize(configured.as_deref(), request.headers())?,
        }
    }
    let accept = accept_key(request.headers())?;
    let on_upgrade = hyper::upgrade::on(&mut request);
    let hub = state.events.clone();
    let server = state.server.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let max = server.config().limits.max_message_size;
                let config = WebSocketConfig::default()
                    .max_message_size(Some(max))
                    .max_frame_size(Some(max));
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                serve(ws, hub, server).await;
            }
            Err(e) => tracing::debug!(error = %e, "event stream upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .map_err(|_| invalid_request("cannot build the upgrade response"))
}

/// Checks the upgrade request (RFC 6455 §4.2.1) and derives `Sec-WebSocket-Accept`.
fn accept_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let has = |name, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(UPGRADE, "websocket") || !has(CONNECTION, "upgrade") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            ApiErrorCode::UpgradeRequired,
            "GET /api/v1/events is a WebSocket: send Upgrade: websocket",
        ));
    }
    if headers.get("sec-websocket-version").map(|v| v.as_bytes()) != Some(b"13") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            ApiErrorCode::UpgradeRequired,
            "Sec-WebSocket-Version must be 13",
        ));
    }
    match headers.get(SEC_WEBSOCKET_KEY) {
        Some(key) => Ok(derive_accept_key(key.as_bytes())),
        None => Err(invalid_request("missing Sec-WebSocket-Key")),
    }
}

/// One consumer socket, until it closes or fails.
async fn serve<S>(mut ws: WebSocketStream<S>, hub: Arc<Hub>, server: Arc<Server>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let consumer = hub.register_socket();
    let (commands, mut queued) = mpsc::channel::<String>(COMMANDS_QUEUED_MAX);
    // Unbounded, yet never long: a reply exists only for a command read, and commands are read
    // only while fewer than COMMANDS_QUEUED_MAX wait.
    let (replies, mut answered) = mpsc::unbounded_channel::<String>();
    // Commands run one after another, in the order they came, beside the socket's I/O.
    let runner = tokio::spawn(async move {
        while let Some(text) = queued.recv().await {
            let reply = run_command(&server, &text).await;
            if replies.send(reply).is_err() {
                break;
            }
        }
    });
    if let Err(e) = pump(&mut ws, &consumer, &hub, &commands, &mut answered).await {
        tracing::debug!(error = %e, "event stream consumer gone");
    }
    let _ = ws.close(None).await;
    hub.unregister_socket(&consumer);
    runner.abort();
}

/// Moves events out and commands in until the peer closes.
async fn pump<S>(
    ws: &mut WebSocketStream<S>,
    consumer: &Consumer,
    hub: &Hub,
    commands: &mpsc::Sender<String>,
    answered: &mut mpsc::UnboundedReceiver<String>,
) -> Result<(), tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        // Unbiased: a flood of events must not starve the commands, nor the other way round.
        tokio::select! {
            Some(reply) = answered.recv() => ws.send(Message::text(reply)).await?,
            _ = consumer.ready.notified() => {
                let max_bytes = hub.server.config().events.max_frame_bytes;
                let batch = consumer.take(EVENTS_PER_FRAME, max_bytes);
                if consumer.len() > 0 {
                    // More than a frame: come back after the other duties had their turn.
                    consumer.ready.notify_one();
                }
                if !batch.is_empty() {
                    let n = batch.len();
                    ws.send(Message::text(json_array(batch))).await?;
                    hub.metrics.delivered.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
            _ = hub.closing() => return goodbye(ws, consumer, hub).await,
            message = ws.next() => match message {
                None | Some(Ok(Message::Close(_))) => return Ok(()),
                Some(Err(e)) => return Err(e),
                Some(Ok(Message::Text(text))) => {
                    if commands.send(text.to_string()).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let reply = json!({"id": null, "ok": false, "error": {"code": ApiErrorCode::InvalidRequest.as_str(),
                        "message": "commands are JSON text frames", "status": 400}});
                    ws.send(Message::text(reply.to_string())).await?;
                }
                // A ping's pong is queued by tungstenite; flushing sends it now.
                Some(Ok(_)) => ws.flush().await?,
            },
        }
    }
}

/// The server is going away: the consumer's last events (the drain's `disconnect`s among
/// them), then a close frame with 1001, whose answer is awaited for [`CLOSE_REPLY_WAIT`].
async fn goodbye<S>(
    ws: &mut WebSocketStream<S>,
    consumer: &Consumer,
    hub: &Hub,
) -> Result<(), tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let max_bytes = hub.server.config().events.max_frame_bytes;
    loop {
        let batch = consumer.take(EVENTS_PER_FRAME, max_bytes);
        if batch.is_empty() {
            break;
        }
        let n = batch.len();
        ws.send(Message::text(json_array(batch))).await?;
        hub.metrics
            .delivered
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let frame = CloseFrame {
        code: CloseCode::Away,
        reason: "server shutting down".into(),
    };
    ws.close(Some(frame)).await?;
    // Until the peer's close frame (tungstenite then ends the stream), or the wait is over.
    let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    Ok(())
}

/// `[e1,e2,...]` from events that are each JSON, in one allocation.
pub(super) fn json_array(events: Vec<String>) -> String {
    let mut out = String::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 1);
    out.push('[');
    for (i, e) in events.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&e);
    }
    out.push(']');
    out
}

/// One command frame: `{"id":..,"op":..,...}` → `{"id":..,"ok":..,...}`.
async fn run_command(server: &Arc<Server>, text: &str) -> String {
    let (id, outcome) = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(mut fields)) => {
            let id = fields.remove("id").unwrap_or(Value::Null);
            let outcome = match command_from(Value::Object(fields)) {
                Ok(cmd) => cmd.execute(server).await,
                Err(e) => Err(e),
            };
            (id, outcome)
        }
        Ok(_) => (
            Value::Null,
            Err(invalid_request("a command is a JSON object")),
        ),
        Err(e) => (
            Value::Null,
            Err(invalid_request(format!("malformed JSON: {e}"))),
        ),
    };
    let mut reply = outcome_json(outcome);
    reply["id"] = id;
    reply.to_string()
}
