//! The cluster core (docs/CLUSTER.md): a thread of its own that owns the cluster listener and
//! the dials to seeds and members, and drives the sans-IO `wse_cluster::node::Node` with real
//! sockets and a real clock. It is a participant of the shards' fabric: topic owners tell it
//! when this node's interest in a topic starts and ends and hand it each publication made here
//! (one entry, whatever the number of peers); it hands them the publications of other nodes
//! and the confirmations of interest. The control plane reads a snapshot of the membership
//! (`GET /api/v1/cluster`).
//!
//! Why a current-thread tokio runtime: the node is one synchronous state machine that must not
//! be shared, so everything that touches it runs on one thread. The runtime gives that thread
//! non-blocking sockets, resolution on each dial (`TcpStream::connect("host:port")`) and timers
//! without a poller of our own, and the binary already builds on tokio for the control plane.
//! Each socket gets a reader task and a writer task that only move bytes; they talk to the
//! loop over one bounded channel, so a peer that floods us is slowed by TCP, not buffered.
//! With `security = tls` a socket's task first runs the TLS handshake (`tls`), hands the node
//! what the peer's certificate is valid for, then moves the decrypted bytes the same way.
//! (compio, as the shards use, would need the same tasks; whether io_uring's batching pays on
//! the data path is a question for measurements.)

mod tls;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use wse_cluster::handshake::{CertifiedNames, Security};
use wse_cluster::node::{self, Action, ConnId, Event, Node};
use wse_cluster::wire::MemberState;
use wse_shards::config::{ClusterCompression, ClusterConfig, ClusterSecurity};
use wse_shards::fabric::{Endpoint, FabricMsg, Sent};
use wse_shards::topics::owner_of;

/// Name sent in HELLO; nodes of another cluster name are refused (one name until it is
/// configurable).
const CLUSTER_NAME: &str = "wse";
/// What must agree cluster-wide beyond the key, hashed into HELLO. Nothing is configurable
/// that must agree yet; a setting that must will be folded in here.
const FINGERPRINT: u64 = 0;
/// How often the node's timers run (pings, deadlines, probes, dials), in real time. The
/// shortest timer it serves is `cluster.ping_interval` (≥ 10 ms by validation); 20 ms keeps the
/// failure-detection figures within a few percent while idle wake-ups stay at 50/s.
const TICK: Duration = Duration::from_millis(20);
/// Events queued from the socket tasks to the loop; a full queue makes readers wait (TCP then
/// slows the peer), so memory stays bounded whatever peers send.
const EVENT_QUEUE: usize = 1024;
/// Bytes one read takes from a socket.
const READ_CHUNK: usize = 64 * 1024;
/// A dial (resolution and connect) is abandoned after this long and reported failed; the
/// node's circuit breaker schedules the next one.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// At stop, time allowed for the GOODBYE(LEFT) records to be written before the thread exits.
const LEAVE_GRACE: Duration = Duration::from_millis(500);
/// Events handled per loop turn before the node flushes, so a burst cannot delay flushing.
const EVENTS_PER_TURN: usize = 256;
/// Failed handshakes logged per second at most; the rest are counted and the count is given
/// with the next line logged, so a peer (or anyone who can reach the cluster port) that fails
/// on purpose cannot flood the log.
const HANDSHAKE_LOGS_PER_SEC: u32 = 10;
/// Fabric entries taken from one shard per loop turn (interest changes and publications to
/// send), so one busy shard cannot starve the others or the sockets within a turn.
const FABRIC_PER_SOURCE: usize = 1024;

/// What the socket tasks tell the loop.
enum SockEvent {
    Accepted(TcpStream, SocketAddr),
    Connected(ConnId),
    /// With `tls`: the TLS handshake of the connection succeeded; what the peer's verified
    /// certificate is valid for. Sent before its first input.
    Certified(ConnId, CertifiedNames),
    /// With `tls`: the TLS handshake failed (or outlasted `cluster.handshake_timeout`).
    TlsFailed(ConnId, String),
    DialFailed(ConnId),
    Input(ConnId, Vec<u8>),
    Transmitted(ConnId, usize),
    Closed(ConnId),
}

/// What the loop tells a connection's writer.
enum WriteCmd {
    Bytes(Vec<u8>),
    /// Write what came before, then shut the socket down.
    Close,
}

/// What the cluster core last showed the control plane: replaced whole by the core, read by
/// the API and `/metrics`.
#[derive(Clone, Default)]
pub struct ClusterView(Arc<Mutex<Shown>>);

#[derive(Default)]
struct Shown {
    body: Value,
    metrics: Arc<ClusterMetrics>,
    dlq: Arc<Value>,
}

impl ClusterView {
    /// `GET /api/v1/cluster`'s body.
    pub fn snapshot(&self) -> Value {
        self.0.lock().map(|v| v.body.clone()).unwrap_or(Value::Null)
    }
    /// The figures of the `wse_cluster_*` metrics.
    pub fn metrics(&self) -> Arc<ClusterMetrics> {
        self.0.lock().map(|v| v.metrics.clone()).unwrap_or_default()
    }
    /// `GET /api/v1/cluster/dlq`'s body.
    pub fn dlq(&self) -> Arc<Value> {
        self.0.lock().map(|v| v.dlq.clone()).unwrap_or_default()
    }
    fn set(&self, body: Value, metrics: ClusterMetrics) {
        if let Ok(mut g) = self.0.lock() {
            g.body = body;
            g.metrics = Arc::new(metrics);
        }
    }
    fn set_dlq(&self, dlq: Value) {
        if let Ok(mut g) = self.0.lock() {
            g.dlq = Arc::new(dlq);
        }
    }
}

/// Member states in the order of [`ClusterMetrics::members`] (and their label values).
pub const MEMBER_STATES: [MemberState; 5] = [
    MemberState::Alive,
    MemberState::Suspect,
    MemberState::Leaving,
    MemberState::Dead,
    MemberState::Left,
];

/// The cluster core's figures for `/metrics` (`wse_cluster_*`, docs/OPERATIONS.md), taken
/// with each snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterMetrics {
    /// Members known (this node excluded), per state in [`MEMBER_STATES`] order.
    pub members: [u64; 5],
    /// Members with a link up.
    pub links_up: u64,
    /// One per known member: at most `cluster.max_members`, which bounds the `peer` label.
    pub peers: Vec<PeerMetrics>,
    /// Publications made here handed to the node (one per publication, whatever the peers).
    pub publications_sent: u64,
    /// Publications from peers handed to the shards.
    pub publications_received: u64,
    /// Publications from peers the shards' fabric refused.
    pub dropped_shards_busy: u64,
    /// Publications for a peer dropped over its queue cap (or hold buffer).
    pub dropped_peer_queue: u64,
    /// Publications dropped for being larger than a frame.
    pub dropped_too_large: u64,
    /// Data batch bytes before and after compression, every link.
    pub batch_bytes_raw: u64,
    /// See `batch_bytes_raw`.
    pub batch_bytes_wire: u64,
    /// Subscriptions acknowledged after the bounded wait instead of a confirmation.
    pub sub_ack_timeouts: u64,
    /// Fresh interest snapshots asked of a peer whose digest disagreed.
    pub resyncs: u64,
    /// Entries in the dead letter queue now.
    pub dlq_entries: u64,
}

/// One member's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerMetrics {
    /// Its name (the `peer` label).
    pub name: String,
    /// RTT of its link, when up and measured.
    pub rtt_us: Option<u64>,
    /// What crossed its sessions.
    pub traffic: node::Traffic,
}

/// The running cluster core.
pub struct ClusterCore {
    view: ClusterView,
    /// With `tls`: the certificates new links use, replaced on reload.
    tls: Option<Arc<Mutex<tls::Tls>>>,
    local_addr: SocketAddr,
    stop_tx: watch::Sender<bool>,
    drain: ClusterDrain,
    thread: JoinHandle<()>,
}

/// Starts the cluster core's lame duck (docs/CLUSTER.md, "Drain"): the node announces itself
/// Leaving and keeps its links and its clients' interest while the shards close their clients;
/// [`ClusterCore::stop`] then leaves.
#[derive(Clone)]
pub struct ClusterDrain(Arc<watch::Sender<bool>>);

impl ClusterDrain {
    /// Announces the drain (once; later calls do nothing).
    pub fn drain(&self) {
        self.0.send_if_modified(|d| !std::mem::replace(d, true));
    }
}

impl ClusterCore {
    /// Binds `cfg.listen` (here, so that an address in use fails at start) and starts the
    /// "wse-cluster" thread, which serves the cluster core's end of the fabric (`fabric`, of a
    /// server with `shards` shards). `cfg` is validated; with `tls` the CA, certificate and
    /// key are loaded here.
    ///
    /// # Errors
    /// The listener cannot bind, the runtime or the thread cannot start, or (with `tls`) a
    /// certificate or key file cannot be used (one line naming the key).
    pub fn start(cfg: &ClusterConfig, fabric: Endpoint, shards: usize) -> io::Result<Self> {
        let security = match cfg.security {
            ClusterSecurity::None => Security::None,
            ClusterSecurity::Psk => Security::Psk {
                current: cfg
                    .psk
                    .clone()
                    .ok_or_else(|| io::Error::other("cluster.psk is required"))?
                    .into_bytes(),
                previous: cfg.psk_previous.clone().map(String::into_bytes),
            },
            ClusterSecurity::Tls => Security::Tls,
        };
        let tls = match cfg.security {
            ClusterSecurity::Tls => Some(Arc::new(Mutex::new(
                tls::Tls::load(cfg).map_err(io::Error::other)?,
            ))),
            _ => None,
        };
        let transport = Transport {
            tls: tls.clone(),
            handshake_timeout: cfg.handshake_timeout,
        };
        let std_listener = std::net::TcpListener::bind(cfg.listen)?;
        std_listener.set_nonblocking(true)?;
        let local_addr = std_listener.local_addr()?;
        let name = if cfg.node_name.is_empty() {
            host_name()
        } else {
            cfg.node_name.clone()
        };
        let advertised = cfg
            .advertised
            .clone()
            .unwrap_or_else(|| local_addr.to_string());
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let timing = node::Timing {
            handshake_timeout: us(cfg.handshake_timeout),
            ping_interval: us(cfg.ping_interval),
            link_timeout: us(cfg.link_timeout),
            probe_timeout: us(cfg.probe_timeout),
            suspect_timeout: us(cfg.suspect_timeout),
            suspect_min: us(cfg.suspect_min),
            rejoin_interval: us(cfg.rejoin_interval),
            sub_ack_timeout: us(cfg.sub_ack_timeout),
            ..node::Timing::default()
        };
        let limits = node::Limits {
            batch_max: cfg.batch_max,
            peer_queue_bytes: cfg.peer_queue_bytes,
            hold_bytes: cfg.hold_bytes,
            dlq_entries: cfg.dlq_entries,
            max_members: cfg.max_members,
            ..node::Limits::default()
        };
        let node_cfg = node::Config {
            cluster: CLUSTER_NAME.to_owned(),
            name,
            advertised,
            seeds: cfg.seeds.clone(),
            security,
            fingerprint: FINGERPRINT,
            compression: match cfg.compression {
                ClusterCompression::Off => node::Compression::Off,
                ClusterCompression::On => node::Compression::On,
                ClusterCompression::Auto => node::Compression::Auto,
            },
            timing,
            limits,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        let view = ClusterView::default();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (drain_tx, drain_rx) = watch::channel(false);
        let core = cfg.core;
        let thread = {
            let view = view.clone();
            std::thread::Builder::new()
                .name("wse-cluster".to_owned())
                .spawn(move || {
                    if let Some(id) = core
                        && !core_affinity::set_for_current(core_affinity::CoreId { id })
                    {
                        tracing::warn!(core = id, "cannot pin the cluster core's thread");
                    }
                    let signals = Signals {
                        stop: stop_rx,
                        drain: drain_rx,
                    };
                    runtime.block_on(run(
                        node_cfg, transport, listener, view, signals, fabric, shards,
                    ));
                })?
        };
        Ok(Self {
            view,
            tls,
            local_addr,
            stop_tx,
            drain: ClusterDrain(Arc::new(drain_tx)),
            thread,
        })
    }

    /// With `tls`: reads the CA, certificate and key again from `cfg`'s paths (SIGHUP); links
    /// made from now on use them, established ones keep theirs. `Ok(false)` without `tls`.
    ///
    /// # Errors
    /// A file cannot be used (as at start); the running certificates stay.
    pub fn reload_certificates(&self, cfg: &ClusterConfig) -> Result<bool, String> {
        let Some(current) = &self.tls else {
            return Ok(false);
        };
        let fresh = tls::Tls::load(cfg)?;
        if let Ok(mut g) = current.lock() {
            *g = fresh;
        }
        Ok(true)
    }

    /// The membership, for the control plane.
    pub fn view(&self) -> ClusterView {
        self.view.clone()
    }

    /// What starts the lame duck, for whoever begins the server's drain.
    pub fn drainer(&self) -> ClusterDrain {
        self.drain.clone()
    }

    /// The cluster listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Leaves the cluster (peers mark this node Left and do not redial it) and joins the thread.
    pub fn stop(self) {
        let _ = self.stop_tx.send(true);
        let _ = self.thread.join();
    }
}

/// The host name, for a node without `cluster.node_name`.
fn host_name() -> String {
    let u = rustix::system::uname();
    u.nodename().to_string_lossy().into_owned()
}

/// Incarnations must grow across restarts: wall-clock milliseconds × 2¹⁶ leaves room for
/// refutation bumps (docs/CLUSTER.md, "Incarnations").
fn first_incarnation() -> u64 {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX >> 16)
    });
    ms << 16
}

/// How a connection's bytes travel: over TLS (`security = tls`) or as they are.
#[derive(Clone)]
struct Transport {
    /// Read when a socket starts: a reload applies to the links made after it.
    tls: Option<Arc<Mutex<tls::Tls>>>,
    /// The TLS handshake's bound; the node's handshake deadline, counted from the same
    /// moment, bounds both together.
    handshake_timeout: Duration,
}

impl Transport {
    /// The certificates in force now.
    fn current_tls(&self) -> Option<tls::Tls> {
        let t = self.tls.as_ref()?;
        Some(match t.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        })
    }
}

/// A connection's tasks, as the loop sees them.
struct ConnTasks {
    /// Unbounded here because the node bounds it: what it sends a peer and the socket has not
    /// taken yet counts against `peer_queue_bytes` until reported by `Transmitted`.
    writer: mpsc::UnboundedSender<WriteCmd>,
}

/// The cluster core's doorbell: shards ring it (through the fabric's doorbells) after queueing
/// entries for it. A `Notify` keeps one permit, so a ring while the loop is busy is not lost.
struct Bell(Notify);

impl Wake for Bell {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// Where a `SubscribeAcked` goes: the owner shard, and the advert it confirms.
struct Confirm {
    shard: usize,
    topic: Arc<str>,
    group: Option<Arc<str>>,
    ticket: u64,
}

/// The cluster core's side of the fabric: what the shards send it, into the node; what the
/// node delivers, to the topics' owner shards.
struct ShardLink {
    ep: Endpoint,
    shards: usize,
    /// The node's subscribe tickets → (owner shard, topic, the owner's ticket): where each
    /// `SubscribeAcked` goes. One entry per `on` whose confirmation is under way, each resolved
    /// within `cluster.sub_ack_timeout`.
    tickets: HashMap<u64, Confirm>,
    /// Confirmations the fabric refused (the core's budget in flight was spent), sent again
    /// each turn: a lost one would keep subscriptions waiting for ever. At most one per entry
    /// of `tickets` that resolved, so bounded like it.
    retry: VecDeque<Confirm>,
    /// Publications this node made, handed to the node (sent to each interested peer).
    published: u64,
    /// Publications from peers handed to their owner shards.
    delivered: u64,
    /// Publications from peers the fabric refused (the shards are not taking entries fast
    /// enough; the core's bytes in flight are bounded like every participant's).
    dropped: u64,
}

impl ShardLink {
    /// Takes what the shards sent (at most `FABRIC_PER_SOURCE` from each) into the node.
    fn receive(&mut self, node: &mut Node, now: u64) {
        let mut inbox = Vec::new();
        self.ep
            .receive(FABRIC_PER_SOURCE, |from, m| inbox.push((from, m)));
        for (from, m) in inbox {
            match m {
                FabricMsg::ClusterInterest {
                    topic,
                    group,
                    ticket,
                    on: true,
                } => {
                    let t = match &group {
                        None => node.subscribe_topic(&topic, now),
                        Some(g) => node.subscribe_group(&topic, g, now),
                    };
                    let confirm = Confirm {
                        shard: from,
                        topic,
                        group,
                        ticket,
                    };
                    self.tickets.insert(t, confirm);
                }
                FabricMsg::ClusterInterest {
                    topic,
                    group,
                    on: false,
                    ..
                } => match &group {
                    None => node.unsubscribe_topic(&topic, now),
                    Some(g) => node.unsubscribe_group(&topic, g, now),
                },
                FabricMsg::ClusterPublish { topic, body } => {
                    self.published += 1;
                    node.publish(&topic, &body, now);
                }
                other => {
                    debug_assert!(
                        false,
                        "unexpected fabric entry for the cluster core: {other:?}"
                    );
                }
            }
        }
    }

    /// A publication from a peer: to the topic's owner shard, which sequences it and fans it
    /// out on this node only (never back to the cluster); with `group`, for one member of that
    /// queue group of this node.
    fn deliver(&mut self, topic: String, group: Option<String>, payload: Vec<u8>) {
        let owner = owner_of(&topic, self.shards);
        let body = Bytes::from(payload);
        let m = match group {
            None => FabricMsg::PublishLocal {
                topic: Arc::from(topic),
                body,
            },
            Some(g) => FabricMsg::PublishGroup {
                group: Box::new((Arc::from(topic), Arc::from(g))),
                body,
            },
        };
        if self.ep.send(owner, m) == Sent::Dropped {
            self.dropped += 1;
        } else {
            self.delivered += 1;
        }
    }

    /// The node confirmed the interest of subscribe ticket `ticket`.
    fn acked(&mut self, ticket: u64) {
        if let Some(confirm) = self.tickets.remove(&ticket) {
            self.retry.push_back(confirm);
        }
    }

    /// Sends the confirmations waiting (in order, per shard the fabric keeps it) and flushes:
    /// the shards that got something are woken.
    fn flush(&mut self) {
        for _ in 0..self.retry.len() {
            let Some(c) = self.retry.pop_front() else {
                break;
            };
            let m = FabricMsg::ClusterInterestAcked {
                topic: c.topic.clone(),
                group: c.group.clone(),
                ticket: c.ticket,
            };
            if self.ep.send(c.shard, m) == Sent::Dropped {
                self.retry.push_back(c);
            }
        }
        self.ep.flush();
    }
}

/// What the rest of the process tells the loop.
struct Signals {
    /// Leave and end.
    stop: watch::Receiver<bool>,
    /// The server's drain began: lame duck.
    drain: watch::Receiver<bool>,
}

/// The cluster core's loop: socket events, ticks and fabric entries into the node, its actions
/// out to the sockets and the shards, a membership snapshot for the control plane after every
/// turn that changed it.
async fn run(
    cfg: node::Config,
    transport: Transport,
    listener: TcpListener,
    view: ClusterView,
    signals: Signals,
    fabric: Endpoint,
    shards: usize,
) {
    let start = Instant::now();
    // The node's clock in wall-clock time, for the dead letters' timestamps.
    let started_at = SystemTime::now();
    let now = || u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    let seed = rand::random::<u64>();
    let mut node = Node::new(cfg.clone(), first_incarnation(), seed, now());
    let bell = Arc::new(Bell(Notify::new()));
    fabric
        .doorbells()
        .register(fabric.id(), Waker::from(bell.clone()));
    let mut link = ShardLink {
        ep: fabric,
        shards,
        tickets: HashMap::new(),
        retry: VecDeque::new(),
        published: 0,
        delivered: 0,
        dropped: 0,
    };
    tracing::info!(
        node = %cfg.name,
        listen = %cfg.advertised,
        seeds = ?cfg.seeds,
        "cluster core started"
    );
    let (tx, mut rx) = mpsc::channel::<SockEvent>(EVENT_QUEUE);
    let acceptor = tokio::spawn(accept_loop(listener, tx.clone()));
    let mut conns: HashMap<ConnId, ConnTasks> = HashMap::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut handshakes = HandshakeLog::new();
    let Signals {
        mut stop,
        mut drain,
    } = signals;
    let mut draining = false;
    // Published before the first turn, so the control plane never answers with nothing.
    let mut last_view = snapshot(&node, &cfg, &link);
    view.set(last_view.clone(), metrics(&node, &link));
    let mut dead_lettered = node.stats().dead_lettered;
    view.set_dlq(dlq_body(&node, started_at));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            changed = drain.changed(), if !draining => {
                // Once: a drain is not undone (and a closed channel must not spin the loop).
                draining = true;
                if changed.is_ok() && *drain.borrow() {
                    node.drain(now());
                    tracing::info!(
                        "cluster: draining as a lame duck (links and interest kept until the \
                         clients are closed, then leaving)"
                    );
                }
            }
            () = bell.0.notified() => {}
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                handle(&mut node, &mut conns, &transport, &tx, &mut handshakes, ev, now());
                for _ in 1..EVENTS_PER_TURN {
                    match rx.try_recv() {
                        Ok(ev) => handle(&mut node, &mut conns, &transport, &tx, &mut handshakes, ev, now()),
                        Err(_) => break,
                    }
                }
            }
            _ = ticker.tick() => node.tick(now()),
        }
        link.receive(&mut node, now());
        if link.ep.inbound_depth() > 0 {
            // More than a turn's share is waiting: turn again at once rather than at the tick.
            bell.0.notify_one();
        }
        node.flush(now());
        carry_out(
            &mut node,
            &mut conns,
            &transport,
            &tx,
            &mut handshakes,
            &mut link,
        );
        link.flush();
        let v = snapshot(&node, &cfg, &link);
        if v != last_view {
            view.set(v.clone(), metrics(&node, &link));
            last_view = v;
        }
        if node.stats().dead_lettered != dead_lettered {
            dead_lettered = node.stats().dead_lettered;
            view.set_dlq(dlq_body(&node, started_at));
        }
    }
    // Leave: peers mark us Left at once instead of suspecting us, and never redial this
    // incarnation.
    node.leave(now());
    node.flush(now());
    carry_out(
        &mut node,
        &mut conns,
        &transport,
        &tx,
        &mut handshakes,
        &mut link,
    );
    acceptor.abort();
    let writers: Vec<_> = conns.drain().map(|(_, c)| c.writer).collect();
    for w in &writers {
        let _ = w.send(WriteCmd::Close);
    }
    drop(writers);
    // The writers end once they have written and shut down; wait for them, bounded.
    drop(tx);
    let _ = tokio::time::timeout(LEAVE_GRACE, async {
        while let Some(ev) = rx.recv().await {
            drop(ev);
        }
    })
    .await;
    tracing::info!("cluster core stopped: left the cluster");
}

async fn accept_loop(listener: TcpListener, tx: mpsc::Sender<SockEvent>) {
    loop {
        match listener.accept().await {
            Ok((s, addr)) => {
                if tx.send(SockEvent::Accepted(s, addr)).await.is_err() {
                    return;
                }
            }
            // Out of descriptors and the like: the node's peers redial; do not spin.
            Err(e) => {
                tracing::warn!(error = %e, "cluster listener: accept failed");
                tokio::time::sleep(TICK).await;
            }
        }
    }
}

fn handle(
    node: &mut Node,
    conns: &mut HashMap<ConnId, ConnTasks>,
    transport: &Transport,
    tx: &mpsc::Sender<SockEvent>,
    handshakes: &mut HandshakeLog,
    ev: SockEvent,
    now: u64,
) {
    match ev {
        SockEvent::Accepted(stream, addr) => match node.accept(&addr.to_string(), now) {
            // Over the unauthenticated caps: the socket closes as it drops.
            None => {
                tracing::debug!(%addr, "cluster: inbound connection refused (too many unauthenticated)")
            }
            Some(conn) => {
                let (w, r) = mpsc::unbounded_channel();
                conns.insert(conn, ConnTasks { writer: w });
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_accepted(
                    conn,
                    stream,
                    transport.clone(),
                    r,
                    tx.clone(),
                ));
            }
        },
        SockEvent::Connected(conn) => node.connected(conn, now),
        SockEvent::Certified(conn, names) => node.certified(conn, names),
        SockEvent::TlsFailed(conn, error) => {
            // Logged like the node's own handshake failures, under the same rate limit.
            log_event(
                &Event::HandshakeFailed {
                    addr: node.conn_addr(conn).unwrap_or_default(),
                    error: format!("tls: {error}"),
                },
                handshakes,
            );
            conns.remove(&conn);
            node.closed(conn, now);
        }
        SockEvent::DialFailed(conn) => {
            conns.remove(&conn);
            node.dial_failed(conn, now);
        }
        SockEvent::Input(conn, bytes) => node.input(conn, &bytes, now),
        SockEvent::Transmitted(conn, n) => node.transmitted(conn, n),
        SockEvent::Closed(conn) => {
            conns.remove(&conn);
            node.closed(conn, now);
        }
    }
}

fn carry_out(
    node: &mut Node,
    conns: &mut HashMap<ConnId, ConnTasks>,
    transport: &Transport,
    tx: &mpsc::Sender<SockEvent>,
    handshakes: &mut HandshakeLog,
    link: &mut ShardLink,
) {
    while let Some(action) = node.poll_action() {
        match action {
            Action::Dial { conn, addr } => {
                let (w, r) = mpsc::unbounded_channel();
                conns.insert(conn, ConnTasks { writer: w });
                tokio::spawn(dial(conn, addr, transport.clone(), r, tx.clone()));
            }
            Action::Send { conn, bytes } => {
                if let Some(c) = conns.get(&conn) {
                    let _ = c.writer.send(WriteCmd::Bytes(bytes));
                }
            }
            Action::Close { conn } => {
                if let Some(c) = conns.remove(&conn) {
                    let _ = c.writer.send(WriteCmd::Close);
                }
            }
            // The node passes on only what this node advertised (and in per-peer order).
            Action::Deliver { topic, payload, .. } => link.deliver(topic, None, payload),
            // One member of a local queue group gets it: this node was the publishing node's
            // pick for the group.
            Action::DeliverGroup {
                topic,
                group,
                payload,
                ..
            } => link.deliver(topic, Some(group), payload),
            Action::SubscribeAcked { ticket, .. } => link.acked(ticket),
            Action::Event(e) => log_event(&e, handshakes),
        }
    }
}

/// Rate limit on the failed-handshake log line.
struct HandshakeLog {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl HandshakeLog {
    fn new() -> Self {
        Self {
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether to log one more now; if so, how many were left out before it.
    fn admit(&mut self) -> Option<u64> {
        if self.window_start.elapsed() >= Duration::from_secs(1) {
            self.window_start = Instant::now();
            self.logged = 0;
        }
        if self.logged >= HANDSHAKE_LOGS_PER_SEC {
            self.suppressed += 1;
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

fn log_event(e: &Event, handshakes: &mut HandshakeLog) {
    match e {
        Event::Member {
            name,
            incarnation,
            state,
        } => tracing::info!(
            member = %name,
            incarnation,
            state = state_name(*state),
            "cluster member {name} is {}",
            state_name(*state)
        ),
        Event::LinkUp { peer } => tracing::info!(peer = %peer, "cluster link to {peer} up"),
        Event::LinkDown { peer } => tracing::info!(peer = %peer, "cluster link to {peer} down"),
        Event::NameConflict { name, addr } => tracing::error!(
            name = %name,
            addr = %addr,
            "cluster: another node at {addr} claims the name {name}, which is in use"
        ),
        Event::Refuted { incarnation } => {
            tracing::warn!(incarnation, "cluster: refuted a suspicion of this node")
        }
        Event::HandshakeFailed { addr, error } => {
            if let Some(left_out) = handshakes.admit() {
                tracing::warn!(
                    addr = %addr,
                    left_out,
                    "cluster handshake with {addr} failed: {error}"
                );
            }
        }
    }
}

/// A state's name, as the log, the API and the `state` label write it.
pub(crate) fn state_name(s: MemberState) -> &'static str {
    match s {
        MemberState::Alive => "alive",
        MemberState::Suspect => "suspect",
        MemberState::Leaving => "leaving",
        MemberState::Dead => "dead",
        MemberState::Left => "left",
    }
}

/// `GET /api/v1/cluster`'s body (docs/CLUSTER.md).
fn snapshot(node: &Node, cfg: &node::Config, link: &ShardLink) -> Value {
    let members: Vec<Value> = node
        .members()
        .into_iter()
        .map(|m| {
            json!({
                "name": m.name,
                "incarnation": m.incarnation,
                "state": state_name(m.state),
                "link": m.link.is_some(),
                "rtt_us": m.rtt_us,
                "bytes_sent": m.traffic.sent,
                "bytes_received": m.traffic.received,
                "batch_bytes_raw": m.traffic.batch_raw,
                "batch_bytes_wire": m.traffic.batch_wire,
                "compression_ratio": ratio(m.traffic.batch_raw, m.traffic.batch_wire),
            })
        })
        .collect();
    json!({
        "enabled": true,
        "node": {
            "name": node.name(),
            "incarnation": node.incarnation(),
            "advertised": cfg.advertised,
        },
        "members": members,
        "connections": node.connection_count(),
        "routing": true,
        "publications": {
            "sent": link.published,
            "received": link.delivered,
            "dropped": link.dropped,
            "dropped_peer_queue": node.stats().dropped_queue,
            "dropped_too_large": node.stats().dropped_too_large,
            "unwanted": node.stats().unwanted,
        },
        "sub_ack_timeouts": node.stats().sub_ack_timeouts,
        "resyncs": node.stats().resyncs,
        "compression_ratio": ratio(node.stats().batch_bytes_raw, node.stats().batch_bytes_wire),
        "dlq_entries": node.dlq().count(),
    })
}

/// Bytes before compression per byte on the wire; `None` before any batch.
fn ratio(raw: u64, wire: u64) -> Option<f64> {
    (wire > 0).then(|| raw as f64 / wire as f64)
}

/// The figures behind `wse_cluster_*`.
fn metrics(node: &Node, link: &ShardLink) -> ClusterMetrics {
    let stats = node.stats();
    let mut m = ClusterMetrics {
        publications_sent: link.published,
        publications_received: link.delivered,
        dropped_shards_busy: link.dropped,
        dropped_peer_queue: stats.dropped_queue,
        dropped_too_large: stats.dropped_too_large,
        batch_bytes_raw: stats.batch_bytes_raw,
        batch_bytes_wire: stats.batch_bytes_wire,
        sub_ack_timeouts: stats.sub_ack_timeouts,
        resyncs: stats.resyncs,
        dlq_entries: node.dlq().count() as u64,
        ..ClusterMetrics::default()
    };
    for member in node.members() {
        if let Some(i) = MEMBER_STATES.iter().position(|s| *s == member.state) {
            m.members[i] += 1;
        }
        m.links_up += u64::from(member.link.is_some());
        m.peers.push(PeerMetrics {
            name: member.name,
            rtt_us: member.rtt_us.filter(|_| member.link.is_some()),
            traffic: member.traffic,
        });
    }
    m
}

/// `GET /api/v1/cluster/dlq`'s body: the dead letter queue, oldest first (docs/API.md).
fn dlq_body(node: &Node, started_at: SystemTime) -> Value {
    use base64::Engine as _;
    let entries: Vec<Value> = node
        .dlq()
        .map(|e| {
            let at = started_at + Duration::from_micros(e.at);
            json!({
                "peer": e.peer,
                "topic": e.topic,
                "bytes": e.bytes,
                "reason": e.reason,
                "time": humantime::format_rfc3339_millis(at).to_string(),
                "prefix": base64::engine::general_purpose::STANDARD.encode(&e.prefix),
            })
        })
        .collect();
    json!({
        "enabled": true,
        "capacity": node.limits().dlq_entries,
        "total": node.stats().dead_lettered,
        "entries": entries,
    })
}

/// Dials `addr` (resolved now: DNS is re-read on every attempt), then serves the connection.
async fn dial(
    conn: ConnId,
    addr: String,
    transport: Transport,
    writes: mpsc::UnboundedReceiver<WriteCmd>,
    tx: mpsc::Sender<SockEvent>,
) {
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            // Sent before any input of this connection: the channel keeps the order.
            // Sent before any input of this connection: the channel keeps the order. The node's
            // handshake (and its deadline) starts now; with TLS, its PREFACE and HELLO wait in
            // `writes` until the TLS handshake is done.
            if tx.send(SockEvent::Connected(conn)).await.is_err() {
                return;
            }
            match transport.current_tls() {
                None => serve(conn, stream, writes, tx).await,
                Some(tls) => {
                    let shake = tls.connect(&addr, stream);
                    serve_after_tls(conn, shake, transport.handshake_timeout, writes, tx).await;
                }
            }
        }
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "cluster dial failed");
            let _ = tx.send(SockEvent::DialFailed(conn)).await;
        }
        Err(_) => {
            tracing::debug!(%addr, "cluster dial timed out");
            let _ = tx.send(SockEvent::DialFailed(conn)).await;
        }
    }
}

/// An accepted connection: with TLS, its handshake first (the node counts the socket among
/// the unauthenticated ones from its `accept` and bounds it by its handshake deadline), then
/// the bytes.
async fn serve_accepted(
    conn: ConnId,
    stream: TcpStream,
    transport: Transport,
    writes: mpsc::UnboundedReceiver<WriteCmd>,
    tx: mpsc::Sender<SockEvent>,
) {
    let Some(tls) = transport.current_tls() else {
        return serve(conn, stream, writes, tx).await;
    };
    let shake = tls.accept(stream);
    serve_after_tls(conn, shake, transport.handshake_timeout, writes, tx).await;
}

/// Either side's TLS handshake (`shake`), bounded by `deadline`: reports the names the peer's
/// certificate holds, then moves the bytes; a failed or late handshake is reported instead.
async fn serve_after_tls<S: AsyncRead + AsyncWrite>(
    conn: ConnId,
    shake: impl Future<Output = io::Result<(S, CertifiedNames)>>,
    deadline: Duration,
    writes: mpsc::UnboundedReceiver<WriteCmd>,
    tx: mpsc::Sender<SockEvent>,
) {
    match tokio::time::timeout(deadline, shake).await {
        Ok(Ok((s, names))) => {
            if tx.send(SockEvent::Certified(conn, names)).await.is_ok() {
                serve(conn, s, writes, tx).await;
            }
        }
        Ok(Err(e)) => {
            let _ = tx.send(SockEvent::TlsFailed(conn, e.to_string())).await;
        }
        Err(_) => {
            let _ = tx
                .send(SockEvent::TlsFailed(conn, "timed out".to_owned()))
                .await;
        }
    }
}

/// Moves bytes both ways until either side ends, then reports the connection closed once.
async fn serve<S: AsyncRead + AsyncWrite>(
    conn: ConnId,
    stream: S,
    mut writes: mpsc::UnboundedReceiver<WriteCmd>,
    tx: mpsc::Sender<SockEvent>,
) {
    let (mut r, mut w) = tokio::io::split(stream);
    let reader = {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx
                            .send(SockEvent::Input(conn, buf[..n].to_vec()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
    };
    let writer = {
        let tx = tx.clone();
        async move {
            while let Some(cmd) = writes.recv().await {
                match cmd {
                    WriteCmd::Bytes(b) => {
                        if w.write_all(&b).await.is_err() {
                            return;
                        }
                        if tx
                            .send(SockEvent::Transmitted(conn, b.len()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    WriteCmd::Close => break,
                }
            }
            let _ = w.shutdown().await;
        }
    };
    // Either end finishing ends the connection: the node reads a closed socket as the link
    // gone, and a Close from the node needs no more reading.
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
    let _ = tx.send(SockEvent::Closed(conn)).await;
}
