//! `RustWSEServer`: upstream's Python class over [`wse_shards::Server`].
//!
//! Owns: the Python object's lifecycle (configured → running → stopped, restartable), drain
//! mode, the callback thread, and the mapping of engine answers and errors to upstream's return
//! shapes. Never: holds its state lock while the GIL is released (a thread waiting for the lock
//! with the GIL would deadlock the one waiting for the GIL), or blocks a shard: every engine call
//! goes through the fabric, and events wait in the shards' bounded queues (drop-and-count when
//! Python does not keep up, see `inbound_dropped_count`).
//!
//! Every call that waits on the engine releases the GIL while it waits.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pyo3::exceptions::{
    PyNotImplementedError, PyOSError, PyRuntimeError, PyRuntimeWarning, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use wse_shards::command::AppSubscribe;
use wse_shards::{
    AppEvent, AppEventKind, CommandError, Config, ConnId, Payload, PublishError, QueryError,
    Server, StartError, block_on_timeout,
};

use crate::convert::{self, Message, event_tuple, json_to_py, py_to_json};
use crate::options::Options;

/// Longest wait for the engine's answer to one command; a shard answers within a loop turn, so
/// reaching it means the server is stopping or stuck.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// `drain_inbound` and the callback thread wait in slices this long, so that Ctrl-C (a signal
/// handler runs only between slices) and `stop()` are noticed promptly.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// Events the callback thread takes per batch.
const CALLBACK_BATCH: usize = 256;
/// Extra time `stop()` gives the shards after their drain timeout.
const STOP_GRACE: Duration = Duration::from_secs(1);
const NO_CLUSTER: &str = "clustering is not implemented in wse-shards yet (the cluster \
    issues): this server runs single-node, and broadcast() reaches this node's subscribers only";

/// Standalone Rust WebSocket server controlled from Python (the wse-shards engine).
///
/// All transport (TCP accept, framing, JWT auth, compression, ping/pong) runs in the engine's
/// shard threads, one per core. Python handles application logic via drain mode
/// (`enable_drain_mode()` + `drain_inbound()`) or callbacks (`set_callbacks()`).
#[pyclass(module = "wse_server._wse_accel", frozen)]
pub struct RustWSEServer {
    cfg: Config,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The running engine; `None` before `start()` and after `stop()`.
    server: Option<Arc<Server>>,
    /// `start()` is between its checks and storing the server (the lock is not held meanwhile).
    starting: bool,
    drain_mode: bool,
    callbacks: Option<Arc<Callbacks>>,
    /// The thread calling `callbacks` (callback mode only); stopped and joined by `stop()`.
    dispatcher: Option<Dispatcher>,
}

struct Callbacks {
    on_connect: Py<PyAny>,
    on_message: Py<PyAny>,
    on_disconnect: Py<PyAny>,
}

struct Dispatcher {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

#[pymethods]
impl RustWSEServer {
    #[new]
    #[pyo3(signature = (
        host, port, max_connections = 1000, jwt_secret = None, jwt_issuer = None,
        jwt_audience = None, jwt_cookie_name = None, jwt_previous_secret = None,
        jwt_key_id = None, jwt_algorithm = None, jwt_private_key = None,
        max_inbound_queue_size = 131072, recovery_enabled = false, recovery_buffer_size = 128,
        recovery_ttl = 300, recovery_max_messages = 500, recovery_memory_budget = 268435456,
        presence_enabled = false, presence_max_data_size = 4096, presence_max_members = 0,
        rate_limit_capacity = 100000.0, rate_limit_refill = 10000.0,
        max_message_size = 1048576, ping_interval = 25, idle_timeout = 60,
        max_outbound_queue_bytes = 16777216
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: String,
        port: u16,
        max_connections: usize,
        jwt_secret: Option<Vec<u8>>,
        jwt_issuer: Option<String>,
        jwt_audience: Option<String>,
        jwt_cookie_name: Option<String>,
        jwt_previous_secret: Option<Vec<u8>>,
        jwt_key_id: Option<String>,
        jwt_algorithm: Option<String>,
        jwt_private_key: Option<Vec<u8>>,
        max_inbound_queue_size: usize,
        recovery_enabled: bool,
        recovery_buffer_size: usize,
        recovery_ttl: u64,
        recovery_max_messages: usize,
        recovery_memory_budget: usize,
        presence_enabled: bool,
        presence_max_data_size: usize,
        presence_max_members: usize,
        rate_limit_capacity: f64,
        rate_limit_refill: f64,
        max_message_size: usize,
        ping_interval: u64,
        idle_timeout: u64,
        max_outbound_queue_bytes: usize,
    ) -> PyResult<Self> {
        let options = Options {
            host,
            port,
            max_connections,
            jwt_secret,
            jwt_issuer,
            jwt_audience,
            jwt_cookie_name,
            jwt_previous_secret,
            jwt_key_id,
            jwt_algorithm,
            jwt_private_key,
            max_inbound_queue_size,
            recovery_enabled,
            recovery_buffer_size,
            recovery_ttl,
            recovery_max_messages,
            recovery_memory_budget,
            presence_enabled,
            presence_max_data_size,
            presence_max_members,
            rate_limit_capacity,
            rate_limit_refill,
            max_message_size,
            ping_interval,
            idle_timeout,
            max_outbound_queue_bytes,
        };
        let (mut cfg, warnings) = options.to_config()?;
        for w in warnings {
            warn(py, &w)?;
        }
        if let Some(cores) = std::env::var("WSE_CORES").ok().and_then(|c| c.parse().ok()) {
            cfg.server.cores = cores;
        }
        Ok(Self {
            cfg,
            state: Mutex::new(State::default()),
        })
    }

    // -- Lifecycle ------------------------------------------------------------------------

    /// Start the WebSocket server: binds the listener (OSError when it cannot) and starts one
    /// shard thread per core (`WSE_CORES` in the environment overrides the count). Returns once
    /// the server accepts connections.
    ///
    /// Raises RuntimeError if the server is already running.
    fn start(slf: &Bound<'_, Self>, py: Python<'_>) -> PyResult<()> {
        let this = slf.get();
        {
            let mut st = this.lock();
            if st.starting || st.server.as_ref().is_some_and(|s| s.is_running()) {
                return Err(PyRuntimeError::new_err("Server is already running"));
            }
            st.starting = true;
        }
        let cfg = this.cfg.clone();
        let started = py.detach(|| Server::start(cfg));
        let mut st = this.lock();
        st.starting = false;
        let server = Arc::new(started.map_err(start_error)?);
        if !st.drain_mode
            && let Some(cb) = st.callbacks.clone()
        {
            st.dispatcher = Some(Dispatcher::spawn(server.clone(), cb));
        }
        st.server = Some(server);
        drop(st);
        // Stop before the interpreter finalizes: the callback thread must not outlive it.
        py.import("atexit")?
            .call_method1("register", (slf.getattr("stop")?,))?;
        Ok(())
    }

    /// Stop the server and close all connections (with 4300, so clients reconnect elsewhere).
    /// Waits for the shards to exit; a no-op when not running.
    fn stop(slf: &Bound<'_, Self>, py: Python<'_>) -> PyResult<()> {
        let this = slf.get();
        let (server, dispatcher) = {
            let mut st = this.lock();
            (st.server.take(), st.dispatcher.take())
        };
        py.detach(|| {
            if let Some(d) = dispatcher {
                d.stop.store(true, Ordering::Release);
                let _ = d.thread.join();
            }
            if let Some(server) = &server {
                server.stop(STOP_GRACE);
            }
        });
        if server.is_some() {
            let _ = py
                .import("atexit")?
                .call_method1("unregister", (slf.getattr("stop")?,));
        }
        Ok(())
    }

    /// Enter graceful drain mode (lame duck).
    ///
    /// Stops accepting new connections, sends a Close frame with `close_code` (4000..=4999,
    /// else ValueError) and `close_reason` to all clients, and waits up to `timeout` seconds
    /// for them to disconnect. The server is not running afterwards; call stop() to finish.
    #[pyo3(
        signature = (close_code = 4300, close_reason = String::new(), timeout = 30),
        text_signature = "($self, close_code=4300, close_reason=\"\", timeout=30)"
    )]
    fn drain(
        &self,
        py: Python<'_>,
        close_code: u16,
        close_reason: String,
        timeout: u64,
    ) -> PyResult<()> {
        let Some(server) = self.server() else {
            return Ok(());
        };
        let timeout = Duration::from_secs(timeout);
        match py.detach(|| server.drain(close_code, &close_reason, timeout)) {
            Ok(_) | Err(CommandError::NotRunning) => Ok(()),
            Err(e) => Err(command_error(e)),
        }
    }

    /// Return True if the server is running (started, not stopped or draining).
    fn is_running(&self) -> bool {
        self.server().is_some_and(|s| s.is_running())
    }

    // -- Callbacks ------------------------------------------------------------------------

    /// Register Python callbacks for connection events (the alternative to drain mode).
    ///
    /// `on_connect(conn_id, user_id)` (user_id is "" with authentication off),
    /// `on_message(conn_id, data)` (a dict for a JSON object, str for other text, bytes for
    /// binary), `on_disconnect(conn_id)`. They run on one Python thread of this server's, in
    /// the order each connection's events happened; an exception is printed and the next event
    /// proceeds. A slow callback never stalls a shard: events wait in the shards' bounded
    /// queues, and are dropped (and counted in `inbound_dropped_count()`) past them.
    fn set_callbacks(
        &self,
        on_connect: Py<PyAny>,
        on_message: Py<PyAny>,
        on_disconnect: Py<PyAny>,
    ) {
        let cb = Arc::new(Callbacks {
            on_connect,
            on_message,
            on_disconnect,
        });
        let mut st = self.lock();
        st.callbacks = Some(cb.clone());
        if !st.drain_mode
            && st.dispatcher.is_none()
            && let Some(server) = st.server.clone()
        {
            st.dispatcher = Some(Dispatcher::spawn(server, cb));
        }
    }

    // -- Drain mode -----------------------------------------------------------------------

    /// Enable drain mode: inbound events are queued for `drain_inbound()` instead of calling
    /// the callbacks. Call it before start().
    fn enable_drain_mode(&self) {
        self.lock().drain_mode = true;
    }

    /// Drain up to `max_count` inbound events, blocking (without the GIL) up to `timeout_ms`
    /// for the first one.
    ///
    /// Returns a list of `(event_type, conn_id, data)` tuples:
    /// `("connect", conn_id, "")`, `("auth_connect", conn_id, user_id)`,
    /// `("msg", conn_id, dict)`, `("raw", conn_id, str)`, `("bin", conn_id, bytes)`,
    /// `("disconnect", conn_id, None)`, `("presence_join", None, {"topic", "user_id", "data"})`,
    /// `("presence_leave", None, {...})`. Empty when drain mode is off or the server is not
    /// running. Ctrl-C interrupts the wait (KeyboardInterrupt).
    #[pyo3(signature = (max_count = 256, timeout_ms = 50))]
    fn drain_inbound<'py>(
        &self,
        py: Python<'py>,
        max_count: usize,
        timeout_ms: u64,
    ) -> PyResult<Bound<'py, PyList>> {
        let server = {
            let st = self.lock();
            if !st.drain_mode {
                None
            } else {
                st.server.clone()
            }
        };
        let list = PyList::empty(py);
        let Some(server) = server else {
            return Ok(list);
        };
        if max_count == 0 {
            return Ok(list);
        }
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let events = loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(WAIT_SLICE);
            let events = py.detach(|| server.drain_inbound(max_count, slice));
            if !events.is_empty() || Instant::now() >= deadline || !server.shards_running() {
                break events;
            }
            py.check_signals()?;
        };
        for e in &events {
            list.append(event_tuple(py, e)?)?;
        }
        Ok(list)
    }

    /// Number of inbound events dropped because a shard's event queue was full.
    fn inbound_dropped_count(&self) -> u64 {
        self.server()
            .map_or(0, |s| s.health_snapshot().inbound_dropped)
    }

    /// Current number of events waiting in the shards' event queues.
    fn inbound_queue_depth(&self) -> u64 {
        self.server()
            .map_or(0, |s| s.health_snapshot().inbound_queue_depth)
    }

    // -- Send -----------------------------------------------------------------------------

    /// Send a raw text frame to a single connection. An unknown connection is ignored.
    fn send(&self, py: Python<'_>, conn_id: String, data: String) -> PyResult<()> {
        let Some(conn) = ConnId::parse(&conn_id) else {
            return Ok(());
        };
        let server = self.running()?;
        ignore_gone(wait(py, server.send(conn, &data))?).map(drop)
    }

    /// Send a raw binary frame to a single connection. An unknown connection is ignored.
    fn send_bytes(&self, py: Python<'_>, conn_id: String, data: Vec<u8>) -> PyResult<()> {
        let Some(conn) = ConnId::parse(&conn_id) else {
            return Ok(());
        };
        let server = self.running()?;
        ignore_gone(wait(py, server.send_bytes(conn, &data))?).map(drop)
    }

    /// Send an event through the outbound pipeline: the WSE envelope
    /// (`{"c","t","p","id","ts","seq","v"}`; `t`/`type`, `p`/`payload`, `id`, `c` from the
    /// event), MessagePack for msgpack clients, zlib over the server's compression threshold.
    /// Returns the bytes queued (0 for an unknown connection or a duplicate event id).
    /// `compression_threshold` is accepted for compatibility; the server's threshold (1024)
    /// applies.
    #[pyo3(signature = (conn_id, event, compression_threshold = 1024))]
    fn send_event(
        &self,
        py: Python<'_>,
        conn_id: String,
        event: &Bound<'_, PyDict>,
        compression_threshold: usize,
    ) -> PyResult<usize> {
        let _ = compression_threshold;
        let event = py_to_json(event.as_any())?.to_string();
        let Some(conn) = ConnId::parse(&conn_id) else {
            return Ok(0);
        };
        let server = self.running()?;
        Ok(ignore_gone(wait(py, server.send_event(conn, &event))?)?.map_or(0, |o| o.bytes))
    }

    // -- Broadcast ------------------------------------------------------------------------

    /// Send a text frame to all connected clients (no topic filtering).
    fn broadcast_all(&self, py: Python<'_>, data: String) -> PyResult<()> {
        let server = self.running()?;
        let payload = Payload::Text(Bytes::from(data));
        wait(py, server.broadcast_all(payload))?
            .map_err(command_error)
            .map(drop)
    }

    /// Send a binary frame to all connected clients.
    fn broadcast_all_bytes(&self, py: Python<'_>, data: Vec<u8>) -> PyResult<()> {
        let server = self.running()?;
        let payload = Payload::Binary(Bytes::from(data));
        wait(py, server.broadcast_all(payload))?
            .map_err(command_error)
            .map(drop)
    }

    /// Fan-out to topic subscribers on this node. A JSON object's text is stamped with the
    /// recovery position when recovery is on (and gets `"c":"U"` when it has a `t` and no `c`,
    /// as upstream); any other text is sent as it is. Text that starts with `{` but is not a
    /// JSON object raises ValueError.
    fn broadcast_local(&self, py: Python<'_>, topic: String, data: String) -> PyResult<()> {
        self.publish(py, &topic, data)
    }

    /// Fan-out to topic subscribers locally and across cluster peers (single-node for now:
    /// the same as broadcast_local()). `data` as for broadcast_local().
    fn broadcast(&self, py: Python<'_>, topic: String, data: String) -> PyResult<()> {
        self.publish(py, &topic, data)
    }

    // -- Connections ----------------------------------------------------------------------

    /// Number of active connections (a counter read, no shard is asked).
    fn get_connection_count(&self) -> usize {
        self.server().map_or(0, |s| s.get_connection_count())
    }

    /// List all active connection IDs.
    fn get_connections(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let Some(server) = self.server() else {
            return Ok(Vec::new());
        };
        let list = wait(py, server.get_connections())?.map_err(command_error)?;
        Ok(list.into_iter().map(|c| c.id.to_string()).collect())
    }

    /// Force-disconnect a connection: a close frame without status code, as upstream (clients
    /// see 1005). An unknown connection is ignored.
    fn disconnect(&self, py: Python<'_>, conn_id: String) -> PyResult<()> {
        let Some(conn) = ConnId::parse(&conn_id) else {
            return Ok(());
        };
        let server = self.running()?;
        ignore_gone(wait(py, server.disconnect_without_status(conn))?).map(drop)
    }

    /// Set the topic ACL of a connection (globs; deny wins; no allow list allows everything
    /// not denied). Subscriptions the new ACL refuses are dropped.
    #[pyo3(signature = (conn_id, allow = None, deny = None))]
    fn set_topic_acl(
        &self,
        py: Python<'_>,
        conn_id: String,
        allow: Option<Vec<String>>,
        deny: Option<Vec<String>>,
    ) -> PyResult<()> {
        let Some(conn) = ConnId::parse(&conn_id) else {
            return Ok(());
        };
        let server = self.running()?;
        let allow = allow.filter(|a| !a.is_empty());
        let fut = server.set_topic_acl(conn, allow, deny.unwrap_or_default());
        ignore_gone(wait(py, fut)?).map(drop)
    }

    // -- Subscriptions --------------------------------------------------------------------

    /// Subscribe a connection to topics, with optional presence data (a dict) when presence
    /// is enabled. With `queue_group`, the connection joins that queue group instead: one
    /// member of the group gets each publication. Topics the server refuses (ACL, limits) are
    /// reported in a RuntimeWarning. An unknown connection is ignored.
    #[pyo3(signature = (conn_id, topics, presence_data = None, queue_group = None))]
    fn subscribe_connection(
        &self,
        py: Python<'_>,
        conn_id: String,
        topics: Vec<String>,
        presence_data: Option<&Bound<'_, PyDict>>,
        queue_group: Option<String>,
    ) -> PyResult<()> {
        let presence = presence_data
            .map(|d| py_to_json(d.as_any()).map(|v| Bytes::from(v.to_string())))
            .transpose()?;
        let Some(conn) = ConnId::parse(&conn_id) else {
            return Ok(());
        };
        let server = self.running()?;
        let sub = AppSubscribe {
            topics,
            presence,
            queue_group: queue_group.map(Into::into),
            recover: Vec::new(),
        };
        if let Some(outcome) = ignore_gone(wait(py, server.subscribe_connection(conn, sub))?)? {
            warn_failed(py, &outcome.failed_topics)?;
        }
        Ok(())
    }

    /// Subscribe with message recovery: with `recover=True`, replay what the connection missed
    /// since `(epoch, offset)` (its last position) from the topics' histories.
    ///
    /// Returns `{"recovered": bool, "topics": {topic: {"epoch", "offset", "recoverable",
    /// "recovered", "count"}}}`.
    #[pyo3(signature = (conn_id, topics, recover = false, epoch = None, offset = None))]
    fn subscribe_with_recovery<'py>(
        &self,
        py: Python<'py>,
        conn_id: String,
        topics: Vec<String>,
        recover: bool,
        epoch: Option<String>,
        offset: Option<u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let result = PyDict::new(py);
        let per_topic = PyDict::new(py);
        let mut any_recovered = false;
        let server = self.running()?;
        let outcome = match ConnId::parse(&conn_id) {
            None => None,
            Some(conn) => {
                let epoch = epoch.as_deref().and_then(wse_shards::protocol::parse_epoch);
                let sub = AppSubscribe {
                    recover: if recover {
                        topics
                            .iter()
                            .map(|t| (t.clone(), epoch, offset.unwrap_or(0)))
                            .collect()
                    } else {
                        Vec::new()
                    },
                    topics: topics.clone(),
                    ..Default::default()
                };
                ignore_gone(wait(py, server.subscribe_connection(conn, sub))?)?
            }
        };
        if let Some(outcome) = &outcome {
            warn_failed(py, &outcome.failed_topics)?;
        }
        let recovery: BTreeMap<&str, _> = outcome
            .iter()
            .flat_map(|o| o.recovery.iter().map(|(t, r)| (t.as_str(), r)))
            .collect();
        for topic in &topics {
            let d = PyDict::new(py);
            match recovery.get(topic.as_str()) {
                Some(r) => {
                    any_recovered |= r.recovered;
                    d.set_item("epoch", wse_shards::protocol::epoch_hex(r.epoch))?;
                    d.set_item("offset", r.offset)?;
                    d.set_item("recoverable", true)?;
                    d.set_item("recovered", r.recovered)?;
                    d.set_item("count", r.count)?;
                }
                None => {
                    d.set_item("epoch", py.None())?;
                    d.set_item("offset", 0)?;
                    d.set_item("recoverable", false)?;
                    d.set_item("recovered", false)?;
                    d.set_item("count", 0)?;
                }
            }
            per_topic.set_item(topic, d)?;
        }
        result.set_item("recovered", any_recovered)?;
        result.set_item("topics", per_topic)?;
        Ok(result)
    }

    /// Unsubscribe a connection from topics; from every topic when `topics` is None.
    #[pyo3(signature = (conn_id, topics = None))]
    fn unsubscribe_connection(
        &self,
        py: Python<'_>,
        conn_id: String,
        topics: Option<Vec<String>>,
    ) -> PyResult<()> {
        let Some(conn) = ConnId::parse(&conn_id) else {
            return Ok(());
        };
        let server = self.running()?;
        ignore_gone(wait(py, server.unsubscribe_connection(conn, topics))?).map(drop)
    }

    /// Number of fan-out subscribers on a topic (excludes queue group members).
    fn get_topic_subscriber_count(&self, py: Python<'_>, topic: String) -> PyResult<usize> {
        let Some(server) = self.server() else {
            return Ok(0);
        };
        let subs = wait(py, server.get_topic_subscribers(&topic))?.map_err(command_error)?;
        let grouped: usize = subs.queue_groups.iter().map(|(_, n)| n).sum();
        Ok(subs.count.saturating_sub(grouped))
    }

    /// Queue group info for a topic: `{group_name: member_count}`.
    fn get_queue_group_info(
        &self,
        py: Python<'_>,
        topic: String,
    ) -> PyResult<BTreeMap<String, usize>> {
        let Some(server) = self.server() else {
            return Ok(BTreeMap::new());
        };
        let subs = wait(py, server.get_topic_subscribers(&topic))?.map_err(command_error)?;
        Ok(subs.queue_groups.into_iter().collect())
    }

    // -- Presence -------------------------------------------------------------------------

    /// All members present in a topic: `{user_id: {"data": dict, "connections": int}}`
    /// (empty when presence is disabled).
    fn presence<'py>(&self, py: Python<'py>, topic: String) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        let Some(server) = self.server() else {
            return Ok(out);
        };
        let members = match wait(py, server.presence(&topic))? {
            Ok(m) => m,
            Err(QueryError::PresenceDisabled) => return Ok(out),
            Err(e) => return Err(query_error(e)),
        };
        for m in members {
            let d = PyDict::new(py);
            let data = serde_json::from_str(&m.data).unwrap_or(serde_json::Value::Null);
            d.set_item("data", json_to_py(py, &data)?)?;
            d.set_item("connections", m.connections)?;
            out.set_item(m.user_id, d)?;
        }
        Ok(out)
    }

    /// Presence counters for a topic: `{"num_users": int, "num_connections": int}`.
    fn presence_stats(
        &self,
        py: Python<'_>,
        topic: String,
    ) -> PyResult<BTreeMap<&'static str, u64>> {
        let (users, conns) = match self.server() {
            None => (0, 0),
            Some(server) => match wait(py, server.presence_stats(&topic))? {
                Ok(stats) => stats,
                Err(QueryError::PresenceDisabled) => (0, 0),
                Err(e) => return Err(query_error(e)),
            },
        };
        Ok(BTreeMap::from([
            ("num_users", users as u64),
            ("num_connections", conns),
        ]))
    }

    /// Update presence data for a connection across all its presence topics (its clients get
    /// `presence_update`). RuntimeError, as upstream, for an unknown connection or data over
    /// `presence_max_data_size`.
    fn update_presence(
        &self,
        py: Python<'_>,
        conn_id: String,
        data: &Bound<'_, PyDict>,
    ) -> PyResult<()> {
        const FAILED: &str = "Failed to update presence data (size limit or unknown connection)";
        let data = py_to_json(data.as_any())?.to_string();
        if data.len() > self.cfg.presence.max_data_size {
            return Err(PyRuntimeError::new_err(FAILED));
        }
        let conn = ConnId::parse(&conn_id).ok_or_else(|| PyRuntimeError::new_err(FAILED))?;
        let server = self.running()?;
        match wait(py, server.update_presence(conn, Bytes::from(data)))? {
            Ok(()) => Ok(()),
            Err(CommandError::UnknownConnection) => Err(PyRuntimeError::new_err(FAILED)),
            Err(e) => Err(command_error(e)),
        }
    }

    // -- Cluster --------------------------------------------------------------------------

    /// Connect to cluster peers. Not implemented yet: raises NotImplementedError.
    #[pyo3(signature = (peers, tls_cert = None, tls_key = None, tls_ca = None, cluster_port = None, seeds = None, cluster_addr = None))]
    #[allow(clippy::too_many_arguments)]
    fn connect_cluster(
        &self,
        peers: Vec<String>,
        tls_cert: Option<String>,
        tls_key: Option<String>,
        tls_ca: Option<String>,
        cluster_port: Option<u16>,
        seeds: Option<Vec<String>>,
        cluster_addr: Option<String>,
    ) -> PyResult<()> {
        let _ = (
            peers,
            tls_cert,
            tls_key,
            tls_ca,
            cluster_port,
            seeds,
            cluster_addr,
        );
        Err(PyNotImplementedError::new_err(NO_CLUSTER))
    }

    /// Return True if at least one cluster peer is connected (always False: single-node).
    fn cluster_connected(&self) -> bool {
        false
    }

    /// Number of connected cluster peers (always 0: single-node).
    fn cluster_peers_count(&self) -> usize {
        0
    }

    /// Connected cluster peers (always empty: single-node).
    fn cluster_info<'py>(&self, py: Python<'py>) -> Bound<'py, PyList> {
        PyList::empty(py)
    }

    /// Dead-letter-queue entries of failed cluster sends (always empty: single-node).
    fn get_cluster_dlq_entries<'py>(&self, py: Python<'py>) -> Bound<'py, PyList> {
        PyList::empty(py)
    }

    /// Hot-reload cluster TLS certificates. Not implemented yet: raises NotImplementedError.
    fn reload_cluster_tls(
        &self,
        cert_path: String,
        key_path: String,
        ca_path: String,
    ) -> PyResult<()> {
        let _ = (cert_path, key_path, ca_path);
        Err(PyNotImplementedError::new_err(NO_CLUSTER))
    }

    // -- Health ---------------------------------------------------------------------------

    /// Full server health snapshot as a dict, with upstream's keys (the cluster ones are
    /// zero: single-node) and ours (`shards`, `draining`, `slow_consumer_drops`, ...).
    fn health_snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let server = self.server();
        let h = server.as_ref().map(|s| s.health_snapshot());
        let n = |f: fn(&wse_shards::HealthSnapshot) -> u64| h.as_ref().map_or(0, f);
        d.set_item("connections", h.as_ref().map_or(0, |h| h.connections))?;
        d.set_item("inbound_queue_depth", n(|h| h.inbound_queue_depth))?;
        d.set_item("inbound_dropped", n(|h| h.inbound_dropped))?;
        d.set_item("cluster_connected", false)?;
        for key in [
            "cluster_peer_count",
            "cluster_messages_sent",
            "cluster_messages_delivered",
            "cluster_messages_dropped",
            "cluster_bytes_sent",
            "cluster_bytes_received",
            "cluster_reconnect_count",
            "cluster_unknown_message_types",
            "cluster_dlq_size",
        ] {
            d.set_item(key, 0)?;
        }
        d.set_item(
            "uptime_secs",
            h.as_ref().map_or(0.0, |h| h.uptime.as_secs_f64()),
        )?;
        d.set_item("recovery_enabled", self.cfg.recovery.enabled)?;
        d.set_item("recovery_topic_count", n(|h| h.recovery_topics))?;
        d.set_item("recovery_total_bytes", n(|h| h.recovery_bytes))?;
        d.set_item("presence_enabled", self.cfg.presence.enabled)?;
        d.set_item("presence_topics", n(|h| h.presence_topics))?;
        d.set_item("presence_total_users", n(|h| h.presence_users))?;
        // Ours.
        d.set_item("running", h.as_ref().is_some_and(|h| h.running))?;
        d.set_item("draining", h.as_ref().is_some_and(|h| h.draining))?;
        d.set_item("shards", h.as_ref().map_or(0, |h| h.shards))?;
        d.set_item("slow_consumer_drops", n(|h| h.slow_consumer_drops))?;
        d.set_item("fabric_overflow_drops", n(|h| h.fabric_overflow_drops))?;
        Ok(d)
    }

    /// Prometheus exposition text with upstream's series, in upstream's order: the server's
    /// gauges and counters, the topics', the cluster's (all 0: no cluster), recovery and
    /// presence. `wse_topic_messages_total{topic}` lists the topics with the most publications
    /// (upstream's top 50), and only when there is one, as upstream.
    fn prometheus_metrics(&self, py: Python<'_>) -> PyResult<String> {
        let Some(server) = self.server() else {
            return Ok(String::new());
        };
        let h = server.health_snapshot();
        let topics = wait(py, server.topic_stats(TOPIC_SERIES_MAX))?.map_err(command_error)?;
        let sum = |f: fn(&wse_shards::metrics::ShardMetrics) -> u64| -> u64 {
            server.metrics().iter().map(|m| f(m)).sum()
        };
        let rejected = sum(|m| m.rejected.iter().map(|c| c.get()).sum());
        let gauge = "gauge";
        let counter = "counter";
        let series: [(&str, &str, &str, String); 25] = [
            (
                "wse_connections",
                gauge,
                "Current active WebSocket connections",
                h.connections.to_string(),
            ),
            (
                "wse_inbound_queue_depth",
                gauge,
                "Drain queue backlog",
                h.inbound_queue_depth.to_string(),
            ),
            (
                "wse_uptime_seconds",
                gauge,
                "Server uptime in seconds",
                format!("{:.1}", h.uptime.as_secs_f64()),
            ),
            (
                "wse_topics",
                gauge,
                "Topics with a subscriber or queue-group member",
                topics.subscribed.to_string(),
            ),
            (
                "wse_messages_received_total",
                counter,
                "Total messages received from clients",
                sum(|m| m.messages_in_total.get()).to_string(),
            ),
            (
                "wse_messages_sent_total",
                counter,
                "Total messages sent to clients",
                sum(|m| m.messages_out_total.get()).to_string(),
            ),
            (
                "wse_connections_accepted_total",
                counter,
                "Total connections accepted",
                sum(|m| m.connections_accepted_total.get()).to_string(),
            ),
            (
                "wse_connections_rejected_total",
                counter,
                "Total connections rejected (connection limit, pending handshakes, bad or timed-out upgrades, no file descriptor)",
                rejected.to_string(),
            ),
            (
                "wse_bytes_received_total",
                counter,
                "Total bytes received from clients",
                sum(|m| m.bytes_in_total.get()).to_string(),
            ),
            (
                "wse_bytes_sent_total",
                counter,
                "Total bytes sent to clients",
                sum(|m| m.bytes_out_total.get()).to_string(),
            ),
            (
                "wse_auth_failures_total",
                counter,
                "Total authentication failures",
                sum(|m| m.auth_failures_total.get()).to_string(),
            ),
            (
                "wse_rate_limited_total",
                counter,
                "Total messages dropped by rate limiter",
                sum(|m| m.rate_limited_total.get()).to_string(),
            ),
            (
                "wse_inbound_dropped_total",
                counter,
                "Drain queue events dropped",
                h.inbound_dropped.to_string(),
            ),
            (
                "wse_slow_consumer_drops_total",
                counter,
                "Connections closed for not reading (4413)",
                h.slow_consumer_drops.to_string(),
            ),
            (
                "wse_cluster_peers",
                gauge,
                "Connected cluster peers",
                "0".into(),
            ),
            (
                "wse_cluster_messages_sent_total",
                counter,
                "Messages sent to cluster peers",
                "0".into(),
            ),
            (
                "wse_cluster_messages_delivered_total",
                counter,
                "Messages delivered from cluster peers",
                "0".into(),
            ),
            (
                "wse_cluster_messages_dropped_total",
                counter,
                "Messages dropped in cluster",
                "0".into(),
            ),
            (
                "wse_cluster_bytes_sent_total",
                counter,
                "Bytes sent to cluster peers",
                "0".into(),
            ),
            (
                "wse_cluster_bytes_received_total",
                counter,
                "Bytes received from cluster peers",
                "0".into(),
            ),
            (
                "wse_cluster_reconnects_total",
                counter,
                "Cluster peer reconnections",
                "0".into(),
            ),
            (
                "wse_recovery_topics",
                gauge,
                "Topics with recovery buffers",
                h.recovery_topics.to_string(),
            ),
            (
                "wse_recovery_bytes",
                gauge,
                "Total bytes in recovery buffers",
                h.recovery_bytes.to_string(),
            ),
            (
                "wse_presence_topics",
                gauge,
                "Topics with presence tracking",
                h.presence_topics.to_string(),
            ),
            (
                "wse_presence_users",
                gauge,
                "Total users across all topics",
                h.presence_users.to_string(),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in &series {
            if *name == "wse_presence_topics" && !topics.publications.is_empty() {
                // Upstream's place for it: after recovery's, before presence's.
                let name = "wse_topic_messages_total";
                let _ = write!(
                    out,
                    "# HELP {name} Publications per topic while the server keeps the topic \
                     (top {TOPIC_SERIES_MAX})\n# TYPE {name} counter\n"
                );
                for (topic, n) in &topics.publications {
                    let _ = writeln!(out, "{name}{{topic=\"{}\"}} {n}", label_value(topic));
                }
            }
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        }
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!(
            "RustWSEServer(listen={}, running={})",
            self.cfg.server.listen,
            self.is_running()
        )
    }
}

impl RustWSEServer {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn server(&self) -> Option<Arc<Server>> {
        self.lock().server.clone()
    }

    fn running(&self) -> PyResult<Arc<Server>> {
        self.server()
            .ok_or_else(|| PyRuntimeError::new_err("the server is not running: call start() first"))
    }

    fn publish(&self, py: Python<'_>, topic: &str, data: String) -> PyResult<()> {
        let server = self.running()?;
        let data = with_category(data);
        match py.detach(|| server.broadcast_text(topic, &data)) {
            Ok(()) => Ok(()),
            Err(PublishError::NotAnObject) => Err(not_an_object()),
            Err(PublishError::InvalidTopic(why)) => Err(PyValueError::new_err(format!(
                "invalid topic {topic:?}: {why}"
            ))),
            Err(PublishError::Overloaded) => {
                warn(py, "broadcast dropped: the topic owner's queue is full")
            }
        }
    }
}

impl Drop for RustWSEServer {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = &st.dispatcher {
            // Not joined: it may be waiting for the GIL this thread holds. It exits on its own.
            d.stop.store(true, Ordering::Release);
        }
        if let Some(server) = &st.server {
            server.shutdown();
        }
    }
}

impl Dispatcher {
    /// Starts the thread that takes events from the shards (without the GIL) and calls the
    /// callbacks (with it).
    fn spawn(server: Arc<Server>, cb: Arc<Callbacks>) -> Dispatcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wse-py-callbacks".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) && server.shards_running() {
                    let events = server.drain_inbound(CALLBACK_BATCH, WAIT_SLICE);
                    if events.is_empty() || flag.load(Ordering::Acquire) {
                        continue;
                    }
                    Python::attach(|py| {
                        for e in &events {
                            if let Err(err) = cb.call(py, e) {
                                err.print(py);
                            }
                        }
                    });
                }
            })
            .expect("spawn the callback thread");
        Dispatcher { stop, thread }
    }
}

impl Callbacks {
    fn call(&self, py: Python<'_>, e: &AppEvent) -> PyResult<()> {
        let Some(conn) = e.conn.map(|c| c.to_string()) else {
            return Ok(());
        };
        match e.kind {
            AppEventKind::Connect => self.on_connect.call1(py, (conn, "")).map(drop),
            AppEventKind::AuthConnect => self
                .on_connect
                .call1(py, (conn, convert::auth_user(e)))
                .map(drop),
            AppEventKind::Msg | AppEventKind::Raw | AppEventKind::Bin => {
                let data = match convert::message(py, e)? {
                    Message::Msg(d) | Message::Raw(d) | Message::Bin(d) => d,
                };
                self.on_message.call1(py, (conn, data)).map(drop)
            }
            AppEventKind::Disconnect => self.on_disconnect.call1(py, (conn,)).map(drop),
            // No rpc events here: the embedded server never says it answers rpcs.
            AppEventKind::PresenceJoin | AppEventKind::PresenceLeave | AppEventKind::Rpc => Ok(()),
        }
    }
}

/// Waits for an engine answer without the GIL.
fn wait<T: Send>(py: Python<'_>, fut: impl std::future::Future<Output = T> + Send) -> PyResult<T> {
    py.detach(|| block_on_timeout(fut, COMMAND_TIMEOUT))
        .ok_or_else(|| PyRuntimeError::new_err("the engine did not answer in 10 s"))
}

/// Upstream ignores commands for connections that are gone (or were never there), and a send
/// the connection could not take (it is closed with 4413 then): `None`.
fn ignore_gone<T>(r: Result<T, CommandError>) -> PyResult<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(CommandError::UnknownConnection | CommandError::SlowConsumer) => Ok(None),
        Err(e) => Err(command_error(e)),
    }
}

fn command_error(e: CommandError) -> PyErr {
    match e {
        CommandError::InvalidTopic(_)
        | CommandError::InvalidEvent(_)
        | CommandError::InvalidCloseCode(_) => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

fn query_error(e: QueryError) -> PyErr {
    match e {
        QueryError::InvalidTopic(_) => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

fn start_error(e: StartError) -> PyErr {
    match e {
        StartError::Bind { .. } => PyOSError::new_err(e.to_string()),
        StartError::Config(_) => PyValueError::new_err(e.to_string()),
        StartError::Shard { .. } | StartError::Flusher(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// The topics `wse_topic_messages_total` lists, most publications first: upstream's top 50.
const TOPIC_SERIES_MAX: usize = 50;

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn not_an_object() -> PyErr {
    PyValueError::new_err(
        "broadcast data that starts with '{' must be a JSON object's text (this engine stamps \
         recovery positions inside it); other text is sent as it is",
    )
}

/// Upstream's broadcast puts `"c":"U"` (the user-message category) first in a JSON object that
/// has a `t` and no `c` (whatever their values); anything else is left as it is.
fn with_category(data: String) -> String {
    use serde::{Deserialize, Deserializer, de::IgnoredAny};

    /// Which of the two keys the object has (a missing key is `false`).
    #[derive(Deserialize)]
    struct Keys {
        #[serde(default, deserialize_with = "present")]
        t: bool,
        #[serde(default, deserialize_with = "present")]
        c: bool,
    }
    fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        IgnoredAny::deserialize(d).map(|_| true)
    }

    let Some(brace) = data.find(|ch: char| !ch.is_whitespace()) else {
        return data;
    };
    if !data[brace..].starts_with('{') {
        return data;
    }
    match serde_json::from_str::<Keys>(&data) {
        Ok(Keys { t: true, c: false }) => {
            let mut out = String::with_capacity(data.len() + 9);
            out.push_str(&data[..=brace]);
            out.push_str("\"c\":\"U\",");
            out.push_str(&data[brace + 1..]);
            out
        }
        _ => data,
    }
}

fn warn_failed(py: Python<'_>, failed: &[wse_shards::protocol::FailedTopic]) -> PyResult<()> {
    if failed.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = failed
        .iter()
        .map(|f| format!("{} ({})", f.topic, f.reason))
        .collect();
    warn(py, &format!("topics refused: {}", list.join(", ")))
}

/// A `RuntimeWarning` from the caller's line.
pub fn warn(py: Python<'_>, message: &str) -> PyResult<()> {
    let message = CString::new(message.replace('\0', " ")).expect("no NUL left");
    PyErr::warn(py, py.get_type::<PyRuntimeWarning>().as_any(), &message, 1)
}
