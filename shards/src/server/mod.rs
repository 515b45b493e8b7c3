//! Starting and stopping the engine: one thread per shard, the fabric between them, and the
//! handle the control plane (or an embedding application) uses.
//!
//! Owns: boot order, the shard threads, the control plane's end of the fabric, the running
//! configuration and its reloads. Never: parses configuration files or flags (the binary does).
//!
//! Start-up binds every listener before any thread starts (so "address in use" fails `start`
//! cleanly), then starts the shards and waits until each reports its runtime ready; a shard that
//! fails is reported with the others stopped.
//!
//! The rest of the handle's API lives in submodules: `commands` (connections and users),
//! `topics` (broadcasts, presence, counts), `inbound` (application events), `builder`,
//! and `wait` (driving its futures without an async runtime).

mod builder;
mod commands;
mod flusher;
mod inbound;
mod topics;
mod wait;

pub use builder::Builder;
pub use commands::HealthSnapshot;
pub use topics::HistoryPage;
pub use wait::{block_on, block_on_timeout};

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::accept;
use crate::admission::Admission;
use crate::auth::Authenticator;
use crate::config::{Config, ConfigError, Reloaded};
use crate::fabric::Reload;
use crate::fabric::{self, Endpoint, FabricMsg, Sent};
use crate::metrics::ShardMetrics;
use crate::runtime::{self, Boot};
use crate::shard::Shared;

/// How long [`Server::reload`] waits for every shard to confirm the new configuration. A shard
/// handles the fabric once per loop turn, so anything near this means it is stuck.
const RELOAD_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration was refused before anything was bound.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// A shard's listening socket could not be created or bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address in `server.listen`.
        addr: SocketAddr,
        /// What the kernel said (in use, permission, no such address).
        source: io::Error,
    },
    /// A shard thread could not be spawned or its io_uring runtime built.
    #[error("shard {shard} failed to start: {source}")]
    Shard {
        /// The shard that failed.
        shard: usize,
        /// Why its thread or runtime could not start.
        source: io::Error,
    },
    /// The thread that moves held-back fabric entries on could not be spawned.
    #[error("cannot start the fabric's flush thread: {0}")]
    Flusher(io::Error),
}

/// Why a publication was not accepted by the engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The topic is empty, too long or has characters topics may not have.
    #[error("invalid topic: {0}")]
    InvalidTopic(&'static str),
    /// A broadcast message must be a JSON object (recovery stamps go inside it).
    #[error("the message must be a JSON object")]
    NotAnObject,
    /// The queue to the owner shard (and its overflow) is full; retry later.
    #[error("the owner shard's queue is full")]
    Overloaded,
}

/// Why a question to the shards got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The topic is empty, too long or has characters topics may not have.
    #[error("invalid topic: {0}")]
    InvalidTopic(&'static str),
    /// Presence is off (`presence.enabled = false`).
    #[error("presence is not enabled on this server")]
    PresenceDisabled,
    /// The queue to the owner shard (and its overflow) is full; retry later.
    #[error("the owner shard's queue is full")]
    Overloaded,
}

/// One member of a topic, as a presence query returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceMember {
    /// The member's user id (JWT `sub`).
    pub user_id: String,
    /// Connections of this user subscribed to the topic, across all shards.
    pub connections: u32,
    /// The member's data, JSON text.
    pub data: String,
}

/// What [`Server::reload`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadReport {
    /// Keys whose new value is now in effect.
    pub applied: Vec<String>,
    /// Keys that changed but keep their running value until a restart (see
    /// [`crate::config::RESTART_KEYS`]).
    pub needs_restart: Vec<&'static str>,
    /// Shards that confirmed running with the new configuration within the wait, out of
    /// [`Server::shard_count`]; one that has not keeps the old configuration until it does.
    pub confirmed: usize,
}

/// A running engine.
///
/// Every method is safe to call from any thread; commands reach the shard that owns the
/// connection or topic through the fabric, so none takes a global lock. The async ones can be
/// awaited on any executor or driven with [`block_on`]. A whole program (a chat backend) is in
/// `examples/embedded-chat`; in short:
///
/// ```no_run
/// use std::time::Duration;
/// use serde_json::value::RawValue;
/// use wse_shards::{AppEventKind, Server, block_on, command::AppSubscribe};
///
/// let server = Server::builder()
///     .listen("127.0.0.1:5007".parse().unwrap())
///     .configure(|cfg| cfg.presence.enabled = true)
///     .start()
///     .expect("started");
/// // Application events: connects, client messages the server does not handle, disconnects.
/// for event in server.drain_inbound(256, Duration::from_millis(100)) {
///     let (AppEventKind::Connect, Some(conn)) = (event.kind, event.conn) else { continue };
///     // Put every new connection in the lobby and greet it.
///     let sub = AppSubscribe { topics: vec!["lobby".into()], ..Default::default() };
///     block_on(server.subscribe_connection(conn, sub)).expect("subscribed");
///     block_on(server.send_event(conn, r#"{"t":"welcome","p":{}}"#)).expect("sent");
/// }
/// let data = RawValue::from_string(r#"{"text":"hello, lobby"}"#.into()).unwrap();
/// server.publish("lobby", "chat", &data).expect("published");
/// println!("{} connections", server.get_connection_count());
/// server.stop(Duration::from_secs(5));
/// ```
pub struct Server {
    shared: Arc<Shared>,
    /// The running configuration, replaced by each reload; the lock also serialises reloads.
    running: Mutex<Arc<Config>>,
    threads: Mutex<Vec<JoinHandle<io::Result<()>>>>,
    metrics: Vec<Arc<ShardMetrics>>,
    /// The control plane's end of the fabric; also flushed by `flusher`.
    control: Arc<Mutex<Endpoint>>,
    /// Moves what `control` held back for a full queue on, between API calls.
    flusher: flusher::Flusher,
    /// The application-event requests in flight to each shard (see [`Server::drain_inbound`]).
    inbound: Mutex<inbound::Inbound>,
    /// A drain was requested: the shards are closing their connections and will exit.
    draining: std::sync::atomic::AtomicBool,
    /// The cluster core's end of the fabric, until the cluster core takes it
    /// ([`Server::take_cluster_endpoint`]).
    cluster: Mutex<Option<Endpoint>>,
    local_addr: SocketAddr,
    started: Instant,
}

impl Server {
    /// Validates `cfg`, binds the listeners and starts one shard per core.
    ///
    /// # Errors
    /// Bad configuration, a listener that cannot bind, a shard runtime that cannot start.
    pub fn start(cfg: Config) -> Result<Server, StartError> {
        cfg.validate()?;
        let shards = cfg.shard_count();
        let auth = if cfg.auth.enabled {
            Some(Arc::new(Authenticator::new(&cfg.auth)?))
        } else {
            None
        };
        // The CPUs this process may run on (its affinity mask, e.g. a systemd CPUAffinity=), so
        // that an instance confined to CPUs 16-31 pins shard 0 to CPU 16.
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let pin = cfg.server.pin_threads && !cores.is_empty();
        let core_of = |shard: usize| pin.then(|| cores[shard % cores.len()]);
        let cpus: Vec<Option<usize>> = (0..shards).map(|i| core_of(i).map(|c| c.id)).collect();
        let (local_addr, listeners) =
            accept::bind_all(cfg.server.listen, &cpus).map_err(|source| StartError::Bind {
                addr: cfg.server.listen,
                source,
            })?;
        let plan = cfg.fabric_plan().map_err(|e| ConfigError {
            key: "limits.fabric_memory_per_shard",
            problem: e.to_string(),
        })?;
        tracing::info!(
            "fabric: {} participants, {} queues of {} entries ({} MiB of slots, touched as \
             traffic fills them), at most {} MiB in flight per participant; {} MiB in all",
            plan.participants,
            plan.participants * (plan.participants - 1),
            plan.capacity,
            plan.ring_bytes >> 20,
            plan.inflight_max >> 20,
            plan.total_bytes >> 20,
        );
        let mut endpoints = fabric::grid(plan.participants, plan.capacity, plan.inflight_max);
        let cluster = endpoints.pop().expect("grid has the extra participants");
        let control = endpoints.pop().expect("grid has the extra participants");

        let metrics: Vec<Arc<ShardMetrics>> = (0..shards).map(|_| Arc::default()).collect();
        let cfg = Arc::new(cfg);
        let shared = Arc::new(Shared {
            admission: Admission::new(cfg.server.max_connections),
            cfg: cfg.clone(),
            auth,
            shutdown: Default::default(),
            app_rpc: Default::default(),
            shards,
            metrics: metrics.clone(),
        });
        let control = Arc::new(Mutex::new(control));
        let flusher = flusher::Flusher::start(control.clone()).map_err(StartError::Flusher)?;
        let server = Server {
            shared: shared.clone(),
            running: Mutex::new(cfg),
            threads: Mutex::new(Vec::with_capacity(shards)),
            metrics: metrics.clone(),
            control,
            flusher,
            inbound: Mutex::new(inbound::Inbound::new(shards)),
            draining: Default::default(),
            cluster: Mutex::new(Some(cluster)),
            local_addr,
            started: Instant::now(),
        };
        // From here on, a failure stops every shard started so far (`stop` joins them).
        let (ready_tx, ready_rx) = mpsc::channel();
        for (id, (fabric, listener)) in endpoints.into_iter().zip(listeners).enumerate() {
            let boot = Boot {
                id,
                shared: shared.clone(),
                fabric,
                listener,
                metrics: metrics[id].clone(),
                core: core_of(id),
                ready: ready_tx.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("wse-shard-{id}"))
                .spawn(move || runtime::run(boot));
            match spawned {
                Ok(t) => server
                    .threads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(t),
                Err(source) => {
                    server.stop(Duration::from_secs(1));
                    return Err(StartError::Shard { shard: id, source });
                }
            }
        }
        // Each shard drops its sender once it reported: a shard that dies before reporting ends
        // the wait below instead of blocking it.
        drop(ready_tx);
        for shard in 0..shards {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    server.stop(Duration::from_secs(1));
                    return Err(StartError::Shard { shard, source });
                }
                Err(_) => {
                    server.stop(Duration::from_secs(1));
                    return Err(StartError::Shard {
                        shard,
                        source: io::Error::other("shard thread exited during start-up"),
                    });
                }
            }
        }
        Ok(server)
    }

    /// The cluster core's end of the fabric, once (`None` after): with `cluster.enabled`, the
    /// shards advertise each topic's interest to it and hand it every publication made on this
    /// node, and it hands them the publications of other nodes (docs/CLUSTER.md, "Fabric
    /// wiring"). Whoever enables the cluster must run a core on this endpoint (the `wse-server`
    /// binary does): without one, subscriptions wait for a confirmation that never comes.
    pub fn take_cluster_endpoint(&self) -> Option<Endpoint> {
        self.cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The address the WebSocket listeners are bound to (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The running configuration: as started, then as last reloaded.
    pub fn config(&self) -> Arc<Config> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies a new configuration to the running server: every key except
    /// [`crate::config::RESTART_KEYS`] (see [`Config::reloaded`]). A new JWT verifier is built
    /// from `[auth]` (key files are read again), so a rotated key takes effect for every
    /// connection that authenticates from now on; connections already authenticated stay.
    /// Returns once every shard has confirmed, or after a bounded wait (see
    /// [`ReloadReport::confirmed`]).
    ///
    /// # Errors
    /// An invalid configuration or an unreadable key file; nothing is applied then.
    pub fn reload(&self, next: Config) -> Result<ReloadReport, ConfigError> {
        next.validate()?;
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let Reloaded {
            config,
            needs_restart,
        } = running.reloaded(&next);
        config.validate()?;
        let auth = if config.auth.enabled {
            Some(Arc::new(Authenticator::new(&config.auth)?))
        } else {
            None
        };
        let applied = running.changed_keys(&config);
        let config = Arc::new(config);
        self.shared.admission.set_max(config.server.max_connections);
        let (reload, confirmations) = Reload::new(config.clone(), auth);
        *running = config;
        let mut sent = 0;
        {
            let mut ep = self.control.lock().unwrap_or_else(|e| e.into_inner());
            for shard in 0..self.shared.shards {
                if ep.send(shard, FabricMsg::Reload(reload.clone())) == Sent::Queued {
                    sent += 1;
                }
            }
            // A full queue holds the entry back in the control plane's overflow, which only a
            // flush moves on: keep flushing while waiting rather than leave it for the next
            // publication.
            let deadline = Instant::now() + RELOAD_CONFIRM_TIMEOUT;
            while ep.flush() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Held until every shard has its message queued, so that two reloads reach every shard
        // in the order they took the lock.
        drop(running);
        drop(reload);
        let deadline = Instant::now() + RELOAD_CONFIRM_TIMEOUT;
        let mut confirmed = 0;
        while confirmed < sent {
            let left = deadline.saturating_duration_since(Instant::now());
            match confirmations.recv_timeout(left) {
                Ok(_) => confirmed += 1,
                Err(_) => break,
            }
        }
        Ok(ReloadReport {
            applied,
            needs_restart,
            confirmed,
        })
    }

    /// Whether every shard thread is still running (none has exited or panicked).
    pub fn shards_running(&self) -> bool {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.len() == self.shared.shards && threads.iter().all(|t| !t.is_finished())
    }

    /// Rings every shard's doorbell: each runs one loop turn even when idle, which advances its
    /// `loop_turns` heartbeat. A watchdog pokes, waits, and checks that every heartbeat moved.
    pub fn poke_shards(&self) {
        let ep = self.control.lock().unwrap_or_else(|e| e.into_inner());
        for shard in 0..self.shared.shards {
            ep.doorbells().ring(shard);
        }
    }

    /// How many shards (threads) the server runs.
    pub fn shard_count(&self) -> usize {
        self.shared.shards
    }

    /// Per-shard metrics, in shard order.
    pub fn metrics(&self) -> &[Arc<ShardMetrics>] {
        &self.metrics
    }

    /// Live WebSocket connections across all shards.
    pub fn connection_count(&self) -> usize {
        self.shared.admission.live()
    }

    /// Time since the server started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Asks every shard to drain: stop accepting, close each connection with
    /// `server.shutdown_close_code`, and exit once all are gone or `server.drain_timeout` passed.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        let ep = self.control.lock().unwrap_or_else(|e| e.into_inner());
        for shard in 0..self.shared.shards {
            ep.doorbells().ring(shard);
        }
    }

    /// Requests shutdown and waits up to `grace` beyond the drain timeout for the shards.
    /// Returns whether every shard exited in time.
    pub fn stop(&self, grace: Duration) -> bool {
        self.shutdown();
        let deadline = Instant::now() + self.config().server.drain_timeout + grace;
        let mut clean = true;
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                match t.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "shard failed");
                        clean = false;
                    }
                    Err(_) => clean = false,
                }
            } else {
                clean = false;
            }
        }
        self.flusher.stop();
        clean
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let running = !self.threads.get_mut().map(|t| t.is_empty()).unwrap_or(true);
        if running {
            self.stop(Duration::from_secs(1));
        }
    }
}

// The binary shares the handle with the control-plane thread.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Server>();
};
