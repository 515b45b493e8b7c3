//! A deterministic engine harness: several shards and their fabric driven in one thread, with
//! fake sockets and a virtual clock. No io_uring, no threads, no sleeps.
//!
//! It plays the part of `runtime.rs` (the only I/O code): it accepts fake sockets, feeds the
//! shards what clients write, and runs loop turns — `handle_fabric`, `handle_timers`, `flush` —
//! round-robin over the shards until nothing moves ([`Engine::settle`]). Time only moves when a
//! test says so ([`Engine::advance`]), and then deadline by deadline, so a 25 s ping interval
//! costs microseconds. Both clocks are virtual: `wall_ms` starts at a fixed instant, so the
//! timestamps in frames are the same on every run.
//!
//! A client is a fake socket plus a client-role frame decoder: every byte a shard writes lands
//! in its socket's buffer, and the test reads them back as whole frames ([`Engine::recv`]),
//! exactly as a peer would receive them. A socket can be given a capacity and a client told to
//! stop reading, which is how a slow consumer fills up (`write` answers `WouldBlock`).
//!
//! Peer-side behaviour a real client has, reproduced here: it answers a close frame with one of
//! its own, and closes its socket once the server has shut down its side (the shard then sees
//! EOF and releases the slot, as the runtime's read task does).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::net::Shutdown;
use std::ops::ControlFlow;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use wse_shards::admission::Admission;
use wse_shards::codec::{Decoder, Message, OpCode, Role, write_frame};
use wse_shards::config::Config;
use wse_shards::conn::ConnKey;
use wse_shards::fabric::{self, Endpoint, FabricMsg, Sent};
use wse_shards::metrics::ShardMetrics;
use wse_shards::protocol::Clock;
use wse_shards::shard::{Shard, Shared, Transport};
use wse_shards::topics::owner_of;

/// The HS256 secret of [`config`]; [`token`] signs with it.
pub const SECRET: &str = "wse-harness-secret-0123456789abcdef0123";
/// Where the virtual wall clock starts: 2027-01-15T08:00:00.000Z.
pub const WALL_START_MS: u64 = 1_800_000_000_000;
/// Loop turns [`Engine::settle`] allows before it calls the engine livelocked.
const SETTLE_TURNS_MAX: usize = 10_000;
/// Fabric participants besides the shards, as `Server::start` builds the grid.
const EXTRA_PARTICIPANTS: usize = 2;

/// The configuration the tests start from: JWT auth (so users have names), anyone may publish
/// anywhere, default limits otherwise.
pub fn config(shards: usize) -> Config {
    let mut cfg = Config::default();
    cfg.server.cores = shards;
    cfg.server.drain_timeout = Duration::from_secs(2);
    cfg.control.enabled = false;
    cfg.auth.enabled = true;
    cfg.auth.secret = Some(SECRET.into());
    cfg.auth.default_publish = vec!["*".into()];
    cfg
}

/// A token for `user`, valid for an hour of real time (the verifier reads the system clock).
pub fn token(user: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": user, "iat": now, "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A topic name with prefix `prefix` that shard `owner` owns (of `shards`).
pub fn topic_owned_by(prefix: &str, owner: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|t| owner_of(t, shards) == owner)
        .unwrap()
}

// ------------------------------------------------------------------------------------------------
// Fake sockets
// ------------------------------------------------------------------------------------------------

/// The kernel side of one connection, as both ends see it.
#[derive(Debug, Default)]
struct SocketState {
    /// Bytes the shard wrote that the client has not read yet.
    unread: Vec<u8>,
    /// Most bytes `unread` may hold; `None` = unbounded. At the cap, writes get `WouldBlock`.
    capacity: Option<usize>,
    /// The shard shut down its write side (after its close frame) or both sides.
    write_shut: bool,
    both_shut: bool,
    /// Every byte the shard ever wrote, for tests that compare the whole stream.
    written_total: usize,
}

/// A fake socket: shared between the shard (which writes) and the client (which reads).
#[derive(Clone, Debug, Default)]
pub struct FakeSocket(Rc<RefCell<SocketState>>);

impl Transport for FakeSocket {
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut s = self.0.borrow_mut();
        if s.write_shut || s.both_shut {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let room = s
            .capacity
            .map_or(usize::MAX, |c| c.saturating_sub(s.unread.len()));
        if total > 0 && room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut left = room.min(total);
        let n = left;
        for b in bufs {
            let take = b.len().min(left);
            s.unread.extend_from_slice(&b[..take]);
            left -= take;
        }
        s.written_total += n;
        Ok(n)
    }

    fn shutdown(&self, how: Shutdown) {
        let mut s = self.0.borrow_mut();
        match how {
            Shutdown::Write => s.write_shut = true,
            Shutdown::Read | Shutdown::Both => s.both_shut = true,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Frames as a client receives them
// ------------------------------------------------------------------------------------------------

/// One frame a client received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// (code, reason); `None` for an empty close frame.
    Close(Option<(u16, String)>),
}

impl Frame {
    /// The frame's JSON: a text frame, or a `C:` zlib binary frame inflated.
    ///
    /// # Panics
    /// Not a JSON message.
    pub fn json(&self) -> Value {
        match self {
            Frame::Text(t) => serde_json::from_str(t).unwrap_or_else(|e| panic!("{e}: {t}")),
            Frame::Binary(b) if b.starts_with(b"C:") => {
                let mut text = String::new();
                flate2::read::ZlibDecoder::new(&b[2..])
                    .read_to_string(&mut text)
                    .unwrap();
                serde_json::from_str(&text).unwrap()
            }
            other => panic!("not a JSON message: {other:?}"),
        }
    }

    /// The message type (`t`) of a JSON frame; `None` for anything else.
    pub fn t(&self) -> Option<String> {
        match self {
            Frame::Text(_) | Frame::Binary(_) => self.json()["t"]
                .as_str()
                .map(std::borrow::ToOwned::to_owned),
            _ => None,
        }
    }

    /// The text of a text frame.
    ///
    /// # Panics
    /// Not a text frame.
    pub fn text(&self) -> &str {
        match self {
            Frame::Text(t) => t,
            other => panic!("not a text frame: {other:?}"),
        }
    }
}

/// A client handle: an index into the engine's clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Client(usize);

struct ClientState {
    shard: usize,
    key: ConnKey,
    sock: FakeSocket,
    decoder: Decoder,
    /// Bytes read but not yet a whole frame (or, before the upgrade, the HTTP response).
    partial: Vec<u8>,
    upgraded: bool,
    /// The HTTP response to the upgrade, once it arrived.
    response: Option<String>,
    /// Frames received and not yet taken by the test.
    inbox: VecDeque<Frame>,
    /// Reads whatever arrives during [`Engine::settle`]; a stalled client does not.
    reading: bool,
    /// The close code of the server's close frame, once one arrived.
    close_received: Option<u16>,
    /// The client sent its close frame (it answers the server's with one, as a peer should).
    close_sent: bool,
    /// The shard released the slot (the connection is over on the server side).
    released: bool,
}

// ------------------------------------------------------------------------------------------------
// The engine
// ------------------------------------------------------------------------------------------------

/// N shards, their fabric and their clients, in one thread on a virtual clock.
pub struct Engine {
    shards: Vec<Shard<FakeSocket>>,
    /// Per shard: keys whose socket answered `WouldBlock` (the runtime's `wait_writable` tasks).
    blocked: Vec<Vec<ConnKey>>,
    /// The control plane's end of the fabric, unused.
    control: Endpoint,
    /// The cluster core's end: tests play the core ([`Engine::cluster_receive`],
    /// [`Engine::cluster_send`]).
    cluster: Endpoint,
    shared: Arc<Shared>,
    clock: Clock,
    clients: Vec<ClientState>,
}

impl Engine {
    /// `cfg.server.cores` shards, built as `Server::start` builds them.
    pub fn new(cfg: Config) -> Engine {
        cfg.validate().expect("valid configuration");
        // Rate limits count on `Clock::mono_ms`, whose origin is the first clock it sees in the
        // process: fix it before any virtual clock starts, so none starts before it.
        let _ = Clock::read().mono_ms();
        let clock = Clock {
            now: Instant::now(),
            wall_ms: WALL_START_MS,
        };
        let shards = cfg.shard_count();
        let auth = cfg.auth.enabled.then(|| {
            Arc::new(wse_shards::auth::Authenticator::new(&cfg.auth).expect("auth configuration"))
        });
        let plan = cfg.fabric_plan().expect("the fabric fits its budget");
        assert_eq!(plan.participants, shards + EXTRA_PARTICIPANTS);
        let mut endpoints = fabric::grid(plan.participants, plan.capacity, plan.inflight_max);
        let cluster = endpoints.pop().unwrap();
        let control = endpoints.pop().unwrap();
        let metrics: Vec<Arc<ShardMetrics>> = (0..shards).map(|_| Arc::default()).collect();
        let shared = Arc::new(Shared {
            admission: Admission::new(cfg.server.max_connections),
            cfg: Arc::new(cfg),
            auth,
            shutdown: Default::default(),
            app_rpc: Default::default(),
            shards,
            metrics: metrics.clone(),
        });
        let shards: Vec<_> = endpoints
            .into_iter()
            .enumerate()
            .map(|(id, ep)| {
                // The doorbells stay unregistered: nobody parks here, every shard gets a turn.
                Shard::new(id, shared.clone(), ep, metrics[id].clone(), clock.now)
            })
            .collect();
        Engine {
            blocked: vec![Vec::new(); shards.len()],
            shards,
            control,
            cluster,
            shared,
            clock,
            clients: Vec::new(),
        }
    }

    /// What the shards sent the cluster core since the last call: (shard, entry).
    pub fn cluster_receive(&mut self) -> Vec<(usize, FabricMsg)> {
        let mut got = Vec::new();
        self.cluster
            .receive(usize::MAX, |from, m| got.push((from, m)));
        got
    }

    /// Sends `m` from the cluster core to shard `to` (flushed at once).
    pub fn cluster_send(&mut self, to: usize, m: FabricMsg) {
        assert_eq!(self.cluster.send(to, m), Sent::Queued);
        self.cluster.flush();
    }

    /// The virtual clock.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Shard `i`'s metrics.
    pub fn metrics(&self, i: usize) -> &ShardMetrics {
        &self.shared.metrics[i]
    }

    /// Shard `i`, for assertions on its state.
    pub fn shard(&self, i: usize) -> &Shard<FakeSocket> {
        &self.shards[i]
    }

    // --------------------------------------------------------------------------------------------
    // Connections
    // --------------------------------------------------------------------------------------------

    /// A socket accepted on `shard` that has sent nothing yet.
    ///
    /// # Panics
    /// The shard refused it (too many handshakes, draining).
    pub fn accept(&mut self, shard: usize) -> Client {
        let sock = FakeSocket::default();
        let key = self.shards[shard]
            .accept(sock.clone(), self.clock)
            .expect("accepted");
        self.clients.push(ClientState {
            shard,
            key,
            sock,
            decoder: Decoder::new(Role::Client),
            partial: Vec::new(),
            upgraded: false,
            response: None,
            inbox: VecDeque::new(),
            reading: true,
            close_received: None,
            close_sent: false,
            released: false,
        });
        Client(self.clients.len() - 1)
    }

    /// A connection on `shard` for `user`: upgraded and settled, its `server_ready` waiting in
    /// its inbox.
    pub fn connect(&mut self, shard: usize, user: &str) -> Client {
        let c = self.connect_unsettled(shard, user);
        self.settle();
        assert!(self.clients[c.0].upgraded, "the upgrade was not answered");
        c
    }

    /// A connection on `shard` for `user` whose upgrade request was sent (and handled: the
    /// session is live) but whose answer waits for the shard's next flush.
    pub fn connect_unsettled(&mut self, shard: usize, user: &str) -> Client {
        let c = self.accept(shard);
        let request = upgrade_request(&format!("/wse?token={}", token(user)));
        self.send_raw(c, request.as_bytes());
        c
    }

    /// The HTTP response to the client's upgrade request (head only), once it arrived.
    pub fn upgrade_response(&self, c: Client) -> Option<&str> {
        self.clients[c.0].response.as_deref()
    }

    /// Bytes from the client, as one read.
    pub fn send_raw(&mut self, c: Client, bytes: &[u8]) {
        let st = &self.clients[c.0];
        assert!(!st.released, "sending on a released connection");
        let mut data = bytes.to_vec();
        self.shards[st.shard].handle_bytes(st.key, &mut data, self.clock);
    }

    /// One masked frame from the client.
    pub fn send_frame(&mut self, c: Client, op: OpCode, payload: &[u8]) {
        let mut out = Vec::new();
        let mask = [0x5a, (c.0 & 0xff) as u8, 0xc3, 0x11];
        write_frame(&mut out, op, true, payload, Some(mask));
        self.send_raw(c, &out);
    }

    /// A text message from the client.
    pub fn send(&mut self, c: Client, text: &str) {
        self.send_frame(c, OpCode::Text, text.as_bytes());
    }

    /// A JSON message from the client.
    pub fn send_json(&mut self, c: Client, v: &Value) {
        self.send(c, &v.to_string());
    }

    /// The client's TCP connection ends (FIN or reset): the shard sees EOF and releases the slot,
    /// as the runtime's read task does.
    pub fn disconnect(&mut self, c: Client) {
        let st = &mut self.clients[c.0];
        if st.released {
            return;
        }
        st.released = true;
        let shard = &mut self.shards[st.shard];
        shard.handle_eof(st.key, self.clock);
        shard.release(st.key, self.clock);
    }

    /// Whether the shard has let the connection go.
    pub fn is_released(&self, c: Client) -> bool {
        self.clients[c.0].released
    }

    /// The client stops reading (`false`) or resumes (`true`).
    pub fn set_reading(&mut self, c: Client, reading: bool) {
        self.clients[c.0].reading = reading;
    }

    /// The most unread bytes the client's socket holds before writes block.
    pub fn set_socket_capacity(&mut self, c: Client, bytes: usize) {
        self.clients[c.0].sock.0.borrow_mut().capacity = Some(bytes);
    }

    /// Bytes written to the client's socket and not read yet.
    pub fn unread_bytes(&self, c: Client) -> usize {
        self.clients[c.0].sock.0.borrow().unread.len()
    }

    /// Reads what the socket holds and returns every frame received since the last call.
    pub fn recv(&mut self, c: Client) -> Vec<Frame> {
        self.read_socket(c.0);
        self.clients[c.0].inbox.drain(..).collect()
    }

    /// [`Engine::recv`], as JSON (every frame must be a JSON message).
    pub fn recv_json(&mut self, c: Client) -> Vec<Value> {
        self.recv(c).iter().map(Frame::json).collect()
    }

    // --------------------------------------------------------------------------------------------
    // Running
    // --------------------------------------------------------------------------------------------

    /// One loop turn of shard `s`, as `runtime::drive` runs it: fabric, timers, flush.
    pub fn turn(&mut self, s: usize) {
        let clock = self.clock;
        let shard = &mut self.shards[s];
        if self.shared.shutdown.load(Ordering::Acquire) && !shard.is_draining() {
            shard.begin_drain(clock);
        }
        shard.handle_fabric(clock);
        shard.handle_timers(clock);
        shard.flush(&mut self.blocked[s], clock);
        debug_assert!(self.blocked[s].iter().all(|k| {
            let n = self.blocked[s].iter().filter(|x| *x == k).count();
            n == 1
        }));
    }

    /// Runs turns round-robin over every shard, with the clients reading as they go, until
    /// nothing moves: no fabric entry waiting, no byte written, no connection released.
    ///
    /// # Panics
    /// Still moving after [`SETTLE_TURNS_MAX`] rounds (a livelock).
    pub fn settle(&mut self) {
        for _ in 0..SETTLE_TURNS_MAX {
            let before = self.activity();
            for s in 0..self.shards.len() {
                self.turn(s);
            }
            let peers = self.run_peers();
            let fabric = self.shards.iter().any(Shard::has_fabric_work);
            if !peers && !fabric && self.activity() == before {
                return;
            }
        }
        panic!("the engine did not settle in {SETTLE_TURNS_MAX} rounds");
    }

    /// Moves the clock on by `d`, stopping at every deadline on the way (each a loop turn at
    /// exactly that time), then settles.
    pub fn advance(&mut self, d: Duration) {
        let until = self.clock.now + d;
        self.settle();
        loop {
            let next = self
                .shards
                .iter()
                .filter_map(Shard::next_deadline)
                .min()
                .filter(|&t| t <= until);
            let Some(next) = next else { break };
            // The wheel's deadlines are tick-aligned and may lie at or before `now` when an
            // entry was parked; move at least a millisecond so time always advances.
            let step = next
                .saturating_duration_since(self.clock.now)
                .max(Duration::from_millis(1));
            if self.clock.now + step > until {
                break;
            }
            self.set_time(self.clock.now + step);
            self.settle();
        }
        self.set_time(until);
        self.settle();
    }

    /// Runs `command` on shard `to` as the control plane sends it, then settles; returns its
    /// answer.
    pub fn command<T>(
        &mut self,
        to: usize,
        make: impl FnOnce(wse_shards::reply::Responder<T>) -> wse_shards::command::Command,
    ) -> T {
        let (reply, answer) = wse_shards::reply::Responder::pair();
        let m = FabricMsg::Command(Box::new(make(reply)));
        assert_eq!(self.control.send(to, m), Sent::Queued);
        self.control.flush();
        self.settle();
        wse_shards::block_on(answer).expect("the shard answered")
    }

    /// Says whether an application answers Centrifuge `rpc`s (`Server::set_rpc_handler`).
    pub fn set_rpc_handler(&mut self, present: bool) {
        self.shared.app_rpc.store(present, Ordering::Relaxed);
    }

    /// Asks every shard to drain (what `Server::shutdown` does), then settles.
    pub fn shutdown(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.settle();
    }

    fn set_time(&mut self, now: Instant) {
        let moved = now.saturating_duration_since(self.clock.now);
        self.clock.now = now;
        self.clock.wall_ms += moved.as_millis() as u64;
    }

    /// A fingerprint of everything that moves: bytes written and slots released.
    fn activity(&self) -> (usize, usize) {
        let written = self
            .clients
            .iter()
            .map(|c| c.sock.0.borrow().written_total)
            .sum();
        let released = self.clients.iter().filter(|c| c.released).count();
        (written, released)
    }

    /// What the peers and the I/O layer do between turns. `true` when anything happened.
    fn run_peers(&mut self) -> bool {
        let mut moved = false;
        for i in 0..self.clients.len() {
            if self.clients[i].released {
                continue;
            }
            if self.clients[i].reading {
                moved |= self.read_socket(i);
            }
            let st = &mut self.clients[i];
            let (write_shut, both_shut, drained) = {
                let s = st.sock.0.borrow();
                (s.write_shut, s.both_shut, s.unread.is_empty())
            };
            if st.close_sent_pending() {
                st.close_sent = true;
                let mut echo = Vec::new();
                let code = st.close_received.unwrap_or(1000);
                write_frame(
                    &mut echo,
                    OpCode::Close,
                    true,
                    &code.to_be_bytes(),
                    Some([1, 2, 3, 4]),
                );
                self.shards[st.shard].handle_bytes(st.key, &mut echo, self.clock);
                moved = true;
            }
            let st = &self.clients[i];
            // The runtime's read task ends at EOF (the peer closed after reading our FIN) or
            // when the shard shut the socket down; either way it releases the slot.
            if both_shut || (write_shut && drained && st.reading) {
                self.disconnect(Client(i));
                moved = true;
            }
        }
        moved
    }

    /// The client reads everything its socket holds; frees room for a blocked writer.
    fn read_socket(&mut self, i: usize) -> bool {
        let st = &mut self.clients[i];
        let bytes = std::mem::take(&mut st.sock.0.borrow_mut().unread);
        if bytes.is_empty() {
            return false;
        }
        st.partial.extend_from_slice(&bytes);
        st.parse();
        // The socket drained: the runtime's `wait_writable` task fires.
        let shard = st.shard;
        let key = st.key;
        if let Some(pos) = self.blocked[shard].iter().position(|&k| k == key) {
            self.blocked[shard].swap_remove(pos);
            self.shards[shard].handle_writable(key);
        }
        true
    }
}

impl ClientState {
    /// A close frame arrived and was not answered yet.
    fn close_sent_pending(&self) -> bool {
        !self.close_sent && self.close_received.is_some()
    }

    /// Turns `partial` into frames.
    fn parse(&mut self) {
        if !self.upgraded {
            let Some(end) = self.partial.windows(4).position(|w| w == b"\r\n\r\n") else {
                return;
            };
            let head = String::from_utf8_lossy(&self.partial[..end]).into_owned();
            assert!(
                head.starts_with("HTTP/1.1 101"),
                "the upgrade was refused: {head}"
            );
            self.partial.drain(..end + 4);
            self.response = Some(head);
            self.upgraded = true;
        }
        let mut buf = std::mem::take(&mut self.partial);
        let inbox = &mut self.inbox;
        let close_received = &mut self.close_received;
        let consumed = self
            .decoder
            .decode(&mut buf, usize::MAX >> 1, |m| {
                inbox.push_back(match m {
                    Message::Text(t) => Frame::Text(t.to_owned()),
                    Message::Binary(b) => Frame::Binary(b.to_vec()),
                    Message::Ping(p) => Frame::Ping(p.to_vec()),
                    Message::Pong(p) => Frame::Pong(p.to_vec()),
                    Message::Close(c) => {
                        *close_received = Some(c.map_or(1000, |c| c.code));
                        Frame::Close(c.map(|c| (c.code, c.reason.to_owned())))
                    }
                });
                ControlFlow::Continue(())
            })
            .expect("the server sent a valid frame");
        buf.drain(..consumed);
        self.partial = buf;
    }
}

/// An RFC 6455 upgrade request for `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: harness\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}
