//! One lean client connection: raw tokio `TcpStream`, the engine's RFC 6455 codec, and the WSE
//! handshake, or the Centrifuge one ([`Dialect::Centrifuge`]: the upgrade, then `connect` with
//! the token). Thousands of these run as tasks on each load-generator thread.
//!
//! Owns: the upgrade request, frame decoding (allocation-free for unfragmented frames: messages
//! are borrowed from the read buffer), the automatic answers a real client gives (WebSocket Pong
//! to Ping, the Python client's `PONG` to the server's JSON `ping`, `{}` to a Centrifuge server's
//! `{}`), the split of a Centrifuge message into its replies and pushes, `C:` zlib inflation of
//! per-connection sends, and outgoing frame batching (`queue_*` then one `flush`).
//!
//! Never: interprets application messages beyond their type; scenarios do that in the callback
//! they pass to [`Conn::recv`].
//!
//! Memory per idle connection is the read buffer (its initial size is the caller's choice; it
//! grows only for a message that does not fit) plus an empty write buffer.

use std::io;
use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wse_shards::codec::{Decoder, Message, OpCode, Role, write_frame};
use wse_shards::handshake::accept_key;

use crate::centrifuge::{self, Item};
use crate::sys;
use crate::wire;

/// Largest HTTP upgrade response we read before giving up.
const HTTP_RESPONSE_MAX: usize = 16 * 1024;
/// Largest WebSocket message we accept (both servers cap at 1 MiB by default).
const MESSAGE_MAX: usize = 16 << 20;
/// Decompressed size cap for `C:` messages.
const INFLATE_MAX: u64 = 16 << 20;
/// Longest a blocking write may wait for the server to take bytes.
const BLOCKING_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Close code the load generator sends when it is done with a connection.
const CLOSE_NORMAL: u16 = 1000;

/// Where connections go: a parsed `ws://host:port/path?query` URL.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Request target: path and query.
    pub path: String,
}

impl Target {
    /// Parses and resolves a `ws://` URL (TLS is not supported: it would measure the TLS stack).
    ///
    /// # Errors
    /// Not a `ws://` URL, or the host does not resolve.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let Some(rest) = url.strip_prefix("ws://") else {
            bail!("{url:?}: only ws:// URLs are supported");
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let with_port = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_owned()
        } else {
            format!("{host}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {host:?}"))?
            .next()
            .with_context(|| format!("{host:?} resolves to nothing"))?;
        Ok(Self {
            addr,
            host: host.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// The client protocol a connection speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dialect {
    /// WSE: `server_ready`, `client_hello`, `subscription_update`.
    #[default]
    Wse,
    /// The Centrifuge client protocol v2 in this encoding: `connect`, `subscribe`.
    Centrifuge(centrifuge::Format),
}

/// One connection's destination, source address and protocol.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub target: Arc<Target>,
    pub source: Option<IpAddr>,
    pub dialect: Dialect,
}

/// Why a connection failed or ended. `kind()` names the tally it is counted in.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("upgrade refused: {0}")]
    Http(String),
    #[error("server error {0}")]
    Server(String),
    #[error("closed by server (code {0:?})")]
    Closed(Option<u16>),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out during {0}")]
    Timeout(&'static str),
}

impl ConnError {
    /// Short name for error tallies.
    pub fn kind(&self) -> String {
        match self {
            ConnError::Connect(e) => format!("connect:{}", io_kind(e)),
            ConnError::Io(e) => format!("io:{}", io_kind(e)),
            ConnError::Http(_) => "http".into(),
            ConnError::Server(code) => format!("server:{code}"),
            ConnError::Closed(Some(code)) => format!("closed:{code}"),
            ConnError::Closed(None) => "closed:eof".into(),
            ConnError::Protocol(_) => "protocol".into(),
            ConnError::Timeout(phase) => format!("timeout:{phase}"),
        }
    }
}

fn io_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("os{code}"),
        None => format!("{:?}", e.kind()),
    }
}

/// The id of a Centrifuge connection's `connect` command; its subscribes follow.
const CENTRIFUGE_CONNECT_ID: u32 = 1;

/// An open WebSocket connection past `server_ready` (WSE) or the `connect` reply (Centrifuge).
pub struct Conn {
    stream: TcpStream,
    dialect: Dialect,
    /// The next Centrifuge command id.
    next_id: u32,
    /// Received bytes; `rbuf[..filled]` is not yet decoded (at most one partial frame after a
    /// decode pass).
    rbuf: Vec<u8>,
    filled: usize,
    decoder: Decoder,
    /// Frames queued by `queue_*` and by automatic answers; written by `flush`.
    wbuf: Vec<u8>,
    /// Inflated `C:` messages (rare: only per-connection sends over the server's threshold).
    inflated: Vec<u8>,
    mask_state: u32,
    /// Server JSON pings answered with PONG.
    pub pings_answered: u64,
    /// Set once the server's close frame (or EOF) was seen.
    pub closed: Option<Option<u16>>,
}

impl Conn {
    /// Opens TCP, upgrades with `token` (sent as the Python client does: `access_token` cookie
    /// and `Authorization: Bearer`), and waits for `server_ready`. A Centrifuge connection
    /// upgrades without the token, sends it in `connect` and waits for the reply.
    ///
    /// # Errors
    /// Any failure, or `timeout` exceeded; an `error` message before `server_ready` (e.g.
    /// `AUTH_FAILED`) or an error reply to `connect` (its code) is [`ConnError::Server`].
    pub async fn open(
        ep: &Endpoint,
        token: &str,
        read_buf: usize,
        timeout: Duration,
    ) -> Result<Conn, ConnError> {
        tokio::time::timeout(timeout, Self::open_inner(ep, token, read_buf))
            .await
            .unwrap_or(Err(ConnError::Timeout("open")))
    }

    async fn open_inner(ep: &Endpoint, token: &str, read_buf: usize) -> Result<Conn, ConnError> {
        let stream = sys::connect_tcp(ep.target.addr, ep.source)
            .await
            .map_err(ConnError::Connect)?;
        let mut conn = Conn {
            stream,
            dialect: ep.dialect,
            next_id: CENTRIFUGE_CONNECT_ID,
            rbuf: vec![0; read_buf.max(512)],
            filled: 0,
            decoder: Decoder::new(Role::Client),
            wbuf: Vec::new(),
            inflated: Vec::new(),
            mask_state: rand::random::<u32>() | 1,
            pings_answered: 0,
            closed: None,
        };
        conn.upgrade(&ep.target, token).await?;
        match conn.dialect {
            Dialect::Wse => {
                let ready = conn
                    .wait_for(|m| is_type(m, b"server_ready"), |_| {})
                    .await?;
                debug_assert!(is_type(&ready, b"server_ready"));
            }
            Dialect::Centrifuge(format) => {
                let id = conn.take_ids(1);
                conn.queue_message(&format.connect(id, token));
                conn.flush().await?;
                conn.await_replies(format, id, 1)
                    .await
                    .map_err(|e| match e {
                        ReplyFailure::Conn(e) => e,
                        ReplyFailure::Error(code) => ConnError::Server(code.to_string()),
                    })?;
            }
        }
        Ok(conn)
    }

    /// Reserves `n` consecutive Centrifuge command ids; returns the first.
    fn take_ids(&mut self, n: u32) -> u32 {
        let first = self.next_id;
        self.next_id += n;
        first
    }

    /// Reads until the Centrifuge replies to commands `first..first + n` all arrived (in any
    /// order), or one of them is an error. Other messages before them are dropped: nothing is
    /// published to a connection before it is ready.
    async fn await_replies(
        &mut self,
        format: centrifuge::Format,
        first: u32,
        n: u32,
    ) -> Result<(), ReplyFailure> {
        let mut got = 0u32;
        let mut error = None;
        loop {
            // Never breaks: one message may hold several of the awaited replies.
            self.decode(&mut |m| {
                if let Some(head) = format.reply_head(m)
                    && (first..first + n).contains(&head.id)
                {
                    match head.error {
                        Some(code) => error = error.or(Some(code)),
                        None => got += 1,
                    }
                }
                ControlFlow::Continue(())
            })
            .map_err(ReplyFailure::Conn)?;
            self.flush()
                .await
                .map_err(|e| ReplyFailure::Conn(e.into()))?;
            if let Some(code) = error {
                return Err(ReplyFailure::Error(code));
            }
            if got >= n {
                return Ok(());
            }
            if let Some(code) = self.closed {
                return Err(ReplyFailure::Conn(ConnError::Closed(code)));
            }
            self.read_more().await.map_err(ReplyFailure::Conn)?;
        }
    }

    async fn upgrade(&mut self, target: &Target, token: &str) -> Result<(), ConnError> {
        let key = BASE64.encode(rand::random::<[u8; 16]>());
        // Centrifuge clients send the token in `connect`, and name the protobuf subprotocol.
        let extra = match self.dialect {
            Dialect::Wse => {
                format!("Cookie: access_token={token}\r\nAuthorization: Bearer {token}\r\n")
            }
            Dialect::Centrifuge(f) => f
                .subprotocol()
                .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
                .unwrap_or_default(),
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
            path = target.path,
            host = target.host,
        );
        self.stream.write_all(request.as_bytes()).await?;
        let head_len = loop {
            if let Some(i) = memchr::memmem::find(&self.rbuf[..self.filled], b"\r\n\r\n") {
                break i + 4;
            }
            if self.filled >= HTTP_RESPONSE_MAX {
                return Err(ConnError::Http("response head too large".into()));
            }
            self.read_more().await?;
        };
        let head = String::from_utf8_lossy(&self.rbuf[..head_len]).to_ascii_lowercase();
        let status = head.lines().next().unwrap_or_default().to_owned();
        if !status.starts_with("http/1.1 101") {
            return Err(ConnError::Http(status));
        }
        let want = format!(
            "sec-websocket-accept: {}",
            accept_key(&key).to_ascii_lowercase()
        );
        if !head.lines().any(|l| l.trim() == want) {
            return Err(ConnError::Http("bad Sec-WebSocket-Accept".into()));
        }
        // Frames the server sent right behind the 101 stay buffered for the decoder.
        self.rbuf.copy_within(head_len..self.filled, 0);
        self.filled -= head_len;
        Ok(())
    }

    /// Sends `client_hello` and waits for `server_hello`.
    ///
    /// # Errors
    /// Connection failure, or an `error` message instead of the answer.
    pub async fn hello(&mut self) -> Result<(), ConnError> {
        // Centrifuge has no hello: `connect` was the whole handshake.
        if self.dialect != Dialect::Wse {
            return Ok(());
        }
        self.queue_text(&wire::client_hello());
        self.flush().await?;
        self.wait_for(|m| is_type(m, b"server_hello"), |_| {})
            .await
            .map(drop)
    }

    /// Subscribes to `topics` and waits for the `subscription_update` reply; an unsuccessful
    /// reply is an error.
    ///
    /// # Errors
    /// Connection failure, an `error` message, or `success` not true.
    pub async fn subscribe(&mut self, topics: &[String]) -> Result<(), ConnError> {
        if let Dialect::Centrifuge(format) = self.dialect {
            let n = u32::try_from(topics.len())
                .map_err(|_| ConnError::Protocol("too many channels".into()))?;
            let first = self.take_ids(n);
            self.queue_message(&format.subscribe(first, topics));
            self.flush().await?;
            return self
                .await_replies(format, first, n)
                .await
                .map_err(|e| match e {
                    ReplyFailure::Conn(e) => e,
                    ReplyFailure::Error(code) => {
                        ConnError::Protocol(format!("subscription refused: error {code}"))
                    }
                });
        }
        self.subscribe_with(&wire::subscribe(topics), |_| {})
            .await
            .map(drop)
    }

    /// Sends a `subscription_update` request and waits for its successful acknowledgement,
    /// which it returns; messages before it (a recovery's replay) go to `other`.
    ///
    /// # Errors
    /// Connection failure, an `error` message, or `success` not true.
    pub async fn subscribe_with(
        &mut self,
        request: &[u8],
        other: impl FnMut(&[u8]),
    ) -> Result<Vec<u8>, ConnError> {
        self.queue_text(request);
        self.flush().await?;
        let reply = self
            .wait_for(|m| is_type(m, b"subscription_update"), other)
            .await?;
        match wire::raw_field(&reply, "success") {
            Some(b"true") => Ok(reply),
            _ => Err(ConnError::Protocol(format!(
                "subscription refused: {}",
                String::from_utf8_lossy(&reply)
            ))),
        }
    }

    /// Reads until a message satisfies `want` and returns a copy of it; every other message goes
    /// to `other`. An `error` message is returned as [`ConnError::Server`] unless `want` takes it.
    ///
    /// # Errors
    /// Connection failure or close before the message arrives.
    pub async fn wait_for(
        &mut self,
        want: impl Fn(&[u8]) -> bool,
        mut other: impl FnMut(&[u8]),
    ) -> Result<Vec<u8>, ConnError> {
        loop {
            let mut found: Option<Result<Vec<u8>, ConnError>> = None;
            self.decode(&mut |m| {
                if want(m) {
                    found = Some(Ok(m.to_vec()));
                    return ControlFlow::Break(());
                }
                if is_type(m, b"error") {
                    let code = wire::str_field(m, "code").unwrap_or(b"?");
                    found = Some(Err(ConnError::Server(
                        String::from_utf8_lossy(code).into_owned(),
                    )));
                    return ControlFlow::Break(());
                }
                other(m);
                ControlFlow::Continue(())
            })?;
            self.flush().await?;
            if let Some(result) = found {
                return result;
            }
            if let Some(code) = self.closed {
                return Err(ConnError::Closed(code));
            }
            self.read_more().await?;
        }
    }

    /// Waits for data, then hands every complete message to `on_message` (JSON bytes borrowed
    /// from the read buffer), queueing answers to pings on the way. One socket read per call,
    /// so a busy connection's messages are processed in batches.
    ///
    /// Cancel-safe (it only awaits the read): it can sit in a `select!`. It never writes, so
    /// the caller flushes queued answers ([`Conn::queued`] > 0) outside any `select!`: a
    /// cancelled write could leave half a frame on the wire.
    ///
    /// # Errors
    /// Connection failure; [`ConnError::Closed`] once the server closed.
    pub async fn recv(&mut self, mut on_message: impl FnMut(&[u8])) -> Result<(), ConnError> {
        if let Some(code) = self.closed {
            return Err(ConnError::Closed(code));
        }
        self.read_more().await?;
        self.decode(&mut |m| {
            on_message(m);
            ControlFlow::Continue(())
        })?;
        match self.closed {
            Some(code) => Err(ConnError::Closed(code)),
            None => Ok(()),
        }
    }

    /// Queues a masked text frame; nothing is written until [`Conn::flush`].
    pub fn queue_text(&mut self, payload: &[u8]) {
        let mask = self.next_mask();
        write_frame(&mut self.wbuf, OpCode::Text, true, payload, Some(mask));
    }

    /// Queues one message in the connection's own frame type: binary for Centrifuge protobuf,
    /// text otherwise.
    pub fn queue_message(&mut self, payload: &[u8]) {
        let mask = self.next_mask();
        let op = match self.dialect {
            Dialect::Centrifuge(f) if f.binary() => OpCode::Binary,
            _ => OpCode::Text,
        };
        write_frame(&mut self.wbuf, op, true, payload, Some(mask));
    }

    /// Bytes queued and not yet flushed.
    pub fn queued(&self) -> usize {
        self.wbuf.len()
    }

    /// Writes every queued frame in one `write_all`.
    ///
    /// # Errors
    /// The socket write failed.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Sends a close frame without waiting (best effort) and drops the socket.
    pub fn close(mut self) {
        let mask = self.next_mask();
        self.wbuf.clear();
        write_frame(
            &mut self.wbuf,
            OpCode::Close,
            true,
            &CLOSE_NORMAL.to_be_bytes(),
            Some(mask),
        );
        let _ = self.stream.try_write(&self.wbuf);
    }

    /// Hands the connection over to blocking I/O: a writer for the calling thread and a
    /// reader for another. Publishers use this so they can pace themselves with precise thread
    /// sleeps (tokio's timer rounds up to whole milliseconds, which would show as latency).
    /// Must be called inside the runtime that opened the connection.
    ///
    /// # Errors
    /// The socket cannot be converted or cloned.
    pub fn into_blocking(self) -> io::Result<(BlockingWriter, BlockingReader)> {
        let stream = self.stream.into_std()?;
        stream.set_nonblocking(false)?;
        // A server that stops reading must not hang a publisher (and so the run) forever.
        stream.set_write_timeout(Some(BLOCKING_WRITE_TIMEOUT))?;
        let reader = BlockingReader {
            stream: stream.try_clone()?,
            rbuf: {
                let mut b = self.rbuf;
                b.truncate(self.filled);
                b
            },
            decoder: self.decoder,
        };
        let writer = BlockingWriter {
            stream,
            wbuf: self.wbuf,
            mask_state: self.mask_state,
        };
        Ok((writer, reader))
    }

    /// Reads once into the free part of the buffer, growing it when a message does not fit.
    async fn read_more(&mut self) -> Result<(), ConnError> {
        if self.filled == self.rbuf.len() {
            if self.rbuf.len() >= MESSAGE_MAX + 64 {
                return Err(ConnError::Protocol("message too large".into()));
            }
            self.rbuf.resize(self.rbuf.len() * 2, 0);
        }
        let n = self.stream.read(&mut self.rbuf[self.filled..]).await?;
        if n == 0 {
            self.closed = Some(None);
            return Err(ConnError::Closed(None));
        }
        self.filled += n;
        Ok(())
    }

    /// Decodes the whole frames buffered so far (see the module docs for what is answered
    /// automatically) and keeps the partial tail.
    fn decode(
        &mut self,
        on_message: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), ConnError> {
        let Conn {
            dialect,
            rbuf,
            filled,
            decoder,
            wbuf,
            inflated,
            mask_state,
            pings_answered,
            closed,
            ..
        } = self;
        let mut failure = None;
        let consumed = decoder
            .decode(&mut rbuf[..*filled], MESSAGE_MAX, |msg| {
                if let Dialect::Centrifuge(format) = *dialect {
                    let data: &[u8] = match msg {
                        Message::Text(t) => t.as_bytes(),
                        Message::Binary(b) => b,
                        Message::Ping(p) => {
                            write_frame(wbuf, OpCode::Pong, true, p, Some(next_mask(mask_state)));
                            return ControlFlow::Continue(());
                        }
                        Message::Pong(_) => return ControlFlow::Continue(()),
                        Message::Close(frame) => {
                            *closed = Some(frame.map(|f| f.code));
                            return ControlFlow::Break(());
                        }
                    };
                    let op = if format.binary() {
                        OpCode::Binary
                    } else {
                        OpCode::Text
                    };
                    // Every item of the message is handed out, even after a break: the
                    // decoder has consumed the whole frame.
                    let mut flow = ControlFlow::Continue(());
                    let split = format.for_each(data, |item| {
                        match item {
                            Item::Ping => {
                                let mask = Some(next_mask(mask_state));
                                write_frame(wbuf, op, true, format.pong(), mask);
                                *pings_answered += 1;
                            }
                            Item::Message(m) => {
                                if on_message(m).is_break() {
                                    flow = ControlFlow::Break(());
                                }
                            }
                        }
                        ControlFlow::Continue(())
                    });
                    if let Err(e) = split {
                        failure = Some(ConnError::Protocol(e));
                        return ControlFlow::Break(());
                    }
                    return flow;
                }
                let json: &[u8] = match msg {
                    Message::Text(t) => t.as_bytes(),
                    Message::Binary(b) => match b.strip_prefix(b"C:") {
                        Some(z) => match inflate(z, inflated) {
                            Ok(()) => inflated,
                            Err(e) => {
                                failure = Some(e);
                                return ControlFlow::Break(());
                            }
                        },
                        None => b,
                    },
                    Message::Ping(p) => {
                        write_frame(wbuf, OpCode::Pong, true, p, Some(next_mask(mask_state)));
                        return ControlFlow::Continue(());
                    }
                    Message::Pong(_) => return ControlFlow::Continue(()),
                    Message::Close(frame) => {
                        *closed = Some(frame.map(|f| f.code));
                        return ControlFlow::Break(());
                    }
                };
                if is_server_ping(json) {
                    let mut pong = Vec::with_capacity(128);
                    wire::pong_for(json, &mut pong);
                    write_frame(wbuf, OpCode::Text, true, &pong, Some(next_mask(mask_state)));
                    *pings_answered += 1;
                    return ControlFlow::Continue(());
                }
                on_message(json)
            })
            .map_err(|e| ConnError::Protocol(e.to_string()))?;
        rbuf.copy_within(consumed..*filled, 0);
        *filled -= consumed;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        next_mask(&mut self.mask_state)
    }
}

/// Why the replies a Centrifuge connection waited for did not all come.
enum ReplyFailure {
    Conn(ConnError),
    /// One of them was an error reply with this code.
    Error(u32),
}

/// The sending half of a connection in blocking mode.
pub struct BlockingWriter {
    stream: std::net::TcpStream,
    wbuf: Vec<u8>,
    mask_state: u32,
}

impl BlockingWriter {
    /// Queues a masked text frame; nothing is written until [`BlockingWriter::flush`].
    pub fn queue_text(&mut self, payload: &[u8]) {
        let mask = next_mask(&mut self.mask_state);
        write_frame(&mut self.wbuf, OpCode::Text, true, payload, Some(mask));
    }

    /// Writes every queued frame (blocking until the kernel took them all).
    ///
    /// # Errors
    /// The socket write failed.
    pub fn flush(&mut self) -> io::Result<()> {
        use std::io::Write as _;
        self.stream.write_all(&self.wbuf)?;
        self.wbuf.clear();
        Ok(())
    }

    /// Sends a close frame and shuts the socket down.
    pub fn close(mut self) {
        let mask = next_mask(&mut self.mask_state);
        self.wbuf.clear();
        write_frame(
            &mut self.wbuf,
            OpCode::Close,
            true,
            &CLOSE_NORMAL.to_be_bytes(),
            Some(mask),
        );
        let _ = self.flush();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// The receiving half of a connection in blocking mode.
pub struct BlockingReader {
    stream: std::net::TcpStream,
    /// Undecoded bytes; starts with what the async connection had buffered.
    rbuf: Vec<u8>,
    decoder: Decoder,
}

impl BlockingReader {
    /// Reads and decodes until the connection ends, handing each message to `on_message`
    /// (server pings included: the writer belongs to another thread, so nothing is answered).
    /// Returns why it ended.
    pub fn run(mut self, mut on_message: impl FnMut(&[u8])) -> ConnError {
        let mut filled = self.rbuf.len();
        self.rbuf.resize(filled.max(4096), 0);
        let mut inflated = Vec::new();
        loop {
            let mut closed = None;
            let mut failure = None;
            let consumed = self
                .decoder
                .decode(&mut self.rbuf[..filled], MESSAGE_MAX, |msg| {
                    match msg {
                        Message::Text(t) => on_message(t.as_bytes()),
                        Message::Binary(b) => match b.strip_prefix(b"C:") {
                            Some(z) => match inflate(z, &mut inflated) {
                                Ok(()) => on_message(&inflated),
                                Err(e) => failure = Some(e),
                            },
                            None => on_message(b),
                        },
                        Message::Close(f) => closed = Some(f.map(|f| f.code)),
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                    if closed.is_some() || failure.is_some() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                });
            let consumed = match consumed {
                Ok(n) => n,
                Err(e) => return ConnError::Protocol(e.to_string()),
            };
            if let Some(e) = failure {
                return e;
            }
            if let Some(code) = closed {
                return ConnError::Closed(code);
            }
            self.rbuf.copy_within(consumed..filled, 0);
            filled -= consumed;
            if filled == self.rbuf.len() {
                if filled >= MESSAGE_MAX + 64 {
                    return ConnError::Protocol("message too large".into());
                }
                self.rbuf.resize(filled * 2, 0);
            }
            match std::io::Read::read(&mut self.stream, &mut self.rbuf[filled..]) {
                Ok(0) => return ConnError::Closed(None),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return ConnError::Io(e),
            }
        }
    }
}

/// xorshift32: masks only need to be unpredictable to intermediaries, not cryptographically.
fn next_mask(state: &mut u32) -> [u8; 4] {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *state = x;
    x.to_ne_bytes()
}

fn inflate(z: &[u8], out: &mut Vec<u8>) -> Result<(), ConnError> {
    out.clear();
    flate2::read::ZlibDecoder::new(z)
        .take(INFLATE_MAX)
        .read_to_end(out)
        .map(drop)
        .map_err(|e| ConnError::Protocol(format!("bad C: message: {e}")))
}

/// Whether a server message has type `t`.
pub fn is_type(json: &[u8], t: &[u8]) -> bool {
    wire::msg_type(json) == Some(t)
}

/// The server's keep-alive ping: `"t":"ping"` within the first characters (protocol.md §4;
/// lowercase, unlike the `PONG` answer to our own pings).
fn is_server_ping(json: &[u8]) -> bool {
    wire::msg_type(&json[..json.len().min(48)]) == Some(b"ping")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let t = Target::parse("ws://127.0.0.1:5007/wse?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:5007".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:5007");
        assert_eq!(t.path, "/wse?x=1");
        let t = Target::parse("ws://127.0.0.1:9").unwrap();
        assert_eq!(t.path, "/");
        assert!(Target::parse("wss://127.0.0.1:5007/wse").is_err());
    }

    #[test]
    fn server_pings_are_recognised() {
        assert!(is_server_ping(
            br#"{"c":"WSE","t":"ping","p":{"server_time":"x"}}"#
        ));
        assert!(!is_server_ping(br#"{"c":"WSE","t":"PONG","p":{}}"#));
        assert!(!is_server_ping(br#"{"t":"bench","p":{"t":"ping"}}"#));
    }
}
