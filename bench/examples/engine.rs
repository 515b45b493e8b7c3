//! The engine in-process, for developing the harness before the wse-server binary's flags
//! exist: `cargo run --release -p wse-bench --example engine -- --port 5007 --cores 1`.
//! Prints `READY ws://127.0.0.1:PORT/wse` and its pid, serves a minimal /metrics on
//! `--metrics-port`, and stops (draining) on Ctrl-C or SIGTERM.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use wse_bench::engine;
use wse_bench::scenarios::{DEFAULT_SECRET, parse_duration};
use wse_shards::Server;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 5007)]
    port: u16,
    /// Shards (threads); 0 = every core.
    #[arg(long, default_value_t = 1)]
    cores: usize,
    #[arg(long, env = "WSE_JWT_SECRET", default_value = DEFAULT_SECRET)]
    secret: String,
    /// Serve a minimal Prometheus endpoint here (0 = none).
    #[arg(long, default_value_t = 0)]
    metrics_port: u16,
    #[arg(long, value_parser = parse_duration, default_value = "25s")]
    ping_interval: Duration,
    /// Pin shard threads to cores.
    #[arg(long)]
    pin: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let mut cfg = engine::config(
        SocketAddr::from(([127, 0, 0, 1], args.port)),
        args.cores,
        &args.secret,
    );
    cfg.protocol.ping_interval = args.ping_interval;
    cfg.server.pin_threads = args.pin;
    let server = Server::start(cfg)?;
    if args.metrics_port != 0 {
        let listener = TcpListener::bind(("127.0.0.1", args.metrics_port))?;
        engine::serve_metrics(listener, server.metrics().to_vec());
    }
    println!(
        "READY ws://{}/wse pid {}",
        server.local_addr(),
        std::process::id()
    );
    signals.forever().next();
    eprintln!("stopping");
    server.stop(Duration::from_secs(2));
    Ok(())
}
