//! The control plane: health, metrics and the server API on their own listener and thread.
//!
//! Owns: the control listener, its thread ("wse-control") and the single-threaded tokio runtime
//! axum serves on, and the event dispatcher's thread ("wse-events", see `events::dispatch`).
//! Never: touches shard state; it reads the shards' metrics and hands publications to
//! [`Server::publish`], which queues them to the owner shard over the fabric.
//!
//! Routes (every error is JSON `{"error":{"code":"...","message":"..."}}`; docs/API.md has them
//! all, `GET /api/v1/openapi.json` describes them):
//! - `GET /health`: liveness and a summary; no key.
//! - `GET /metrics`: Prometheus/OpenMetrics text, read from the shards at scrape time; no key.
//! - `/api/v1/...`: the server API, one endpoint per operation ([`api`], [`commands`]), the
//!   publish API ([`publish`]) and `POST /api/v1/batch`; they need `control.api_key`.
//! - `GET /api/v1/cluster`: the cluster core's membership snapshot (`crate::cluster`), read-only;
//!   `GET /api/v1/cluster/dlq`: its dead letter queue.
//! - `POST /api/<method>`: Centrifugo's HTTP server API ([`centrifugo_api`]), with the same key.

mod api;
mod centrifugo_api;
mod commands;
mod events;
#[cfg(test)]
mod fuzz;
mod listener;
mod metrics;
mod openapi;
mod process_metrics;
mod publish;
#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::watch;
use wse_shards::Server;
use wse_shards::config::ControlConfig;

use crate::cluster::ClusterView;

/// How long `stop` lets in-flight requests finish before the remaining connections are dropped.
/// A graceful shutdown alone would wait for a client that keeps a request open forever.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// The content type `prometheus_client::encoding::text` produces (it ends with `# EOF`).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The running control plane.
pub struct ControlPlane {
    local_addr: SocketAddr,
    /// `control.api_key`, which a reload may change.
    api_key: ApiKey,
    /// `true` asks the serving thread to stop. Dropping it (a `ControlPlane` dropped without
    /// `stop`) stops the thread too, but nobody joins it then.
    stop_tx: watch::Sender<bool>,
    /// The "wse-control" thread; it owns the runtime, the listener and every connection, all
    /// released when it returns.
    thread: JoinHandle<()>,
}

/// Binds `cfg.listen` (synchronously, so an address in use fails here) and serves on a thread
/// of its own ("wse-control") running a single-threaded tokio runtime.
///
/// # Errors
/// The listener cannot bind, or the runtime or the thread cannot start.
pub fn start(
    server: Arc<Server>,
    cfg: &ControlConfig,
    cluster: Option<ClusterView>,
) -> io::Result<ControlPlane> {
    let std_listener = std::net::TcpListener::bind(cfg.listen)?;
    std_listener.set_nonblocking(true)?;
    let local_addr = std_listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registering with the reactor needs the runtime's context; done here so it fails here.
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(std_listener)?
    };
    let api_key: ApiKey = Arc::new(RwLock::new(cfg.api_key.clone()));
    let webhook = match &server.config().events.webhook_url {
        Some(url) => Some(
            url.parse::<axum::http::Uri>()
                .map_err(|e| io::Error::other(format!("events.webhook_url: {e}")))?,
        ),
        None => None,
    };
    let hub = events::Hub::new(server.clone(), webhook.is_some());
    let listener_metrics = Arc::new(listener::ControlMetrics::default());
    let app = router(
        server.clone(),
        api_key.clone(),
        hub.clone(),
        listener_metrics.clone(),
        cluster,
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    // Pulling events from the shards and turning them into JSON is the event stream's heavy
    // work (a 1 MB message is a 1 to 6 MB event): it runs on a thread of its own, so the
    // requests on the control thread never wait behind it.
    let events_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dispatcher = {
        let (hub, stop_rx) = (hub.clone(), stop_rx.clone());
        std::thread::Builder::new()
            .name("wse-events".to_owned())
            .spawn(move || events_runtime.block_on(events::dispatch(hub, stop_rx)))?
    };
    let thread = std::thread::Builder::new()
        .name("wse-control".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                if let Some(url) = webhook {
                    let consumer = hub.register_webhook();
                    tokio::spawn(events::webhook::run(hub.clone(), consumer, url, stop_rx.clone()));
                }
                listener::serve(listener, app, server, listener_metrics, stop_rx).await;
                // The event-stream sockets close once the dispatcher has handed them the
                // shards' last events.
                let closed = tokio::time::timeout(STOP_GRACE, hub.sockets_closed()).await;
                if closed.is_err() {
                    tracing::warn!("control plane: event-stream consumers still open {STOP_GRACE:?} after stop; dropping them");
                }
            });
            // `stop` reached the dispatcher too; it returns at its next await.
            if dispatcher.join().is_err() {
                tracing::error!("the event dispatcher thread panicked");
            }
        })?;
    Ok(ControlPlane {
        local_addr,
        api_key,
        stop_tx,
        thread,
    })
}

impl ControlPlane {
    /// The bound address (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the key the `/api/v1/` routes require (a reload); requests already past the
    /// check finish.
    pub fn set_api_key(&self, key: Option<String>) {
        *self.api_key.write().unwrap_or_else(|e| e.into_inner()) = key;
    }

    /// Stops serving and joins the thread: in-flight requests get up to [`STOP_GRACE`], then the
    /// remaining connections are dropped.
    pub fn stop(self) {
        // An error means the thread has already gone; joining is all that is left.
        let _ = self.stop_tx.send(true);
        if self.thread.join().is_err() {
            tracing::error!("the control plane thread panicked");
        }
    }
}

/// What every handler shares.
struct AppState {
    server: Arc<Server>,
    /// `control.api_key`; `None` disables the `/api/v1/` routes (403).
    api_key: ApiKey,
    /// Holds only [`metrics::ShardCollector`], which reads the shards at each scrape.
    registry: Registry,
    /// The application event stream's consumers.
    events: Arc<events::Hub>,
    /// The control listener's connection and timeout counters.
    listener: Arc<listener::ControlMetrics>,
    /// The cluster core's membership, when `cluster.enabled`.
    cluster: Option<ClusterView>,
}

type Shared = Arc<AppState>;

/// Read per request, written by a reload.
type ApiKey = Arc<RwLock<Option<String>>>;

fn router(
    server: Arc<Server>,
    api_key: ApiKey,
    events: Arc<events::Hub>,
    listener: Arc<listener::ControlMetrics>,
    cluster: Option<ClusterView>,
) -> Router {
    // Larger bodies are refused with 413 while being read (the `Bytes` extractor enforces it).
    let body_limit = server.config().limits.max_message_size;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(metrics::ShardCollector::new(
        server.clone(),
        events.metrics.clone(),
        listener.clone(),
        cluster.clone(),
    )));
    let state: Shared = Arc::new(AppState {
        server,
        api_key,
        registry,
        events,
        listener,
        cluster,
    });
    // A route layer runs before the handler's extractors: an unauthorised body is never read.
    use api::{get_op, get_plain, post_op, post_plain};
    let conn = Some("connection_id");
    let topic = Some("topic");
    let api = Router::new()
        .route("/api/v1/publish", post(publish::publish))
        .route("/api/v1/publish/batch", post(publish::publish_batch))
        .route("/api/v1/connections", get_plain("get_connections"))
        .route(
            "/api/v1/connections/count",
            get_plain("get_connection_count"),
        )
        .route("/api/v1/connections/{id}/send", post_op("send", conn))
        .route(
            "/api/v1/connections/{id}/send_event",
            post_op("send_event", conn),
        )
        .route(
            "/api/v1/connections/{id}/rpc_reply",
            post_op("rpc_reply", conn),
        )
        .route(
            "/api/v1/connections/{id}/disconnect",
            post_op("disconnect", conn),
        )
        .route(
            "/api/v1/connections/{id}/subscribe",
            post_op("subscribe", conn),
        )
        .route(
            "/api/v1/connections/{id}/unsubscribe",
            post_op("unsubscribe", conn),
        )
        .route("/api/v1/connections/{id}/acl", post_op("set_acl", conn))
        .route(
            "/api/v1/users/{user}/send",
            post_op("send_user", Some("user_id")),
        )
        .route("/api/v1/broadcast", post_plain("broadcast"))
        .route("/api/v1/broadcast_local", post_plain("broadcast_local"))
        .route("/api/v1/broadcast_all", post_plain("broadcast_all"))
        .route(
            "/api/v1/topics/{topic}/subscribers/count",
            get_op("get_topic_subscriber_count", topic),
        )
        .route("/api/v1/presence/{topic}", get_op("presence", topic))
        .route(
            "/api/v1/presence/{topic}/stats",
            get_op("presence_stats", topic),
        )
        .route("/api/v1/health", get_plain("health"))
        .route("/api/v1/drain", post_plain("drain"))
        .route("/api/v1/batch", post(api::batch))
        .route("/api/v1/cluster", get(cluster_view))
        .route("/api/v1/cluster/dlq", get(cluster_dlq))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            publish::require_api_key,
        ));
    // Centrifugo's server API: its own key check and reply shapes (centrifugo_api).
    let centrifugo = Router::new()
        .route("/api/{method}", post(centrifugo_api::handle))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            centrifugo_api::require_key,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        // A description, not an action: served without the key, for tools.
        .route("/api/v1/openapi.json", get(openapi::document))
        // Checks the key itself: it may come as ?api_key= (browsers cannot set headers on a
        // WebSocket).
        .route("/api/v1/events", get(events::stream::upgrade))
        .merge(api)
        .merge(centrifugo)
        .fallback(not_found)
        // Must follow the routes: it applies to the routes already added.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        // Outermost: the deadline covers the body's upload and every handler.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            listener::request_deadline,
        ))
        .with_state(state)
}

/// The load balancer's probe: 200 while serving, 503 once a drain began (the process is about
/// to close its connections and exit), so no new client is sent here meanwhile.
async fn health(State(state): State<Shared>) -> (StatusCode, Json<serde_json::Value>) {
    let server = &state.server;
    let draining = server.is_draining();
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = json!({
        "status": if draining { "draining" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": server.uptime().as_secs_f64(),
        "shards": server.shard_count(),
        "connections": server.connection_count(),
    });
    (status, Json(body))
}

async fn prometheus(State(state): State<Shared>) -> Result<Response, ApiError> {
    let mut text = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut text, &state.registry).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ApiErrorCode::ServerError,
            "cannot encode the metrics",
        )
    })?;
    Ok(([(CONTENT_TYPE, OPENMETRICS)], text).into_response())
}

/// `GET /api/v1/cluster`: who this node sees in the cluster (docs/CLUSTER.md). The cluster core
/// publishes a snapshot after every change; this only reads it.
async fn cluster_view(State(state): State<Shared>) -> Json<serde_json::Value> {
    Json(match &state.cluster {
        Some(view) => view.snapshot(),
        None => json!({ "enabled": false }),
    })
}

/// `GET /api/v1/cluster/dlq`: the publications the cluster core dropped for a peer, kept for
/// diagnosis (at most `cluster.dlq_entries`, oldest first; docs/API.md).
async fn cluster_dlq(State(state): State<Shared>) -> Json<serde_json::Value> {
    Json(match &state.cluster {
        Some(view) => view.dlq().as_ref().clone(),
        None => json!({ "enabled": false }),
    })
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ApiErrorCode::NotFound,
        format!("no route for {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ApiErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Every error code the server API answers with (docs/API.md, "Errors"), each with the HTTP
/// status it goes with. One mapping to the wire: [`ApiErrorCode::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ApiErrorCode {
    /// 400: the body is not JSON.
    InvalidJson,
    /// 400: missing, unknown or ill-typed fields; an unknown `op`.
    InvalidRequest,
    /// 400: a topic the protocol does not allow (empty, too long, bad characters).
    InvalidTopic,
    /// 400: not 16 hex digits.
    InvalidConnectionId,
    /// 400: an event object without `t`/`type`, or not an object.
    InvalidEvent,
    /// 400: a close code other than 1000 or 3000–4999.
    InvalidCloseCode,
    /// 401: no key, or the wrong key.
    Unauthorized,
    /// 403: no `control.api_key` configured.
    ApiDisabled,
    /// 404: no such connection (it may have just left).
    UnknownConnection,
    /// 404: no `rpc` with this `request` waits on the connection (answered already, timed out).
    UnknownRequest,
    /// 404: a presence query with `presence.enabled = false`.
    PresenceDisabled,
    /// 404: no such route.
    NotFound,
    /// 405: the route does not take this method.
    MethodNotAllowed,
    /// 408: the request was not complete within `control.request_timeout`; the connection is closed.
    RequestTimeout,
    /// 409: the connection's outbound queue is full; the message was not queued.
    SlowConsumer,
    /// 413: a body over `limits.max_message_size`.
    PayloadTooLarge,
    /// 426: `GET /api/v1/events` without a WebSocket upgrade.
    UpgradeRequired,
    /// 500: the metrics could not be encoded (a bug, never the request).
    ServerError,
    /// 503: a cross-shard queue is full; retry later.
    Overloaded,
    /// 503: the server is stopping.
    NotRunning,
    /// 504: a shard did not answer in time.
    Timeout,
}

impl ApiErrorCode {
    /// The string on the wire.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "INVALID_JSON",
            Self::InvalidRequest => "INVALID_REQUEST",
            Self::InvalidTopic => "INVALID_TOPIC",
            Self::InvalidConnectionId => "INVALID_CONNECTION_ID",
            Self::InvalidEvent => "INVALID_EVENT",
            Self::InvalidCloseCode => "INVALID_CLOSE_CODE",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::ApiDisabled => "API_DISABLED",
            Self::UnknownConnection => "UNKNOWN_CONNECTION",
            Self::UnknownRequest => "UNKNOWN_REQUEST",
            Self::PresenceDisabled => "PRESENCE_DISABLED",
            Self::NotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::RequestTimeout => "REQUEST_TIMEOUT",
            Self::SlowConsumer => "SLOW_CONSUMER",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::UpgradeRequired => "UPGRADE_REQUIRED",
            Self::ServerError => "SERVER_ERROR",
            Self::Overloaded => "OVERLOADED",
            Self::NotRunning => "NOT_RUNNING",
            Self::Timeout => "TIMEOUT",
        }
    }
}

/// Every error the control plane answers: `{"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    status: StatusCode,
    /// Stable, machine-readable; `message` is for people.
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: ApiErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.as_str(),
            message: message.into(),
        }
    }

    fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        let headers = response.headers_mut();
        match self.status {
            // RFC 9110 requires a challenge on 401.
            StatusCode::UNAUTHORIZED => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // Overload is transient: a shard's queue drains within milliseconds.
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}
