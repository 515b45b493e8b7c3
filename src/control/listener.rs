//! The control listener's connections: accepting, the connection cap, the header and request
//! timeouts, and closing them on stop.
//!
//! Owns: the accept loop, each connection's hyper HTTP/1.1 server (with upgrades, for the event
//! stream), the count of open connections and the counters of what was refused. Never: routes
//! or answers a request (the axum router does).
//!
//! Limits, each read from the running configuration when it applies, so a reload changes them:
//! - `control.max_connections`: open HTTP connections. A connection accepted past it is closed
//!   at once, unanswered, and counted (`wse_control_rejected_total{reason="max_connections"}`).
//!   An event-stream socket stops counting once upgraded (it needs the API key to get there).
//! - `control.header_timeout`: hyper's header-read timeout, armed when a connection is accepted
//!   and again when a response has been written, so it bounds both a slow request head and an
//!   idle keep-alive connection. Past it the connection is closed (`reason="header_timeout"`).
//! - `control.request_timeout`: from the headers to the response, the body upload included
//!   (`request_deadline`). Past it: 408, `Connection: close`, `reason="request_timeout"`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::http::StatusCode;
use axum::http::header::CONNECTION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use wse_shards::Server;

use super::{ApiError, ApiErrorCode, STOP_GRACE, Shared};

/// Wait after an accept error (out of descriptors, typically) before accepting again, so the
/// loop does not spin while nothing can be accepted.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The listener's figures, read by `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ControlMetrics {
    /// Gauge: HTTP connections open (accepted, not closed, not upgraded).
    pub connections: AtomicU64,
    /// Connections closed unanswered because `control.max_connections` were open.
    pub rejected_max_connections: AtomicU64,
    /// Connections closed because a request's headers did not arrive within
    /// `control.header_timeout`.
    pub header_timeouts: AtomicU64,
    /// Requests answered 408 because they took longer than `control.request_timeout`.
    pub request_timeouts: AtomicU64,
}

/// Accepts and serves until `stop` turns true (or its sender is dropped); then asks every open
/// connection to finish its request and close, and waits up to `STOP_GRACE` for them.
/// Returning drops what is left (the runtime goes with the thread).
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    server: Arc<Server>,
    metrics: Arc<ControlMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control plane: accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let limits = server.config().control.clone();
        let open = metrics.connections.load(Ordering::Relaxed);
        if open >= limits.max_connections as u64 {
            // Dropping closes it: the peer sees the close before sending anything useful.
            metrics
                .rejected_max_connections
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::new(metrics.clone());
        let app = app.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            serve_connection(stream, app, limits.header_timeout, &open.0, stop).await;
            drop(open);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(STOP_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "control plane: requests still open {STOP_GRACE:?} after stop; dropping them"
        );
    }
}

/// One connection, until it closes, upgrades, fails or times out.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    header_timeout: Duration,
    metrics: &ControlMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let connection = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    // The guard `wait_for` returns is not `Send`: drop it before the branch awaits.
    let stopped = async {
        let _ = stop.wait_for(|s| *s).await;
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stopped => {
            // Finishes the request in flight, then closes; an idle connection closes at once.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            metrics.header_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(error = %e, "control connection ended");
    }
}

/// Counts a connection open for as long as it lives.
struct OpenConnection(Arc<ControlMetrics>);

impl OpenConnection {
    fn new(metrics: Arc<ControlMetrics>) -> Self {
        metrics.connections.fetch_add(1, Ordering::Relaxed);
        Self(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Middleware: the request must be answered within `control.request_timeout` of its headers,
/// the reading of its body included; past it, 408 and the connection is closed (its body may be
/// half read).
pub(super) async fn request_deadline(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let limit = state.server.config().control.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            state
                .listener
                .request_timeouts
                .fetch_add(1, Ordering::Relaxed);
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ApiErrorCode::RequestTimeout,
                format!("the request was not complete within control.request_timeout ({limit:?})"),
            )
            .into_response();
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}
