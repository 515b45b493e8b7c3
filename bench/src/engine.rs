//! The engine (`wse_shards::Server`) in-process, for development and the smoke test: a
//! configuration like the binary's benchmark setup, and a minimal Prometheus endpoint over the
//! shards' counters so the `inbound` scenario has something to scrape before the real control
//! plane exists.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use wse_shards::Config;
use wse_shards::metrics::ShardMetrics;

/// A benchmark configuration: HS256 auth with `secret`, `cores` shards, no control plane,
/// long idle timeout (the load generator answers pings, but a run must not depend on it), and
/// Centrifuge clients allowed to subscribe to the benchmark's channels.
pub fn config(listen: std::net::SocketAddr, cores: usize, secret: &str) -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = listen;
    cfg.server.cores = cores;
    cfg.server.drain_timeout = Duration::from_secs(2);
    cfg.control.enabled = false;
    cfg.auth.enabled = true;
    cfg.auth.secret = Some(secret.to_owned());
    cfg.protocol.idle_timeout = Duration::from_secs(3600);
    cfg.centrifuge.namespaces = vec![bench_namespace()];
    cfg
}

/// The Centrifuge namespace the benchmark's channels (`bench.0`, `hold.0`: no `:`, so the
/// namespace `""`) need: clients may subscribe, nothing else (no history, no presence), so a
/// Centrifuge subscriber costs the server what a WSE one does. The binary gets the same with
/// `--centrifuge-namespaces '[{"name":"","allow_subscribe_for_client":true}]'`.
pub fn bench_namespace() -> wse_shards::centrifuge::NamespaceConfig {
    wse_shards::centrifuge::NamespaceConfig {
        name: String::new(),
        allow_subscribe_for_client: true,
        ..Default::default()
    }
}

/// Serves `GET /metrics` (any path, in fact) on `listener` from a thread of its own, with the
/// counters the scenarios read, summed over shards.
pub fn serve_metrics(listener: TcpListener, shards: Vec<Arc<ShardMetrics>>) {
    std::thread::Builder::new()
        .name("bench-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                // Read the whole request head before answering: closing with unread request
                // bytes would reset the connection under the client.
                let mut request = [0u8; 4096];
                let mut len = 0;
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                while len < request.len() && !request[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut request[len..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                }
                let body = render(&shards);
                let _ = write!(
                    stream,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .expect("spawning the metrics thread");
}

fn render(shards: &[Arc<ShardMetrics>]) -> String {
    let sum = |f: fn(&ShardMetrics) -> u64| shards.iter().map(|m| f(m)).sum::<u64>();
    let dropped: u64 = shards
        .iter()
        .flat_map(|m| m.dropped.iter().map(|c| c.get()))
        .sum();
    format!(
        "wse_connections {}\nwse_messages_in_total {}\nwse_deliveries_total {}\nwse_publications_total {}\nwse_rate_limited_total {}\nwse_dropped_total {dropped}\n",
        sum(|m| m.connections.get()),
        sum(|m| m.messages_in_total.get()),
        sum(|m| m.deliveries_total.get()),
        sum(|m| m.publications_total.get()),
        sum(|m| m.rate_limited_total.get()),
    )
}
