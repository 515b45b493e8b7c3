//! What every scenario shares: the common flags, connection plans (target, source address and
//! token per connection), the load-generator threads, phases, Ctrl-C, progress lines, and CPU /
//! memory samples of the server and of ourselves.
//!
//! Threading model: the coordinator (the calling thread) is synchronous; it plans, starts N
//! worker threads (each a tokio current-thread runtime with a `LocalSet`, running thousands of
//! lean connection tasks), moves them through [`Phase`]s with a `watch` channel, prints progress
//! and samples `/proc`. Workers return their own histograms and tallies when they finish, and
//! the coordinator merges them: nothing on the per-message path is shared between threads.

pub mod connect_storm;
pub mod fanout;
pub mod floor;
pub mod hold;
pub mod inbound;
pub mod ping;
pub mod recovery;

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::centrifuge;
use crate::conn::{Conn, ConnError, Dialect, Endpoint, Target};
use crate::dist::controller::Agents;
use crate::fleet::{ErasedRun, Slice, Workload, start_erased};
use crate::report::Report;
use crate::sys;

/// The upstream peer's default JWT secret (`wse_upstream_server.py` DEFAULT_SECRET).
pub const DEFAULT_SECRET: &str = "wse-peer-benchmark-secret-not-for-production-0123456789";
/// JWT `sub` of publishing connections: the upstream peer is started with `--publishers publisher`.
pub const PUBLISHER_SUB: &str = "publisher";
/// Token lifetime: longer than any run.
const TOKEN_TTL_S: u64 = 24 * 3600;
/// Progress lines on stderr this often during long phases.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often waiting loops look at their condition and at Ctrl-C.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// Which server is measured; decides nothing on the wire today (both take the same messages)
/// but is recorded with the results and selects server-specific notes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Wse,
    Upstream,
    /// Upstream's launcher (`wse_upstream_server.py`) on this repository's Python package.
    #[value(name = "wse-py")]
    #[serde(rename = "wse-py")]
    WsePy,
}

/// The client protocol of the measured connections (`--protocol`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Wse,
    /// The Centrifuge client protocol v2 on `--centrifuge-path` of each `--url`'s server.
    Centrifuge,
}

/// Centrifugo's (and wse-server's) default Centrifuge endpoint.
const DEFAULT_CENTRIFUGE_PATH: &str = "/connection/websocket";

fn default_centrifuge_path() -> String {
    DEFAULT_CENTRIFUGE_PATH.to_owned()
}

/// Flags every scenario takes. They travel to agents as JSON (all but the secret, which goes in
/// a field of its own so it never lands in a `--json` file).
#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
pub struct Common {
    /// Server URL(s), comma-separated; connections are spread round-robin.
    #[arg(long, value_delimiter = ',', default_value = "ws://127.0.0.1:5007/wse")]
    pub url: Vec<String>,
    /// Which server this is (recorded with the results).
    #[arg(long, value_enum, default_value_t = TargetKind::Wse)]
    pub target: TargetKind,
    /// Client protocol of the measured connections (connect-storm, hold, fanout's
    /// subscribers). `centrifuge` connects to `--centrifuge-path` on each `--url`'s host and
    /// port; fanout's publishers stay WSE connections on `--url`, so both protocols are fed
    /// through the same server path.
    #[arg(long, value_enum, default_value_t = Protocol::Wse)]
    #[serde(default)]
    pub protocol: Protocol,
    /// Encoding of Centrifuge connections (protobuf: subprotocol `centrifuge-protobuf`).
    #[arg(long, value_enum, default_value_t = centrifuge::Format::Json)]
    #[serde(default)]
    pub centrifuge_format: centrifuge::Format,
    /// Path of the Centrifuge endpoint.
    #[arg(long, default_value = DEFAULT_CENTRIFUGE_PATH)]
    #[serde(default = "default_centrifuge_path")]
    pub centrifuge_path: String,
    /// HS256 secret for minting tokens (the upstream peer's default).
    #[arg(long, env = "WSE_JWT_SECRET", default_value = DEFAULT_SECRET, hide_env_values = true)]
    #[serde(skip, default)]
    pub secret: String,
    /// Load-generator threads for connections (default: every usable core). Publishers get
    /// threads of their own.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Source addresses for outgoing connections, round-robin: `127.0.0.2-127.0.0.250`, or a
    /// comma list. Needed past ~28k connections per target, and to dodge TIME_WAIT between runs.
    #[arg(long, default_value = "")]
    pub source: String,
    /// Write every figure, the environment and the flags to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Server process(es) to sample RSS and CPU time from (/proc/PID), comma-separated, in
    /// the order of `--url` when there are several servers.
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub server_pid: Vec<u32>,
    /// Most connection handshakes in flight at once (over all threads).
    #[arg(long, default_value_t = 128)]
    pub inflight: usize,
    /// Time one connection may take from connect() to server_ready (and server_hello).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    /// Time the whole opening phase may take before the scenario goes on with what opened.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    #[serde(with = "secs")]
    pub open_timeout: Duration,
    /// Skip the client_hello / server_hello exchange after server_ready.
    #[arg(long)]
    pub no_hello: bool,
    /// Print no progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Run the connections on these agents (`wse-bench agent --listen ADDR`), comma-separated
    /// `host:port`; this process becomes the controller (see `dist`).
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub agents: Vec<String>,
}

/// `10s`, `250ms`, `2m` (humantime), or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| e.to_string());
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Durations appear in JSON as seconds.
pub fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// `#[serde(with = "secs")]`: a duration as seconds (what `--json` shows and agents read).
pub mod secs {
    use std::time::Duration;

    use serde::Deserialize;

    pub use super::ser_duration as serialize;

    /// Reads seconds.
    ///
    /// # Errors
    /// Not a non-negative finite number.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// What a scenario needs to open connections: parsed targets and sources, thread count, limits,
/// and the agents when this process is a controller.
pub struct Setup {
    pub common: Common,
    targets: Vec<Arc<Target>>,
    /// `targets` with the Centrifuge endpoint's path (`--protocol centrifuge`), else empty.
    centrifuge_targets: Vec<Arc<Target>>,
    sources: Vec<IpAddr>,
    pub threads: usize,
    /// RLIMIT_NOFILE after raising it.
    pub nofile: u64,
    /// Connected agents (`--agents`): connections are opened there, not here.
    pub agents: Option<Agents>,
    /// Threads of this process that stand in for the server (the `floor`'s sender): their CPU
    /// time is the server's when no `--server-pid` is given.
    pub server_tids: Vec<u32>,
    started: Instant,
}

impl Setup {
    /// Parses URLs and sources, raises RLIMIT_NOFILE, and connects to `--agents`.
    ///
    /// # Errors
    /// A bad URL or source specification, an HS256 secret under 32 bytes, or an agent that
    /// cannot be reached.
    pub fn new(common: Common) -> anyhow::Result<Self> {
        let mut setup = Self::parse(common)?;
        if !setup.common.agents.is_empty() {
            let agents = Agents::connect(&setup.common.agents)?;
            agents.listen()?;
            for a in agents.infos() {
                setup.log(&format!(
                    "agent {} ({}): RLIMIT_NOFILE {}, {} cores, {} threads, {} own source addresses",
                    a.addr, a.host, a.nofile, a.cores, a.threads, a.sources
                ));
            }
            setup.agents = Some(agents);
        }
        Ok(setup)
    }

    /// The setup of an agent's slice: `common` as the controller sent it, adjusted by the agent
    /// (secret, sources, threads); never connects to agents itself.
    ///
    /// # Errors
    /// As [`Setup::new`].
    pub fn for_agent(mut common: Common) -> anyhow::Result<Self> {
        common.agents.clear();
        common.json = None;
        common.server_pid.clear();
        Self::parse(common)
    }

    fn parse(common: Common) -> anyhow::Result<Self> {
        let targets = common
            .url
            .iter()
            .map(|u| Target::parse(u).map(Arc::new))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if targets.is_empty() {
            bail!("--url: at least one URL is needed");
        }
        let centrifuge_targets = match common.protocol {
            Protocol::Wse => Vec::new(),
            Protocol::Centrifuge => targets
                .iter()
                .map(|t| {
                    Arc::new(Target {
                        path: common.centrifuge_path.clone(),
                        ..Target::clone(t)
                    })
                })
                .collect(),
        };
        let sources = sys::parse_source_pool(&common.source)?;
        if common.secret.len() < 32 {
            bail!("--secret must be at least 32 bytes for HS256");
        }
        let threads = common.threads.unwrap_or_else(sys::usable_cores).max(1);
        Ok(Self {
            nofile: sys::raise_nofile_limit(),
            common,
            targets,
            centrifuge_targets,
            sources,
            threads,
            agents: None,
            server_tids: Vec::new(),
            started: Instant::now(),
        })
    }

    /// The parsed `--source` pool.
    pub fn sources(&self) -> &[IpAddr] {
        &self.sources
    }

    /// How many `--url` targets there are.
    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// Refuses `--agents` for a scenario that runs in one process only, with a note.
    pub fn local_only(&self, scenario: &str, why: &str, report: &mut Report) -> bool {
        if self.agents.is_none() {
            return true;
        }
        let msg = format!("{scenario} does not run on agents ({why}); drop --agents");
        self.log(&msg);
        report.note(msg);
        report.partial = true;
        false
    }

    /// Destination and source of measured connection `i` (round-robin over each list), in
    /// the `--protocol` of the run.
    pub fn endpoint(&self, i: usize) -> Endpoint {
        match self.common.protocol {
            Protocol::Wse => self.wse_endpoint(i),
            Protocol::Centrifuge => Endpoint {
                target: self.centrifuge_targets[i % self.centrifuge_targets.len()].clone(),
                dialect: Dialect::Centrifuge(self.common.centrifuge_format),
                ..self.wse_endpoint(i)
            },
        }
    }

    /// Destination and source of WSE connection `i` whatever `--protocol` says: fanout's
    /// publishers.
    pub fn wse_endpoint(&self, i: usize) -> Endpoint {
        Endpoint {
            target: self.targets[i % self.targets.len()].clone(),
            source: (!self.sources.is_empty()).then(|| self.sources[i % self.sources.len()]),
            dialect: Dialect::Wse,
        }
    }

    /// The protocol of the measured connections as recorded with the results: `wse`,
    /// `centrifuge-json` or `centrifuge-protobuf`.
    pub fn protocol_name(&self) -> &'static str {
        match (self.common.protocol, self.common.centrifuge_format) {
            (Protocol::Wse, _) => "wse",
            (Protocol::Centrifuge, centrifuge::Format::Json) => "centrifuge-json",
            (Protocol::Centrifuge, centrifuge::Format::Protobuf) => "centrifuge-protobuf",
        }
    }

    /// A fresh report stamped with the environment and this run's flags.
    pub fn report(&self, scenario: &'static str, args: &impl Serialize) -> Report {
        let mut r = Report::new(scenario, sys::Environment::read(self.nofile));
        r.set(
            "target",
            match self.common.target {
                TargetKind::Wse => "wse",
                TargetKind::Upstream => "upstream",
                TargetKind::WsePy => "wse-py",
            },
        );
        r.set("protocol", self.protocol_name());
        r.args = serde_json::json!({
            "common": self.common,
            "scenario": args,
            "argv": std::env::args().collect::<Vec<_>>(),
        });
        r
    }

    /// Adds a note when `n` connections cannot fit under RLIMIT_NOFILE.
    pub fn check_nofile(&self, n: usize, report: &mut Report) {
        let room = self.nofile.saturating_sub(sys::NOFILE_RESERVE);
        if n as u64 > room {
            let msg = format!(
                "{n} connections exceed RLIMIT_NOFILE {} (hard limit, minus {} reserved): \
                 at most ~{room} can open from this process; use several processes or targets",
                self.nofile,
                sys::NOFILE_RESERVE
            );
            self.log(&msg);
            report.note(msg);
        }
    }

    /// Mints an HS256 token for `sub`, allowed to publish everywhere when `publisher`
    /// (wse-server reads `wse_publish`; the upstream peer checks `sub` against `--publishers`).
    pub fn token(&self, sub: &str, publisher: bool) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut claims = serde_json::json!({"sub": sub, "iat": now, "exp": now + TOKEN_TTL_S});
        if publisher {
            claims["wse_publish"] = serde_json::json!({"allow": ["*"]});
        }
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(self.common.secret.as_bytes()),
        )
        .expect("HS256 encoding of JSON claims cannot fail")
    }

    /// One line on stderr, prefixed with the time since start (unless `--quiet`).
    pub fn log(&self, line: &str) {
        if !self.common.quiet {
            eprintln!("[{:7.2}s] {line}", self.started.elapsed().as_secs_f64());
        }
    }

    /// Per-thread share of `--inflight` (at least one each).
    pub fn inflight_per_thread(&self) -> usize {
        self.common.inflight.div_ceil(self.threads).max(1)
    }

    /// Samples the server process(es), summed, when `--server-pid` was given.
    pub fn server_sample(&self) -> Option<ServerSample> {
        let each = self.server_samples()?;
        Some(ServerSample {
            rss_bytes: each.iter().map(|s| s.rss_bytes).sum(),
            cpu_s: each.iter().map(|s| s.cpu_s).sum(),
        })
    }

    /// Samples every `--server-pid`, in order; `None` when none was given or one is gone.
    pub fn server_samples(&self) -> Option<Vec<ServerSample>> {
        if self.common.server_pid.is_empty() && !self.server_tids.is_empty() {
            // Threads of this process have no RSS of their own: 0, and no scenario that runs
            // the floor reports it.
            let cpu_s = self
                .server_tids
                .iter()
                .map(|&tid| sys::thread_cpu_seconds(tid))
                .sum::<Option<f64>>()?;
            return Some(vec![ServerSample {
                rss_bytes: 0,
                cpu_s,
            }]);
        }
        if self.common.server_pid.is_empty() {
            return None;
        }
        self.common
            .server_pid
            .iter()
            .map(|&pid| {
                Some(ServerSample {
                    rss_bytes: sys::rss_bytes(pid)?,
                    cpu_s: sys::process_cpu_seconds(pid)?,
                })
            })
            .collect()
    }
}

/// One reading of the server process.
#[derive(Clone, Copy, Debug)]
pub struct ServerSample {
    pub rss_bytes: u64,
    pub cpu_s: f64,
}

/// A connection to open: its index (for topic and thread assignment), endpoint and token.
#[derive(Clone, Debug)]
pub struct Plan {
    pub index: usize,
    pub endpoint: Endpoint,
    pub token: Arc<str>,
}

impl Setup {
    /// Plans `n` connections with subjects `<prefix>-<i>`, dealt to the threads round-robin.
    /// Tokens are minted here, before any clock starts.
    pub fn plans(&self, n: usize, prefix: &str) -> Vec<Vec<Plan>> {
        self.plans_slice(
            Slice {
                offset: 0,
                count: n,
            },
            prefix,
        )
    }

    /// Plans the connections of `slice` (global indexes, so subjects, topics and targets are
    /// those of the same connections in a local run).
    pub fn plans_slice(&self, slice: Slice, prefix: &str) -> Vec<Vec<Plan>> {
        let n = slice.count;
        let mut per_thread = vec![Vec::with_capacity(n / self.threads + 1); self.threads];
        for (local, i) in (slice.offset..slice.offset + n).enumerate() {
            per_thread[local % self.threads].push(Plan {
                index: i,
                endpoint: self.endpoint(i),
                token: self.token(&format!("{prefix}-{i}"), false).into(),
            });
        }
        per_thread
    }
}

/// Where the run is; workers watch it, the coordinator moves it forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Connections are being opened (and subscribed).
    Open,
    /// Load runs, figures are not recorded.
    Warmup,
    /// Load runs and figures are recorded.
    Measure,
    /// Load has ended; what is in flight arrives (no new disturbance, e.g. no more churn).
    Drain,
    /// Everyone stops; workers close their connections and return their figures.
    Stop,
}

/// Starts the workload named `scenario` for `slice` from JSON flags: what an agent runs.
///
/// # Errors
/// An unknown or local-only scenario, or flags that do not parse.
pub fn start_part(
    scenario: &str,
    setup: &Setup,
    args: serde_json::Value,
    slice: Slice,
) -> anyhow::Result<Box<dyn ErasedRun>> {
    match scenario {
        connect_storm::Storm::NAME => start_erased::<connect_storm::Storm>(setup, args, slice),
        hold::Hold::NAME => start_erased::<hold::Hold>(setup, args, slice),
        ping::Ping::NAME => start_erased::<ping::Ping>(setup, args, slice),
        inbound::Inbound::NAME => start_erased::<inbound::Inbound>(setup, args, slice),
        other => bail!("scenario {other:?} does not run on agents"),
    }
}

/// Waits until the phase is at least `p`.
pub async fn reached(rx: &mut watch::Receiver<Phase>, p: Phase) {
    let _ = rx.wait_for(|now| *now >= p).await;
}

/// Counters the coordinator prints while waiting; written by workers with relaxed atomics.
#[derive(Debug, Default)]
pub struct Progress {
    pub opened: AtomicU64,
    /// Connections done with their setup (subscribed, or hello'd): ready for load.
    pub ready: AtomicU64,
    pub failed: AtomicU64,
    pub closed: AtomicU64,
    pub messages: AtomicU64,
}

impl Progress {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

fn stop_flag() -> &'static Arc<AtomicBool> {
    STOP.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// First Ctrl-C (SIGINT) or SIGTERM: finish the current phase early and print partial
/// results. A second one exits at once with status 130.
///
/// # Errors
/// The handlers cannot be installed.
pub fn install_signal_handlers() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = stop_flag().clone();
    for sig in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag as it was before this signal set it.
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())
            .context("installing signal handlers")?;
        signal_hook::flag::register(sig, flag.clone()).context("installing signal handlers")?;
    }
    Ok(())
}

/// Whether a stop was requested.
pub fn stop_requested() -> bool {
    stop_flag().load(Ordering::Relaxed)
}

/// Asks every phase to end (used by tests and by scenarios ending early on fatal errors).
pub fn request_stop() {
    stop_flag().store(true, Ordering::Relaxed);
}

/// Starts `n` worker threads, each running `f(thread_index)` on its own current-thread tokio
/// runtime inside a `LocalSet` (so connection tasks are `spawn_local`ed and share `Rc` state).
/// Each thread's kernel id is pushed to `tids` for CPU accounting.
///
/// # Panics
/// When a thread or runtime cannot be created (out of resources at start-up).
pub fn spawn_workers<R, F, Fut>(
    n: usize,
    name: &str,
    tids: &Arc<Mutex<Vec<u32>>>,
    f: F,
) -> Vec<std::thread::JoinHandle<R>>
where
    R: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + 'static,
{
    let f = Arc::new(f);
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let handles = (0..n)
        .map(|i| {
            let f = f.clone();
            let tids = tids.clone();
            let started = started_tx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    if let Some(tid) = sys::current_tid() {
                        tids.lock().unwrap_or_else(|e| e.into_inner()).push(tid);
                    }
                    let _ = started.send(());
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("tokio runtime");
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&rt, f(i))
                })
                .expect("spawning a worker thread")
        })
        .collect();
    // Every thread has registered its id before the caller starts measuring CPU.
    for _ in 0..n {
        let _ = started_rx.recv();
    }
    handles
}

/// Joins worker threads, re-raising a worker's panic.
pub fn join_all<R>(handles: Vec<std::thread::JoinHandle<R>>) -> Vec<R> {
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect()
}

/// Waits until `done()` or `deadline`, printing `progress()` every second. Returns whether
/// `done()` became true (false on deadline or Ctrl-C).
pub fn wait_until(
    setup: &Setup,
    deadline: Instant,
    mut done: impl FnMut() -> bool,
    progress: impl Fn() -> String,
) -> bool {
    let mut next_line = Instant::now() + PROGRESS_EVERY;
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline || stop_requested() {
            return false;
        }
        if now >= next_line {
            setup.log(&progress());
            next_line = now + PROGRESS_EVERY;
        }
        std::thread::sleep(POLL_EVERY.min(deadline - now));
    }
}

/// Sleeps for `d` unless Ctrl-C comes first, printing `progress()` every second. Returns
/// whether the whole time passed.
pub fn sleep_with_progress(setup: &Setup, d: Duration, progress: impl Fn() -> String) -> bool {
    !wait_until(setup, Instant::now() + d, stop_requested, progress) && !stop_requested()
}

/// CPU use of the load generator over a window: whole process and the busiest worker thread.
pub struct LoadCpu {
    start_wall: Instant,
    start_process: f64,
    start_threads: Vec<(u32, f64)>,
}

impl LoadCpu {
    /// Starts a window; `tids` are the threads whose individual saturation matters.
    pub fn start(tids: &[u32]) -> Self {
        Self {
            start_wall: Instant::now(),
            start_process: sys::self_cpu_seconds(),
            start_threads: tids
                .iter()
                .filter_map(|&t| Some((t, sys::thread_cpu_seconds(t)?)))
                .collect(),
        }
    }

    /// Adds the window's figures: cores used by the whole process and the busiest thread's
    /// share of one core, with a note when a thread was (nearly) saturated.
    pub fn finish(&self, report: &mut Report, prefix: &str) {
        let (process, busiest) = self.measure();
        report.set(&format!("{prefix}loadgen_cpu_cores"), process);
        report.set(&format!("{prefix}loadgen_busiest_thread_util"), busiest);
        if busiest > 0.9 || process > 0.9 * sys::usable_cores() as f64 {
            report.note(format!(
                "{prefix}load generator near saturation (busiest thread {:.0}% of a core, \
                 process {process:.2} cores): figures are a lower bound for the server",
                busiest * 100.0
            ));
        }
    }
}

impl LoadCpu {
    /// Cores used by the whole process and the busiest listed thread's share of one core,
    /// since the start of the window.
    pub fn measure(&self) -> (f64, f64) {
        let wall = self.start_wall.elapsed().as_secs_f64().max(1e-9);
        let process = (sys::self_cpu_seconds() - self.start_process) / wall;
        let busiest = self
            .start_threads
            .iter()
            .filter_map(|&(t, c0)| Some((sys::thread_cpu_seconds(t)? - c0) / wall))
            .fold(0.0f64, f64::max);
        (process, busiest)
    }
}

/// Adds the server's CPU seconds over a window, as a per-million-units cost when `units > 0`.
pub fn server_cpu(
    report: &mut Report,
    before: Option<ServerSample>,
    after: Option<ServerSample>,
    wall_s: f64,
    units: u64,
    unit_name: &str,
) {
    let (Some(b), Some(a)) = (before, after) else {
        return;
    };
    let cpu = a.cpu_s - b.cpu_s;
    report.set("server_cpu_s", cpu);
    report.set("server_cpu_cores", cpu / wall_s.max(1e-9));
    if units > 0 {
        report.set(
            &format!("server_cpu_s_per_million_{unit_name}"),
            cpu / (units as f64 / 1e6),
        );
    }
    report.set("server_rss_bytes", a.rss_bytes);
}

/// What the coordinator and every worker thread of one run share.
#[derive(Debug)]
pub struct Shared {
    pub phase: watch::Sender<Phase>,
    pub progress: Progress,
    pub connect_timeout: Duration,
    pub hello: bool,
    /// Handshakes in flight per thread.
    pub inflight: usize,
    /// Plans not yet taken by their thread (slot i belongs to thread i).
    plans: Mutex<Vec<Option<Vec<Plan>>>>,
}

impl Shared {
    /// Moves the run to `p` (never backwards).
    pub fn set_phase(&self, p: Phase) {
        self.phase.send_if_modified(|now| {
            let advance = p > *now;
            if advance {
                *now = p;
            }
            advance
        });
    }

    /// Thread `i`'s plans (once).
    pub fn take_plans(&self, i: usize) -> Vec<Plan> {
        self.plans.lock().unwrap_or_else(|e| e.into_inner())[i]
            .take()
            .unwrap_or_default()
    }

    /// `opened/ready/failed/closed` for progress lines.
    pub fn progress_line(&self, total: usize) -> String {
        let p = &self.progress;
        format!(
            "connections opened {}/{total}, ready {}, failed {}, closed {}, messages {}",
            Progress::get(&p.opened),
            Progress::get(&p.ready),
            Progress::get(&p.failed),
            Progress::get(&p.closed),
            Progress::get(&p.messages),
        )
    }
}

impl Setup {
    /// The shared state for a run over `plans` (one entry per thread).
    pub fn shared(&self, plans: Vec<Vec<Plan>>) -> Arc<Shared> {
        Arc::new(Shared {
            phase: watch::Sender::new(Phase::Open),
            progress: Progress::default(),
            connect_timeout: self.common.connect_timeout,
            hello: !self.common.no_hello,
            inflight: self.inflight_per_thread(),
            plans: Mutex::new(plans.into_iter().map(Some).collect()),
        })
    }
}

/// How long a connection's handshake took.
#[derive(Clone, Copy, Debug)]
pub struct Opened {
    /// connect() start to server_ready received.
    pub ready: Duration,
    /// connect() start to server_hello received (same as `ready` with `--no-hello`).
    pub hello: Duration,
}

/// Opens `plan`'s connection (TCP, upgrade, server_ready, and hello unless disabled) under the
/// thread's in-flight limit. The permit is returned so the caller can keep it through further
/// setup (subscribing) and drop it when the connection is ready.
///
/// # Errors
/// Any failure or the connect timeout; counted in `progress.failed` by the caller.
pub async fn open_planned<'s>(
    plan: &Plan,
    shared: &Shared,
    permits: &'s tokio::sync::Semaphore,
    read_buf: usize,
) -> Result<(Conn, Opened, tokio::sync::SemaphorePermit<'s>), ConnError> {
    let permit = permits.acquire().await.expect("semaphore never closed");
    let start = Instant::now();
    let opening = async {
        let mut conn = Conn::open(
            &plan.endpoint,
            &plan.token,
            read_buf,
            shared.connect_timeout,
        )
        .await?;
        let ready = start.elapsed();
        if shared.hello {
            conn.hello().await?;
        }
        Ok::<_, ConnError>((conn, ready))
    };
    let (conn, ready) = tokio::time::timeout(shared.connect_timeout, opening)
        .await
        .unwrap_or(Err(ConnError::Timeout("handshake")))?;
    Progress::add(&shared.progress.opened, 1);
    Ok((
        conn,
        Opened {
            ready,
            hello: start.elapsed(),
        },
        permit,
    ))
}
