//! Connecting ([`Connector`]) and talking ([`Client`]).

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::{Error, Result};
use crate::event::{Event, decode_binary, decode_text};

/// The WebSocket stream type under a [`Client`].
pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// `client_version` this client announces in `client_hello`.
pub const CLIENT_VERSION: &str = "wse-rs/0.1";

/// Protocol version this client speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// How long [`Client::close`] waits for the server's close reply at most.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How long to wait for the close handshake reply to be written after the server's close frame.
const CLOSE_REPLY_FLUSH: Duration = Duration::from_millis(500);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where the connection's JWT goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenVia {
    /// `Cookie: access_token=<jwt>` and `Authorization: Bearer <jwt>`, as the Python client sends.
    #[default]
    CookieAndBearer,
    /// Only the cookie.
    Cookie,
    /// Only `Authorization: Bearer <jwt>`.
    Bearer,
    /// Only the `token=<jwt>` query parameter.
    Query,
}

/// How the server closed a connection, and what it sent before.
#[derive(Debug, Clone, PartialEq)]
pub struct CloseInfo {
    /// Close code (1005: close frame without a code; 1006: the connection dropped without a close
    /// frame). tungstenite reports a close frame carrying a code that is not allowed on the wire
    /// (e.g. 1005, 1006, 1015, < 1000) as 1002 "Protocol violation".
    pub code: u16,
    /// Close reason.
    pub reason: String,
    /// The messages received before the close frame (including any still buffered), in order.
    pub events_before: Vec<Event>,
    /// The last `error` event received on the connection, if any.
    pub last_error: Option<Event>,
}

/// Builder for a [`Client`] connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), wse_client::Error> {
/// use std::time::Duration;
/// use wse_client::{Connector, TokenVia};
/// let client = Connector::new("ws://127.0.0.1:5007/wse")
///     .token("eyJ...".to_string())
///     .token_via(TokenVia::Query)
///     .timeout(Duration::from_secs(5))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Connector {
    url: String,
    token: Option<String>,
    token_via: TokenVia,
    cookie_name: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    hello: bool,
    auto_pong: bool,
    timeout: Duration,
    request_timeout: Duration,
    config: WebSocketConfig,
}

impl Connector {
    /// A connector for `url` (`ws://host:port/path`, query allowed). No token, hello and auto-pong
    /// on, 10 s timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: None,
            token_via: TokenVia::default(),
            cookie_name: "access_token".to_owned(),
            query: Vec::new(),
            headers: Vec::new(),
            hello: true,
            auto_pong: true,
            timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            config: WebSocketConfig::default()
                .max_message_size(Some(64 << 20))
                .max_frame_size(Some(16 << 20)),
        }
    }

    /// The JWT to authenticate with.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Where the token goes (default [`TokenVia::CookieAndBearer`]).
    pub fn token_via(mut self, via: TokenVia) -> Self {
        self.token_via = via;
        self
    }

    /// Name of the auth cookie (default `access_token`).
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        self.cookie_name = name.into();
        self
    }

    /// Adds a query parameter to the URL (percent-encoded).
    pub fn query(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.query.push((key.into(), value.into()));
        self
    }

    /// Adds the query parameters the Python client puts on its URL:
    /// `client_version=2.0.7&protocol_version=1&compression=true&encryption=false`.
    pub fn python_client_query(self) -> Self {
        self.query("client_version", "2.0.7")
            .query("protocol_version", "1")
            .query("compression", "true")
            .query("encryption", "false")
    }

    /// Adds an HTTP header to the upgrade request (e.g. `Origin`).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Whether to send `client_hello` after `server_ready` and wait for `server_hello`
    /// (default true).
    pub fn hello(mut self, hello: bool) -> Self {
        self.hello = hello;
        self
    }

    /// Whether to answer the server's JSON pings (`"t":"ping"` or `"PING"`) with a `PONG` as the
    /// Python client does, without surfacing them from `recv` (default true).
    pub fn auto_pong(mut self, auto_pong: bool) -> Self {
        self.auto_pong = auto_pong;
        self
    }

    /// Time limit for the WebSocket upgrade plus the WSE handshake (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Time limit for each request/reply exchange and for [`Client::recv`] (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Replaces the tungstenite configuration (default: tungstenite's, with 64 MiB messages and
    /// 16 MiB frames).
    pub fn ws_config(mut self, config: WebSocketConfig) -> Self {
        self.config = config;
        self
    }

    /// The URL the upgrade request goes to (with the query parameters added).
    pub fn full_url(&self) -> String {
        let mut params: Vec<(&str, &str)> = self
            .query
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let (Some(token), TokenVia::Query) = (&self.token, self.token_via) {
            params.push(("token", token));
        }
        let mut url = self.url.clone();
        for (k, v) in params {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&percent_encode(k));
            url.push('=');
            url.push_str(&percent_encode(v));
        }
        url
    }

    /// Opens the connection: WebSocket upgrade, `server_ready`, and (unless disabled) the
    /// `client_hello`/`server_hello` exchange.
    ///
    /// The first message must be `server_ready`, else [`Error::Protocol`] — except when the
    /// server sends an `error` and closes (an auth failure), which gives [`Error::Closed`] with
    /// that error as `last_error`. [`Error::Timeout`] when it all takes longer than the timeout.
    pub async fn connect(&self) -> Result<Client> {
        tokio::time::timeout(self.timeout, self.connect_inner())
            .await
            .unwrap_or(Err(Error::Timeout))
    }

    async fn connect_inner(&self) -> Result<Client> {
        let mut request = self.full_url().into_client_request()?;
        let headers = request.headers_mut();
        if let Some(token) = &self.token {
            if matches!(self.token_via, TokenVia::CookieAndBearer | TokenVia::Cookie) {
                headers.insert(
                    header::COOKIE,
                    header_value(&format!("{}={token}", self.cookie_name))?,
                );
            }
            if matches!(self.token_via, TokenVia::CookieAndBearer | TokenVia::Bearer) {
                headers.insert(
                    header::AUTHORIZATION,
                    header_value(&format!("Bearer {token}"))?,
                );
            }
        }
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| Error::WebSocket(tungstenite::Error::HttpFormat(e.into())))?;
            headers.append(name, header_value(value)?);
        }
        let (ws, _response) =
            tokio_tungstenite::connect_async_with_config(request, Some(self.config), true).await?;

        let mut client = Client {
            ws,
            buffered: VecDeque::new(),
            incoming: VecDeque::new(),
            outbox: VecDeque::new(),
            server_ready: Event::default(),
            server_hello: None,
            connection_id: String::new(),
            auto_pong: false,
            request_timeout: self.request_timeout,
            last_error: None,
            closed: None,
            auto_pongs_sent: 0,
        };

        // The first message must be server_ready (no auto-pong yet: a ping first is a violation).
        let first = client.next_wire().await?;
        match first.t.as_str() {
            "server_ready" => {}
            "error" => {
                return Err(match client.next_wire().await {
                    Ok(next) => Error::Protocol(format!(
                        "expected server_ready as the first message, got an error {} followed by {}",
                        first.describe(),
                        next.describe()
                    )),
                    Err(e) => e,
                });
            }
            _ => {
                return Err(Error::Protocol(format!(
                    "expected server_ready as the first message, got {}",
                    first.describe()
                )));
            }
        }
        client.connection_id = first
            .p
            .pointer("/details/connection_id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "server_ready has no string p.details.connection_id: {}",
                    first.describe()
                ))
            })?
            .to_owned();
        client.server_ready = first;
        client.auto_pong = self.auto_pong;

        if self.hello {
            let hello = envelope(
                "WSE",
                "client_hello",
                &ClientHello {
                    client_version: CLIENT_VERSION,
                    protocol_version: PROTOCOL_VERSION,
                    features: ClientFeatures::default(),
                    connection_id: &client.connection_id,
                },
                true,
            );
            if let Err(send_err) = client.send_message(Message::text(hello)).await {
                // The server may have closed already: report its close frame if it is readable.
                loop {
                    match client.next_wire().await {
                        Ok(ev) => client.buffered.push_back(ev),
                        Err(closed @ Error::Closed { .. }) => return Err(closed),
                        Err(_) => return Err(send_err),
                    }
                }
            }
            let hello = client.wait_reply(|ev| ev.t == "server_hello").await?;
            client.server_hello = Some(hello);
        }
        Ok(client)
    }
}

fn header_value(value: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(value)
        .map_err(|e| Error::WebSocket(tungstenite::Error::HttpFormat(e.into())))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Serialises `{"c":..,"t":..,"p":..[,"v":1]}` with the keys in that order (as the published
/// clients send them; `serde_json::Value` would sort them).
fn envelope<P: Serialize + ?Sized>(c: &str, t: &str, p: &P, v: bool) -> String {
    #[derive(Serialize)]
    struct Envelope<'a, P: ?Sized> {
        c: &'a str,
        t: &'a str,
        p: &'a P,
        #[serde(skip_serializing_if = "Option::is_none")]
        v: Option<u32>,
    }
    serde_json::to_string(&Envelope {
        c,
        t,
        p,
        v: v.then_some(PROTOCOL_VERSION),
    })
    .expect("serialising a message cannot fail")
}

#[derive(Serialize)]
struct ClientHello<'a> {
    client_version: &'a str,
    protocol_version: u32,
    features: ClientFeatures,
    connection_id: &'a str,
}

/// The feature flags the Python client announces, in its order.
#[derive(Serialize)]
struct ClientFeatures {
    compression: bool,
    encryption: bool,
    batching: bool,
    priority_queue: bool,
    circuit_breaker: bool,
    offline_queue: bool,
    message_signing: bool,
    rate_limiting: bool,
    health_check: bool,
    metrics: bool,
}

impl Default for ClientFeatures {
    fn default() -> Self {
        Self {
            compression: true,
            encryption: false,
            batching: true,
            priority_queue: true,
            circuit_breaker: true,
            offline_queue: true,
            message_signing: false,
            rate_limiting: true,
            health_check: true,
            metrics: true,
        }
    }
}

#[derive(Serialize)]
struct Subscription<'a> {
    action: &'a str,
    topics: &'a [&'a str],
}

#[derive(Serialize)]
struct Publish<'a> {
    topic: &'a str,
    event: &'a str,
    data: &'a Value,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ack: bool,
}

#[derive(Serialize)]
struct Ping {
    timestamp: u64,
}

#[derive(Serialize)]
struct Pong {
    server_timestamp: Value,
    client_timestamp: u64,
}

/// An open WSE connection (after `server_ready`, and `server_hello` unless disabled).
///
/// Every message the server sends is returned by [`recv`](Self::recv) and friends in arrival
/// order, except the server's JSON pings when auto-pong is on and the replies that
/// request methods ([`subscribe`](Self::subscribe), [`ping`](Self::ping), ...) return. Messages
/// that arrive while a request waits for its reply are kept for `recv`.
#[derive(Debug)]
pub struct Client {
    ws: WsStream,
    /// Received and examined, not yet returned by `recv`.
    buffered: VecDeque<Event>,
    /// Decoded from the latest frame(s), not yet examined.
    incoming: VecDeque<Event>,
    /// Automatic replies (PONG) not yet written.
    outbox: VecDeque<Message>,
    server_ready: Event,
    server_hello: Option<Event>,
    connection_id: String,
    auto_pong: bool,
    request_timeout: Duration,
    last_error: Option<Event>,
    closed: Option<(u16, String)>,
    auto_pongs_sent: u64,
}

impl Client {
    /// The `server_ready` message.
    pub fn server_ready(&self) -> &Event {
        &self.server_ready
    }

    /// The `server_hello` message (`None` when the connector had `hello(false)`).
    pub fn server_hello(&self) -> Option<&Event> {
        self.server_hello.as_ref()
    }

    /// `p.details.connection_id` of `server_ready`.
    pub fn connection_id(&self) -> &str {
        &self.connection_id
    }

    /// The last `error` event received on this connection (returned by `recv` or not).
    pub fn last_error(&self) -> Option<&Event> {
        self.last_error.as_ref()
    }

    /// How many server pings were answered automatically.
    pub fn auto_pongs_sent(&self) -> u64 {
        self.auto_pongs_sent
    }

    /// Turns auto-pong on or off for the rest of the connection.
    pub fn set_auto_pong(&mut self, auto_pong: bool) {
        self.auto_pong = auto_pong;
    }

    /// Code and reason once the connection is known to be closed.
    pub fn close_status(&self) -> Option<(u16, &str)> {
        self.closed.as_ref().map(|(c, r)| (*c, r.as_str()))
    }

    /// The underlying WebSocket stream, for anything this API does not cover.
    pub fn ws_mut(&mut self) -> &mut WsStream {
        &mut self.ws
    }

    // -- sending ----------------------------------------------------------------------------

    /// Sends a raw WebSocket message (text, binary, ping, close...).
    ///
    /// Fails with [`Error::Closed`] when the server's close frame has been received already.
    pub async fn send_message(&mut self, message: Message) -> Result<()> {
        if self.closed.is_some() {
            return Err(self.closed_error());
        }
        self.flush_outbox().await;
        self.ws.send(message).await?;
        Ok(())
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<()> {
        self.send_message(Message::text(text.into())).await
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: impl Into<Vec<u8>>) -> Result<()> {
        self.send_message(Message::binary(data.into())).await
    }

    /// Sends a JSON value as a text frame (object keys sorted: serde_json's `Value` order).
    pub async fn send_json(&mut self, value: &Value) -> Result<()> {
        let text = serde_json::to_string(value)?;
        self.send_text(text).await
    }

    /// Subscribes: sends
    /// `{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":[..]}}` and returns
    /// the `subscription_update` reply (or an `error` event sent instead).
    pub async fn subscribe(&mut self, topics: &[&str]) -> Result<Event> {
        self.subscription("subscribe", topics).await
    }

    /// Unsubscribes, like [`subscribe`](Self::subscribe) with `"action":"unsubscribe"`.
    pub async fn unsubscribe(&mut self, topics: &[&str]) -> Result<Event> {
        self.subscription("unsubscribe", topics).await
    }

    async fn subscription(&mut self, action: &str, topics: &[&str]) -> Result<Event> {
        let text = envelope(
            "WSE",
            "subscription_update",
            &Subscription { action, topics },
            false,
        );
        self.request(text, |ev| ev.t == "subscription_update" || ev.t == "error")
            .await
    }

    /// Sends `{"c":"WSE","t":"subscription_update","p":<p>}` with a payload of your own
    /// (recovery, presence...) and returns the `subscription_update` reply (or an `error`).
    pub async fn subscribe_with(&mut self, p: Value) -> Result<Event> {
        let text = envelope("WSE", "subscription_update", &p, false);
        self.request(text, |ev| ev.t == "subscription_update" || ev.t == "error")
            .await
    }

    /// Publishes: sends `{"c":"U","t":"publish","p":{"topic":..,"event":..,"data":..}}`.
    pub async fn publish(&mut self, topic: &str, event: &str, data: Value) -> Result<()> {
        let text = envelope(
            "U",
            "publish",
            &Publish {
                topic,
                event,
                data: &data,
                ack: false,
            },
            false,
        );
        self.send_text(text).await
    }

    /// Publishes with `"ack":true` and returns the `publish_ack` reply, or the `error` event the
    /// server sent instead (e.g. `FORBIDDEN`).
    pub async fn publish_acked(&mut self, topic: &str, event: &str, data: Value) -> Result<Event> {
        let text = envelope(
            "U",
            "publish",
            &Publish {
                topic,
                event,
                data: &data,
                ack: true,
            },
            false,
        );
        self.request(text, |ev| ev.t == "publish_ack" || ev.t == "error")
            .await
    }

    /// Sends `{"c":"WSE","t":"ping","p":{"timestamp":<now ms>}}` and returns the `PONG` reply
    /// (`"t":"PONG"`, or `"pong"`: check `t`/`text` for exactness).
    pub async fn ping(&mut self) -> Result<Event> {
        let text = envelope(
            "WSE",
            "ping",
            &Ping {
                timestamp: now_ms(),
            },
            false,
        );
        self.request(text, |ev| ev.t == "PONG" || ev.t == "pong")
            .await
    }

    /// Sends a close frame and waits (at most 5 s) for the server's close reply, returning it with
    /// the messages that arrived meanwhile. When the server had closed first, returns its close.
    pub async fn close(mut self, code: u16, reason: &str) -> Result<CloseInfo> {
        if self.closed.is_none() {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            // A failed write still lets us read a close frame the server may have sent.
            let _ = self.ws.send(Message::Close(Some(frame))).await;
        }
        self.expect_close(CLOSE_WAIT).await
    }

    // -- receiving --------------------------------------------------------------------------

    /// The next message (buffered ones first), waiting at most the request timeout
    /// ([`Error::Timeout`]). When the server has closed: [`Error::Closed`] (every time).
    /// A frame that is not valid WSE gives [`Error::Protocol`]; the connection stays usable.
    pub async fn recv(&mut self) -> Result<Event> {
        let timeout = self.request_timeout;
        self.recv_timeout(timeout).await?.ok_or(Error::Timeout)
    }

    /// The next message, or `Ok(None)` when nothing arrives within `timeout`.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Event>> {
        if let Some(ev) = self.buffered.pop_front() {
            return Ok(Some(ev));
        }
        match tokio::time::timeout(timeout, self.next_wire()).await {
            Ok(result) => result.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Reads messages until one matches `pred` and returns it; the others are discarded.
    /// [`Error::Timeout`] if none matches within `timeout`.
    pub async fn recv_until(
        &mut self,
        mut pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event> {
        while let Some(ev) = self.buffered.pop_front() {
            if pred(&ev) {
                return Ok(ev);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.next_wire())
                .await
                .map_err(|_| Error::Timeout)??;
            if pred(&ev) {
                return Ok(ev);
            }
        }
    }

    /// Reads until the server's close frame and returns it with every message received before it
    /// (buffered ones included). [`Error::Timeout`] if the server does not close within `timeout`
    /// (the messages read are then kept for `recv`). The connection dropping without a close frame
    /// gives code 1006.
    pub async fn expect_close(&mut self, timeout: Duration) -> Result<CloseInfo> {
        let deadline = Instant::now() + timeout;
        let mut events: Vec<Event> = self.buffered.drain(..).collect();
        loop {
            match tokio::time::timeout_at(deadline, self.next_wire()).await {
                Ok(Ok(ev)) => events.push(ev),
                Ok(Err(Error::Closed {
                    code,
                    reason,
                    last_error,
                })) => {
                    return Ok(CloseInfo {
                        code,
                        reason,
                        events_before: events,
                        last_error: last_error.map(|e| *e),
                    });
                }
                Ok(Err(e)) => {
                    self.buffered.extend(events);
                    return Err(e);
                }
                Err(_) => {
                    self.buffered.extend(events);
                    return Err(Error::Timeout);
                }
            }
        }
    }

    // -- internals --------------------------------------------------------------------------

    /// Sends `text` and waits (request timeout) for the first message matching `is_reply`,
    /// buffering the others for `recv`.
    async fn request(&mut self, text: String, is_reply: impl Fn(&Event) -> bool) -> Result<Event> {
        self.send_text(text).await?;
        self.wait_reply(is_reply).await
    }

    async fn wait_reply(&mut self, is_reply: impl Fn(&Event) -> bool) -> Result<Event> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.next_wire())
                .await
                .map_err(|_| Error::Timeout)??;
            if is_reply(&ev) {
                return Ok(ev);
            }
            self.buffered.push_back(ev);
        }
    }

    fn closed_error(&self) -> Error {
        let (code, reason) = self.closed.clone().unwrap_or((1006, String::new()));
        Error::Closed {
            code,
            reason,
            last_error: self.last_error.clone().map(Box::new),
        }
    }

    /// Writes pending automatic replies. Write errors are dropped: a dead connection shows up
    /// on the next read, with the server's close frame if it sent one.
    async fn flush_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        while let Some(message) = self.outbox.front() {
            if self.ws.feed(message.clone()).await.is_err() {
                self.outbox.clear();
                return;
            }
            self.outbox.pop_front();
            self.auto_pongs_sent += 1;
        }
        let _ = self.ws.flush().await;
    }

    /// The next message from the wire (not from `buffered`). Cancel-safe: nothing is lost when the
    /// future is dropped.
    async fn next_wire(&mut self) -> Result<Event> {
        loop {
            if let Some(ev) = self.incoming.pop_front() {
                if self.auto_pong && (ev.t == "ping" || ev.t == "PING") {
                    self.outbox.push_back(Message::text(envelope(
                        "WSE",
                        "PONG",
                        &pong_for(&ev),
                        true,
                    )));
                    self.flush_outbox().await;
                    continue;
                }
                return Ok(ev);
            }
            if self.closed.is_some() {
                return Err(self.closed_error());
            }
            self.flush_outbox().await;
            let decoded = match self.ws.next().await {
                Some(Ok(Message::Text(text))) => decode_text(&text)?,
                Some(Ok(Message::Binary(data))) => decode_binary(&data)?,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    self.closed = Some(match frame {
                        Some(f) => (u16::from(f.code), f.reason.as_str().to_owned()),
                        None => (1005, String::new()),
                    });
                    // Let tungstenite write the close reply it queued.
                    let _ = tokio::time::timeout(CLOSE_REPLY_FLUSH, self.ws.flush()).await;
                    return Err(self.closed_error());
                }
                None => return Err(self.dropped("connection closed without a close frame")),
                Some(Err(e)) => return Err(self.read_failed(e)),
            };
            for ev in &decoded {
                if ev.t == "error" {
                    self.last_error = Some(ev.clone());
                }
            }
            self.incoming.extend(decoded);
        }
    }

    fn dropped(&mut self, why: impl Into<String>) -> Error {
        if self.closed.is_none() {
            self.closed = Some((1006, why.into()));
        }
        self.closed_error()
    }

    fn read_failed(&mut self, e: tungstenite::Error) -> Error {
        use tungstenite::error::ProtocolError;
        match e {
            tungstenite::Error::Io(io) => self.dropped(format!("connection dropped: {io}")),
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                self.dropped("connection closed")
            }
            tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                self.dropped("connection reset without closing handshake")
            }
            other => {
                // The stream is unusable after any other read error: report it once, then Closed.
                self.dropped(format!("WebSocket error: {other}"));
                Error::WebSocket(other)
            }
        }
    }
}

/// The Python client's answer to a server ping.
fn pong_for(ping: &Event) -> Pong {
    let truthy = |v: &&Value| match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        _ => true,
    };
    let server_timestamp = ping
        .p
        .get("server_time")
        .filter(truthy)
        .or_else(|| ping.p.get("timestamp").filter(truthy))
        .cloned()
        .unwrap_or_else(|| Value::from(now_ms()));
    Pong {
        server_timestamp,
        client_timestamp: now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn envelopes_keep_key_order() {
        let text = envelope(
            "WSE",
            "subscription_update",
            &Subscription {
                action: "subscribe",
                topics: &["a", "b\"c"],
            },
            false,
        );
        assert_eq!(
            text,
            r#"{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":["a","b\"c"]}}"#
        );
        let data = json!({"x": 1});
        let text = envelope(
            "U",
            "publish",
            &Publish {
                topic: "t",
                event: "e",
                data: &data,
                ack: true,
            },
            false,
        );
        assert_eq!(
            text,
            r#"{"c":"U","t":"publish","p":{"topic":"t","event":"e","data":{"x":1},"ack":true}}"#
        );
        let text = envelope(
            "WSE",
            "PONG",
            &Pong {
                server_timestamp: json!("2026-01-01T00:00:00Z"),
                client_timestamp: 5,
            },
            true,
        );
        assert_eq!(
            text,
            r#"{"c":"WSE","t":"PONG","p":{"server_timestamp":"2026-01-01T00:00:00Z","client_timestamp":5},"v":1}"#
        );
    }

    #[test]
    fn pong_echoes_server_time() {
        let ping = decode_text(r#"{"c":"WSE","t":"ping","p":{"server_time":"T1"}}"#).unwrap();
        assert_eq!(pong_for(&ping[0]).server_timestamp, json!("T1"));
        let ping = decode_text(r#"{"t":"PING","p":{"timestamp":123}}"#).unwrap();
        assert_eq!(pong_for(&ping[0]).server_timestamp, json!(123));
        let ping = decode_text(r#"{"t":"ping"}"#).unwrap();
        assert!(pong_for(&ping[0]).server_timestamp.is_u64());
    }

    #[test]
    fn full_url() {
        let c = Connector::new("ws://h:1/wse")
            .query("a b", "x&y")
            .token("tok.en")
            .token_via(TokenVia::Query);
        assert_eq!(c.full_url(), "ws://h:1/wse?a%20b=x%26y&token=tok.en");
        let c = Connector::new("ws://h:1/wse?z=1").python_client_query();
        assert_eq!(
            c.full_url(),
            "ws://h:1/wse?z=1&client_version=2.0.7&protocol_version=1&compression=true&encryption=false"
        );
        let c = Connector::new("ws://h:1/wse").token("t");
        assert_eq!(c.full_url(), "ws://h:1/wse");
    }
}
