//! wse-server: the binary. Reads the configuration, starts the shards and the control plane,
//! reloads on SIGHUP, drains on SIGTERM/SIGINT, and tells systemd about each step.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};
use wse_shards::{Server, StartError};

use crate::control::ControlPlane;
use crate::notify::Notifier;

mod cli;
mod cluster;
mod control;
mod host;
mod notify;
mod token;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for an unusable configuration (also clap's status for bad flags).
const EXIT_CONFIG: u8 = 2;
/// Exit status when the server cannot start for another reason (e.g. the port is taken).
const EXIT_START: u8 = 1;
/// Time allowed beyond `server.drain_timeout` for the shard threads to finish.
const STOP_GRACE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|a| a == token::SUBCOMMAND) {
        return match token::run(args.skip(1)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wse-server token: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let opts = match cli::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("wse-server: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if opts.print_example {
        print!("{}", cli::render_example());
        return ExitCode::SUCCESS;
    }
    if opts.print_config {
        if opts.show_secrets {
            print!("{}", cli::render_toml(&opts.config));
        } else {
            print!(
                "# Secrets print as \"{}\"; --show-secrets prints them.\n{}",
                cli::REDACTED,
                cli::render_toml(&cli::redact_secrets(&opts.config))
            );
        }
        return ExitCode::SUCCESS;
    }
    let cfg = opts.config;
    let log = init_tracing(&cfg.log.level);
    let notifier = Arc::new(Notifier::from_env());
    if let Some(f) = &opts.config_file {
        tracing::info!(file = %f.display(), "configuration loaded");
    }
    for r in &opts.resolved {
        tracing::info!("{}: {} resolved to {}", r.key, r.given, r.addr);
    }
    if !cfg.auth.enabled {
        warn_auth_disabled();
    }
    let nofile = host::raise_nofile();
    if let (Some(from), Some(to)) = (nofile.raised_from, nofile.soft) {
        tracing::info!("raised the soft RLIMIT_NOFILE from {from} to the hard limit, {to}");
    }
    host::warn_if_capped(&nofile, cfg.server.max_connections, cfg.shard_count());
    // Signals are caught from here on, so none is lost between start-up and the wait below.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wse-server: cannot install signal handlers: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    let server = match Server::start(cfg.clone()) {
        Ok(s) => Arc::new(s),
        Err(e @ StartError::Config(_)) => {
            eprintln!("wse-server: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("wse-server: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    // The cluster core: the mesh, and the shards' publications and interest across nodes.
    let cluster = if cfg.cluster.enabled {
        let fabric = server
            .take_cluster_endpoint()
            .expect("the cluster core's endpoint is taken once");
        match cluster::ClusterCore::start(&cfg.cluster, fabric, server.shard_count()) {
            Ok(c) => {
                tracing::info!(listen = %c.local_addr(), "cluster listener bound");
                Some(c)
            }
            Err(e) => {
                eprintln!(
                    "wse-server: cannot start the cluster core on {}: {e}",
                    cfg.cluster.listen
                );
                server.stop(STOP_GRACE);
                return ExitCode::from(EXIT_START);
            }
        }
    } else {
        None
    };
    // The lame duck starts with the server's drain, whoever asks for it.
    let cluster_drain = cluster.as_ref().map(cluster::ClusterCore::drainer);
    let control = if cfg.control.enabled {
        match control::start(
            server.clone(),
            &cfg.control,
            cluster.as_ref().map(cluster::ClusterCore::view),
        ) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!(
                    "wse-server: cannot serve the control plane on {}: {e}",
                    cfg.control.listen
                );
                server.stop(STOP_GRACE);
                return ExitCode::from(EXIT_START);
            }
        }
    } else {
        None
    };
    // One machine-readable line on stdout: tests and scripts wait for it.
    println!(
        "wse-server {} ready ws={} control={} shards={}",
        env!("CARGO_PKG_VERSION"),
        server.local_addr(),
        control
            .as_ref()
            .map_or_else(|| "off".to_owned(), |c| c.local_addr().to_string()),
        server.shard_count()
    );
    tracing::info!(
        ws = %server.local_addr(),
        shards = server.shard_count(),
        "wse-server ready"
    );
    let status = format!(
        "serving ws={} shards={}",
        server.local_addr(),
        server.shard_count()
    );
    notifier.ready(&status);
    let watchdog_stop = Arc::new(AtomicBool::new(false));
    if let Some(every) = notify::watchdog_interval() {
        spawn_watchdog(
            server.clone(),
            notifier.clone(),
            every,
            watchdog_stop.clone(),
        );
    }

    // Set before the process begins its own drain, so the drain watch leaves that one alone.
    let stopping = Arc::new(AtomicBool::new(false));
    let api_drain_done = Arc::new(AtomicBool::new(false));
    spawn_drain_watch(
        server.clone(),
        stopping.clone(),
        api_drain_done.clone(),
        cluster_drain.clone(),
    );

    let reloader = Reloader {
        argv: std::env::args_os().collect(),
        server: &server,
        control: control.as_ref(),
        cluster: cluster.as_ref(),
        log,
        nofile,
        notifier: &notifier,
        status,
    };
    let first = loop {
        match signals.forever().next() {
            Some(SIGHUP) => reloader.reload(),
            other => break other,
        }
    };
    stopping.store(true, Ordering::Release);
    watchdog_stop.store(true, Ordering::Release);
    if let Some(d) = &cluster_drain {
        d.drain();
    }
    if !api_drain_done.load(Ordering::Acquire) {
        let cfg = server.config();
        let (code, timeout) = (cfg.server.shutdown_close_code, cfg.server.drain_timeout);
        let what = format!(
            "draining: closing connections with {code}, up to {}",
            humantime::format_duration(timeout)
        );
        tracing::info!(signal = ?first, "{what}");
        notifier.stopping(&what);
        // A drain: /health answers 503 from here until the process exits. (Err: a drain
        // through the API is already under way, which is as good.)
        let _ = server.begin_drain(code, "server shutting down", timeout);
    } else {
        notifier.stopping("drained through the server API");
    }
    // A second SIGTERM/SIGINT while draining means: stop now.
    let handle = signals.handle();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if signal == SIGHUP {
                tracing::warn!("SIGHUP while draining: not reloading");
                continue;
            }
            eprintln!("wse-server: second signal, exiting without waiting for the drain");
            std::process::exit(130);
        }
    });
    // The shards first, the control plane last: the load balancer's probe keeps answering 503
    // for the whole drain instead of being refused.
    let clean = server.stop(STOP_GRACE);
    log_drain_end(&server);
    // Leaving after the drain: peers mark this node Left and never redial it.
    if let Some(c) = cluster {
        c.stop();
    }
    if let Some(c) = control {
        c.stop();
    }
    handle.close();
    if clean {
        tracing::info!("stopped");
    } else {
        tracing::warn!("stopped before every shard finished draining");
    }
    ExitCode::SUCCESS
}

fn warn_auth_disabled() {
    tracing::warn!(
        "AUTHENTICATION IS DISABLED: every client connects anonymously. This is the embedded \
         development configuration; set [auth] enabled = true with a secret or key before \
         exposing this server."
    );
}

/// Swaps the log filter on reload.
type LogReload = reload::Handle<EnvFilter, Registry>;

/// Logs to stderr (the journal, under systemd), filtered by `level` unless `RUST_LOG` is set.
/// Returns the handle that changes the filter, or `None` when `RUST_LOG` decides it for the
/// process's lifetime.
fn init_tracing(level: &str) -> Option<LogReload> {
    let from_env = EnvFilter::try_from_default_env().ok();
    let fixed = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour codes are noise in the journal and in files.
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    (!fixed).then_some(handle)
}

/// What a SIGHUP needs: the command line to parse again and what the new configuration goes to.
struct Reloader<'a> {
    /// The original arguments: flags and `WSE_*` variables keep their precedence over the file.
    argv: Vec<OsString>,
    server: &'a Server,
    control: Option<&'a ControlPlane>,
    cluster: Option<&'a cluster::ClusterCore>,
    log: Option<LogReload>,
    nofile: host::Nofile,
    notifier: &'a Notifier,
    /// The systemd status line while serving.
    status: String,
}

impl Reloader<'_> {
    /// Re-reads the configuration as at start and applies what can change live; on any error
    /// the running configuration stays, whole. systemd sees RELOADING=1 … READY=1 around it.
    fn reload(&self) {
        self.notifier.reloading();
        tracing::info!("SIGHUP: reloading the configuration");
        let outcome = match self.apply() {
            Ok(()) => "configuration reloaded".to_owned(),
            Err(e) => {
                tracing::error!("reload refused, the running configuration stays: {e}");
                format!("reload refused: {e}")
            }
        };
        self.notifier.ready(&format!("{}; {outcome}", self.status));
    }

    fn apply(&self) -> Result<(), String> {
        let opts = cli::parse_from(self.argv.iter().cloned()).map_err(|e| e.to_string())?;
        // Checked before anything is applied, so that a bad filter refuses the whole reload.
        let filter = match &self.log {
            Some(_) => Some(
                EnvFilter::try_new(&opts.config.log.level)
                    .map_err(|e| format!("log.level: {e}"))?,
            ),
            None => None,
        };
        let shards = self.server.shard_count();
        let report = self.server.reload(opts.config).map_err(|e| e.to_string())?;
        let running = self.server.config();
        if report.applied.iter().any(|k| k == "log.level") {
            match (&self.log, filter) {
                (Some(handle), Some(filter)) => {
                    if let Err(e) = handle.reload(filter) {
                        tracing::error!(error = %e, "cannot change the log filter");
                    }
                }
                _ => tracing::info!("log.level changed, but RUST_LOG sets the filter"),
            }
        }
        if let Some(control) = self.control {
            control.set_api_key(running.control.api_key.clone());
        }
        // The cluster's certificates are read again from the running paths (files replaced in
        // place), for the links made from now on.
        if let Some(cluster) = self.cluster {
            match cluster.reload_certificates(&running.cluster) {
                Ok(true) => tracing::info!("cluster certificates reloaded for new links"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!("cluster certificates not reloaded, the running ones stay: {e}")
                }
            }
        }
        if report.applied.iter().any(|k| k == "auth.enabled") && !running.auth.enabled {
            warn_auth_disabled();
        }
        for key in &report.needs_restart {
            tracing::warn!(
                "{key} changed, but takes effect only at a restart; it keeps its running value"
            );
        }
        if report.confirmed < shards {
            tracing::warn!(
                "only {} of {shards} shards confirmed the new configuration in time; the others \
                 apply it when they next handle their queue",
                report.confirmed
            );
        }
        host::warn_if_capped(&self.nofile, running.server.max_connections, shards);
        tracing::info!(changed = ?report.applied, "configuration reloaded");
        Ok(())
    }
}

/// How often the drain watch looks at the shards.
const DRAIN_WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// A drain asked through the server API (`POST /api/v1/drain`) ends with the shards exiting;
/// this then raises SIGTERM on ourselves, so that the process shuts down the way a signal does
/// (shards joined, control plane stopped, exit 0) instead of lingering without listeners. It
/// leaves alone the drain the process begins itself on a signal (`stopping`), and sets
/// `done` before raising, so that the SIGTERM is not taken for an operator's. It also starts the
/// cluster core's lame duck (`cluster`) as soon as it sees the drain begin.
fn spawn_drain_watch(
    server: Arc<Server>,
    stopping: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    cluster: Option<cluster::ClusterDrain>,
) {
    let spawned = std::thread::Builder::new()
        .name("wse-drain-watch".to_owned())
        .spawn(move || {
            // Until a drain has run its course (a shard stopping for another reason is the
            // watchdog's business, not a reason to exit cleanly).
            let drained = |s: &Server| s.is_draining() && !s.shards_running();
            while !drained(&server) {
                if stopping.load(Ordering::Acquire) {
                    return;
                }
                if server.is_draining()
                    && let Some(c) = &cluster
                {
                    c.drain();
                }
                std::thread::sleep(DRAIN_WATCH_INTERVAL);
            }
            if stopping.load(Ordering::Acquire) {
                return;
            }
            done.store(true, Ordering::Release);
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::TERM,
            );
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the drain watch; a drain through the API will not end the process");
    }
}

/// Says how a drain ended, once every shard has exited: complete only when no connection is
/// left; otherwise how many the timeout cut.
fn log_drain_end(server: &Server) {
    match server.connection_count() {
        0 => tracing::info!("drain complete: every connection is closed"),
        left => tracing::warn!(
            "drain timed out with {left} connections still open; they are closed without \
             waiting for their close handshake"
        ),
    }
}

/// Sends WATCHDOG=1 every `every` (half of WatchdogSec) while every shard is alive and responsive:
/// its thread is running and its loop has turned since the previous check, when it was poked. An
/// idle shard turns once per poke; one stuck in a turn (a livelock, a blocking call) or gone does
/// not, and withholding the keep-alive lets systemd restart the service. What this does not see:
/// the control plane's thread, and a shard that turns but makes no progress on its connections.
fn spawn_watchdog(
    server: Arc<Server>,
    notifier: Arc<Notifier>,
    every: Duration,
    stop: Arc<AtomicBool>,
) {
    let turns =
        |s: &Server| -> Vec<u64> { s.metrics().iter().map(|m| m.loop_turns.get()).collect() };
    let spawned = std::thread::Builder::new()
        .name("wse-watchdog".to_owned())
        .spawn(move || {
            let mut before = turns(&server);
            server.poke_shards();
            let mut healthy = true;
            loop {
                std::thread::sleep(every);
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let now = turns(&server);
                let stalled: Vec<usize> = (0..now.len()).filter(|&i| now[i] == before[i]).collect();
                if stalled.is_empty() && server.shards_running() {
                    notifier.watchdog();
                    if !healthy {
                        tracing::info!("every shard responds again; watchdog keep-alives resumed");
                        healthy = true;
                    }
                } else if healthy {
                    tracing::error!(
                        ?stalled,
                        "shards stopped turning their loop, or exited: withholding the systemd \
                         watchdog keep-alive, so that systemd restarts the service"
                    );
                    healthy = false;
                }
                before = now;
                server.poke_shards();
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the watchdog thread; systemd will restart the service");
    }
}
