//! wse-server: the binary. Reads the configuration, starts the shards and the control plane,
//! and drains on SIGTERM/SIGINT.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::EnvFilter;
use wse_shards::{Server, StartError};

mod cli;
mod control;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for an unusable configuration (also clap's status for bad flags).
const EXIT_CONFIG: u8 = 2;
/// Exit status when the server cannot start for another reason (e.g. the port is taken).
const EXIT_START: u8 = 1;
/// Time allowed beyond `server.drain_timeout` for the shard threads to finish.
const STOP_GRACE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let opts = match cli::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("wse-server: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if opts.print_config {
        print!("{}", cli::render_toml(&opts.config));
        return ExitCode::SUCCESS;
    }
    let cfg = opts.config;
    init_tracing(&cfg.log.level);
    if let Some(f) = &opts.config_file {
        tracing::info!(file = %f.display(), "configuration loaded");
    }
    if !cfg.auth.enabled {
        tracing::warn!(
            "AUTHENTICATION IS DISABLED: every client connects anonymously. This is the embedded \
             development configuration; set [auth] enabled = true with a secret or key before \
             exposing this server."
        );
    }
    // Signals are blocked from here on, so none is lost between start-up and the wait below.
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
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
    let control = if cfg.control.enabled {
        match control::start(server.clone(), &cfg.control) {
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

    let first = signals.forever().next();
    tracing::info!(signal = ?first, "draining: closing connections with {}", cfg.server.shutdown_close_code);
    // A second signal while draining means: stop now.
    let handle = signals.handle();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("wse-server: second signal, exiting without waiting for the drain");
            std::process::exit(130);
        }
    });
    if let Some(c) = control {
        c.stop();
    }
    let clean = server.stop(STOP_GRACE);
    handle.close();
    if clean {
        tracing::info!("stopped");
    } else {
        tracing::warn!("stopped before every shard finished draining");
    }
    ExitCode::SUCCESS
}

fn init_tracing(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
