//! Webhook mode (`events.webhook_url`): events POSTed as JSON arrays, in batches, with retries.
//!
//! Owns: batching (up to `events.webhook_batch_size` events and `events.max_frame_bytes` bytes
//! of body — one larger event goes alone — or whatever came within
//! `events.webhook_batch_interval` of the first), the HTTP/1.1 connection (kept alive and reused,
//! remade after any failure), and retries (`events.webhook_max_retries`, backoff doubling from
//! [`BACKOFF_FIRST`] up to [`BACKOFF_MAX`]). A batch still failing after the last retry is
//! dropped and counted (`wse_inbound_dropped_total{reason="webhook_failed"}`); meanwhile the
//! consumer queue keeps filling, bounded (`events.webhook_queue_capacity` events and
//! `events.webhook_queue_bytes` bytes, oldest dropped).
//!
//! Batches go one at a time, in order: a connection's events reach the webhook in order unless a
//! batch is given up.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::header::{CONTENT_TYPE, HOST};
use axum::http::{Request, StatusCode, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use super::{Consumer, Hub};

/// Wait before the first retry; each next one waits twice as long.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Sends the webhook consumer's events to `url` until `stop`.
pub(crate) async fn run(
    hub: Arc<Hub>,
    consumer: Arc<Consumer>,
    url: Uri,
    mut stop: watch::Receiver<bool>,
) {
    let mut client = Client { url, sender: None };
    loop {
        tokio::select! {
            _ = consumer.ready.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let cfg = hub.server.config().events.clone();
        if consumer.len() < cfg.webhook_batch_size {
            // Let the batch fill.
            tokio::select! {
                _ = tokio::time::sleep(cfg.webhook_batch_interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        loop {
            let batch = consumer.take(cfg.webhook_batch_size, cfg.max_frame_bytes);
            if batch.is_empty() {
                break;
            }
            let n = batch.len();
            let body = Bytes::from(super::stream::json_array(batch));
            let delivered = tokio::select! {
                ok = client.post_with_retries(body, cfg.webhook_max_retries, cfg.webhook_timeout) => ok,
                _ = stop.wait_for(|s| *s) => return,
            };
            let counter = if delivered {
                &hub.metrics.delivered
            } else {
                &hub.metrics.webhook_failed
            };
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

struct Client {
    url: Uri,
    /// The kept-alive connection, if one is open.
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// Whether the batch was accepted (a 2xx) within the attempts.
    async fn post_with_retries(&mut self, body: Bytes, retries: u32, timeout: Duration) -> bool {
        let mut backoff = BACKOFF_FIRST;
        for attempt in 0..=retries {
            match tokio::time::timeout(timeout, self.post(body.clone())).await {
                Ok(Ok(status)) if status.is_success() => return true,
                Ok(Ok(status)) => {
                    tracing::warn!(%status, attempt, url = %self.url, "webhook refused a batch");
                }
                Ok(Err(e)) => {
                    self.sender = None;
                    tracing::warn!(error = %e, attempt, url = %self.url, "webhook POST failed");
                }
                Err(_) => {
                    self.sender = None;
                    tracing::warn!(attempt, url = %self.url, "webhook POST timed out");
                }
            }
            if attempt < retries {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        tracing::error!(url = %self.url, "webhook batch dropped after {} attempts", retries + 1);
        false
    }

    async fn post(
        &mut self,
        body: Bytes,
    ) -> Result<StatusCode, Box<dyn std::error::Error + Send + Sync>> {
        let authority = self
            .url
            .authority()
            .ok_or("the webhook URL has no host")?
            .clone();
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let port = authority.port_u16().unwrap_or(80);
            let stream = tokio::net::TcpStream::connect((authority.host(), port)).await?;
            let _ = stream.set_nodelay(true);
            let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
            // Drives the connection; ends when it closes or the sender is dropped.
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await?;
        let path = self.url.path_and_query().map_or("/", |p| p.as_str());
        let request = Request::post(path)
            .header(HOST, authority.as_str())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        // Read the body to the end so the connection can carry the next request.
        response.into_body().collect().await?;
        Ok(status)
    }
}
