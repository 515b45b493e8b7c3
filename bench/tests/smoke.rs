//! Every scenario, tiny, against the real engine started in-process (HS256 auth on, one shard):
//! the harness opens connections, measures, and reports sane figures. Each test gets a fresh
//! server so one scenario's connections cannot affect another's figures. The distributed path
//! runs two agents in-process on loopback, driven by a controller in the same process.
//! The Centrifuge tests run connect-storm, hold and fanout with `--protocol centrifuge`, JSON and
//! protobuf. The whole file stays under 10 s (tests run in parallel).

use std::net::{SocketAddr, TcpListener};

use serde_json::Value;
use wse_bench::cli::{Outcome, run_args};
use wse_bench::dist::agent::{self, AgentArgs};
use wse_bench::engine;
use wse_bench::report::Report;
use wse_bench::scenarios::DEFAULT_SECRET;
use wse_shards::Server;

fn server() -> Server {
    let cfg = engine::config(SocketAddr::from(([127, 0, 0, 1], 0)), 1, DEFAULT_SECRET);
    Server::start(cfg).expect("engine starts")
}

fn recovery_server() -> Server {
    let mut cfg = engine::config(SocketAddr::from(([127, 0, 0, 1], 0)), 1, DEFAULT_SECRET);
    cfg.recovery.enabled = true;
    cfg.recovery.memory_budget = 4 << 20;
    Server::start(cfg).expect("engine starts")
}

/// Starts an agent on an ephemeral loopback port, in a thread of its own; returns `host:port`.
fn agent() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let args = AgentArgs {
        listen: listener.local_addr().unwrap(),
        threads: Some(1),
        source: String::new(),
        quiet: true,
    };
    std::thread::spawn(move || agent::serve(listener, &args).expect("agent serves"));
    addr
}

fn run(server: &Server, scenario: &str, extra: &[&str]) -> Report {
    let url = format!("ws://{}/wse", server.local_addr());
    let pid = std::process::id().to_string();
    let mut argv = vec![
        "wse-bench",
        scenario,
        "--url",
        &url,
        "--threads",
        "1",
        "--quiet",
        "--server-pid",
        &pid,
    ];
    argv.extend_from_slice(extra);
    match run_args(argv).expect("scenario runs") {
        Outcome::Report(r) => {
            println!("{}", r.table());
            *r
        }
        Outcome::Text(t) => panic!("expected a report, got {t}"),
    }
}

fn num(r: &Report, key: &str) -> f64 {
    r.number(key)
        .unwrap_or_else(|| panic!("{key} missing in\n{}", r.table()))
}

#[test]
fn connect_storm_opens_every_connection() {
    let s = server();
    let r = run(&s, "connect-storm", &["-n", "40", "--inflight", "8"]);
    assert!(!r.partial);
    assert_eq!(num(&r, "connections_opened"), 40.0);
    assert_eq!(num(&r, "connections_failed"), 0.0);
    assert!(num(&r, "handshakes_per_s") > 0.0);
    assert!(num(&r, "ready_latency_p50_ms") > 0.0);
    assert!(num(&r, "ready_latency_max_ms") >= num(&r, "ready_latency_p50_ms"));
}

#[test]
fn connect_storm_counts_refused_tokens() {
    let s = server();
    let r = run(
        &s,
        "connect-storm",
        &[
            "-n",
            "3",
            "--secret",
            "a-different-secret-of-at-least-32-bytes!",
        ],
    );
    assert_eq!(num(&r, "connections_opened"), 0.0);
    assert_eq!(num(&r, "connections_failed"), 3.0);
    assert_eq!(r.results["errors"], Value::from("server:AUTH_FAILED=3"));
}

#[test]
fn hold_keeps_connections_and_measures_memory() {
    let s = server();
    let r = run(
        &s,
        "hold",
        &[
            "-n",
            "20",
            "--topics-per-conn",
            "2",
            "--duration",
            "1s",
            "--settle",
            "200ms",
        ],
    );
    assert!(!r.partial);
    assert_eq!(num(&r, "connections_ready"), 20.0);
    assert_eq!(num(&r, "survivors"), 20.0);
    assert_eq!(num(&r, "unexpected_closes"), 0.0);
    assert!(num(&r, "server_rss_settled_bytes") > 0.0);
    // The floor is the lowest sample of the hold, the end sample included.
    let floor = num(&r, "server_rss_floor_bytes");
    assert!(
        floor > 0.0 && floor <= num(&r, "server_rss_end_bytes"),
        "{floor}"
    );
}

#[test]
fn fanout_fixed_rate_delivers_everything() {
    let s = server();
    let r = run(
        &s,
        "fanout",
        &[
            "--subscribers",
            "20",
            "--topics",
            "4",
            "--publishers",
            "2",
            "--rate",
            "200",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
        ],
    );
    assert!(!r.partial, "{}", r.table());
    assert_small_fanout_complete(&r);
}

/// The small fan-out both the server and the floor run: 200 publications over 4 topics, 5
/// subscribers each, every delivery made once, in order, on its topic, with its figures measured.
fn assert_small_fanout_complete(r: &Report) {
    assert_eq!(num(r, "subscribers_ready"), 20.0);
    assert_eq!(num(r, "publications"), 200.0);
    assert_eq!(num(r, "deliveries_expected"), 1000.0);
    assert_eq!(num(r, "deliveries"), 1000.0);
    assert_eq!(num(r, "gaps"), 0.0);
    assert_eq!(num(r, "duplicates"), 0.0);
    assert_eq!(num(r, "wrong_topic"), 0.0);
    assert!(num(r, "latency_p50_ms") > 0.0);
    // The server's CPU time is read in clock ticks (10 ms), so 0 is a true reading for a run this
    // small; what must hold is that the figure was measured (a missing server process or no
    // deliveries would make it NaN).
    let cpu = num(r, "server_cpu_s_per_million_deliveries");
    assert!(cpu.is_finite() && cpu >= 0.0, "{cpu}");
}

/// Centrifuge connections in `format` (`json`, `protobuf`): `extra` plus `--protocol centrifuge`.
fn centrifuge_args<'a>(format: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec!["--protocol", "centrifuge", "--centrifuge-format", format];
    argv.extend_from_slice(extra);
    argv
}

#[test]
fn centrifuge_connect_storm_opens_every_connection() {
    for format in ["json", "protobuf"] {
        let s = server();
        let r = run(
            &s,
            "connect-storm",
            &centrifuge_args(format, &["-n", "40", "--inflight", "8"]),
        );
        assert!(!r.partial, "{}", r.table());
        assert_eq!(
            r.results["protocol"],
            Value::from(format!("centrifuge-{format}"))
        );
        assert_eq!(num(&r, "connections_opened"), 40.0, "{format}");
        assert_eq!(num(&r, "connections_failed"), 0.0, "{format}");
        assert!(num(&r, "ready_latency_p50_ms") > 0.0);
    }
}

#[test]
fn centrifuge_connect_storm_counts_refused_tokens() {
    let s = server();
    let r = run(
        &s,
        "connect-storm",
        &centrifuge_args(
            "json",
            &[
                "-n",
                "3",
                "--secret",
                "a-different-secret-of-at-least-32-bytes!",
            ],
        ),
    );
    assert_eq!(num(&r, "connections_opened"), 0.0);
    // A bad connection token closes the connection with 3500 (invalid token).
    assert_eq!(r.results["errors"], Value::from("closed:3500=3"));
}

/// Held Centrifuge connections answer the server's `{}` pings (1 s apart here, 500 ms to
/// answer), so every one survives a hold past the first ping.
#[test]
fn centrifuge_hold_answers_pings_and_keeps_every_connection() {
    for format in ["json", "protobuf"] {
        let mut cfg = engine::config(SocketAddr::from(([127, 0, 0, 1], 0)), 1, DEFAULT_SECRET);
        cfg.centrifuge.ping_interval = std::time::Duration::from_secs(1);
        cfg.centrifuge.pong_timeout = std::time::Duration::from_millis(500);
        let s = Server::start(cfg).expect("engine starts");
        let r = run(
            &s,
            "hold",
            &centrifuge_args(
                format,
                &[
                    "-n",
                    "20",
                    "--topics-per-conn",
                    "2",
                    "--duration",
                    "2500ms",
                    "--settle",
                    "200ms",
                    "--no-reconnect",
                ],
            ),
        );
        assert!(!r.partial, "{}", r.table());
        assert_eq!(num(&r, "connections_ready"), 20.0, "{format}");
        assert_eq!(num(&r, "survivors"), 20.0, "{format}");
        assert_eq!(num(&r, "unexpected_closes"), 0.0, "{format}");
        assert!(num(&r, "pings_answered") >= 20.0, "{}", r.table());
        assert!(num(&r, "server_rss_settled_bytes") > 0.0);
    }
}

/// Centrifuge subscribers fed by WSE publishers: every publication reaches every subscriber of
/// its topic once, in order, its stamp carried in the push's data.
#[test]
fn centrifuge_fanout_delivers_everything() {
    for format in ["json", "protobuf"] {
        let s = server();
        let r = run(
            &s,
            "fanout",
            &centrifuge_args(
                format,
                &[
                    "--subscribers",
                    "20",
                    "--topics",
                    "4",
                    "--publishers",
                    "2",
                    "--rate",
                    "200",
                    "--duration",
                    "1s",
                    "--warmup",
                    "200ms",
                ],
            ),
        );
        assert!(!r.partial, "{format}: {}", r.table());
        assert_small_fanout_complete(&r);
    }
}

#[test]
fn wse_only_scenarios_refuse_centrifuge() {
    let err = run_args(["wse-bench", "ping", "--protocol", "centrifuge", "--quiet"])
        .err()
        .expect("ping refuses --protocol centrifuge");
    assert!(err.to_string().contains("WSE only"), "{err}");
}

#[test]
fn fanout_rate_search_reports_steps() {
    let s = server();
    let r = run(
        &s,
        "fanout",
        &[
            "--subscribers",
            "10",
            "--topics",
            "2",
            "--rate",
            "max",
            "--rate-start",
            "100",
            "--max-steps",
            "2",
            "--step-duration",
            "500ms",
            "--warmup",
            "100ms",
            "--p99-max",
            "1s",
        ],
    );
    assert_eq!(r.steps.len(), 2);
    assert!(num(&r, "max_rate_per_s") >= 100.0, "{}", r.table());
    assert_eq!(num(&r, "gaps"), 0.0);
}

#[test]
fn ping_measures_round_trips() {
    let s = server();
    let r = run(
        &s,
        "ping",
        &["-n", "4", "--duration", "1s", "--warmup", "100ms"],
    );
    assert!(!r.partial);
    assert_eq!(num(&r, "errors"), 0.0);
    assert!(num(&r, "pings_per_s") > 10.0);
    assert!(num(&r, "rtt_p50_ms") > 0.0);
}

#[test]
fn inbound_reads_the_processed_rate_from_metrics() {
    let s = server();
    let metrics = TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_url = format!("http://{}/metrics", metrics.local_addr().unwrap());
    engine::serve_metrics(metrics, s.metrics().to_vec());
    let r = run(
        &s,
        "inbound",
        &[
            "-n",
            "4",
            "--rate",
            "50",
            "--duration",
            "1s",
            "--warmup",
            "100ms",
            "--metrics-url",
            &metrics_url,
        ],
    );
    assert!(!r.partial, "{}", r.table());
    assert!(num(&r, "sent_per_s") > 100.0, "{}", r.table());
    assert!(num(&r, "processed_per_s") > 100.0, "{}", r.table());
    assert_eq!(num(&r, "rate_limited_errors"), 0.0);
}

#[test]
fn recovery_delivers_every_publication_exactly_once_across_reconnects() {
    let s = recovery_server();
    let r = run(
        &s,
        "recovery",
        &[
            "--subscribers",
            "20",
            "--topics",
            "2",
            "--rate",
            "200",
            "--warmup",
            "200ms",
            "--duration",
            "1s",
            "--churn-batch",
            "4",
            "--churn-rate",
            "40",
            "--offline",
            "50ms",
            "--drain",
            "3s",
        ],
    );
    assert!(!r.partial, "{}", r.table());
    assert_eq!(r.results["passed"], Value::from(true), "{}", r.table());
    assert_eq!(num(&r, "lost"), 0.0);
    assert_eq!(num(&r, "duplicates"), 0.0);
    assert_eq!(num(&r, "subscribers_complete"), 20.0);
    // 240 publications, 10 subscribers per topic.
    assert_eq!(num(&r, "deliveries_expected"), 2400.0);
    assert_eq!(num(&r, "deliveries"), 2400.0);
    // About 40 disconnections in the second of churn, every one recovered.
    assert!(num(&r, "disconnects") >= 20.0, "{}", r.table());
    assert_eq!(num(&r, "recovered"), num(&r, "reconnects"));
    assert_eq!(num(&r, "reconnects"), num(&r, "disconnects"));
    assert!(num(&r, "replay_count_acked") > 0.0, "{}", r.table());
    assert!(num(&r, "reconnect_latency_p50_ms") > 0.0);
    assert!(r.histograms.contains_key("reconnect_latency"));
    // Server memory before and after the churn (the run passes this process as --server-pid).
    assert!(
        num(&r, "server_rss_after_churn_bytes") > 0.0,
        "{}",
        r.table()
    );
    assert!(r.results.contains_key("server_rss_growth_bytes"));
}

#[test]
fn recovery_without_server_support_fails_the_check() {
    // Recovery off: publications carry no stamps, and nothing is replayed.
    let s = server();
    let r = run(
        &s,
        "recovery",
        &[
            "--subscribers",
            "4",
            "--topics",
            "1",
            "--rate",
            "100",
            "--warmup",
            "200ms",
            "--duration",
            "300ms",
            "--churn-batch",
            "2",
            "--churn-rate",
            "20",
            "--drain",
            "500ms",
        ],
    );
    assert_eq!(r.results["passed"], Value::from(false), "{}", r.table());
    assert!(num(&r, "unstamped") > 0.0);
}

#[test]
fn agents_split_hold_and_storm_and_merge_their_figures() {
    let s = server();
    let agents = format!("{},{}", agent(), agent());
    let r = run(
        &s,
        "hold",
        &[
            "-n",
            "30",
            "--duration",
            "300ms",
            "--settle",
            "100ms",
            "--agents",
            &agents,
        ],
    );
    assert!(!r.partial, "{}", r.table());
    assert_eq!(num(&r, "agents"), 2.0);
    // Equal budgets: an even split.
    let shares = r.results["agent_shares"].as_str().unwrap();
    assert_eq!(shares.matches("=15").count(), 2, "{shares}");
    assert_eq!(num(&r, "connections_ready"), 30.0);
    assert_eq!(num(&r, "survivors"), 30.0);
    assert!(num(&r, "server_rss_settled_bytes") > 0.0);
    // The same agents serve the next controller; histograms come back merged.
    let r = run(&s, "connect-storm", &["-n", "24", "--agents", &agents]);
    assert!(!r.partial, "{}", r.table());
    assert_eq!(num(&r, "connections_opened"), 24.0);
    assert_eq!(num(&r, "ready_latency_count"), 24.0);
    assert!(num(&r, "handshakes_per_s") > 0.0);
    // A local-only scenario refuses agents instead of running half a test.
    let r = run(&s, "recovery", &["--subscribers", "2", "--agents", &agents]);
    assert!(r.partial);
    assert!(r.notes.iter().any(|n| n.contains("does not run on agents")));
    let r = run(&s, "fanout", &["--subscribers", "2", "--agents", &agents]);
    assert!(r.partial);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("fanout does not run on agents"))
    );
}

#[test]
fn report_renders_html() {
    let dir = std::env::temp_dir().join(format!("wse-bench-html-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let s = server();
    let json = dir.join("storm.json");
    run(&s, "connect-storm", &["-n", "5"])
        .write_json(&json)
        .unwrap();
    let html = dir.join("report.html");
    let Outcome::Text(t) = run_args([
        "wse-bench",
        "report",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
    ])
    .unwrap() else {
        panic!("report prints text");
    };
    assert!(t.contains("1 results") || t.contains("(1 result"), "{t}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("ready_latency"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The floor (a minimal sender in wse-bench) against the same client side as `fanout`: every
/// publication reaches every subscriber of its topic, and its sender's CPU is measured.
#[test]
fn floor_delivers_everything_from_its_own_sender() {
    let argv = [
        "wse-bench",
        "floor",
        "--subscribers",
        "20",
        "--topics",
        "4",
        "--rate",
        "200",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--threads",
        "1",
        "--quiet",
    ];
    let r = match run_args(argv).expect("floor runs") {
        Outcome::Report(r) => *r,
        Outcome::Text(t) => panic!("expected a report, got {t}"),
    };
    println!("{}", r.table());
    assert_eq!(r.scenario, "floor");
    assert!(!r.partial, "{}", r.table());
    assert_small_fanout_complete(&r);
}

/// What the floor writes a subscriber is, byte for byte, what the server writes for the same
/// publication: the floor's ratio compares the same frames.
#[test]
fn floor_writes_the_servers_message() {
    use std::sync::Arc;
    use wse_bench::conn::{Conn, Dialect, Endpoint, Target, is_type};
    use wse_bench::wire::{self, Stamp};

    let s = server();
    let url = format!("ws://{}/wse", s.local_addr());
    let token = |sub: &str, publish: bool| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut claims = serde_json::json!({"sub": sub, "iat": now, "exp": now + 600});
        if publish {
            claims["wse_publish"] = serde_json::json!({"allow": ["*"]});
        }
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(DEFAULT_SECRET.as_bytes()),
        )
        .unwrap()
    };
    let t = std::time::Duration::from_secs(10);
    let ep = Endpoint {
        target: Arc::new(Target::parse(&url).unwrap()),
        source: None,
        dialect: Dialect::Wse,
    };
    let stamp = Stamp {
        step: 1,
        publisher: 0,
        topic: 0,
        seq: 1,
        scheduled_ns: 987_654_321,
    };
    let got = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut sub = Conn::open(&ep, &token("sub", false), 4096, t)
                .await
                .unwrap();
            sub.subscribe(&["bench.0".to_owned()]).await.unwrap();
            let mut publisher = Conn::open(&ep, &token("pub", true), 4096, t).await.unwrap();
            let mut json = Vec::new();
            wire::publish(&mut json, "bench.0", &stamp, "xyz");
            publisher.queue_text(&json);
            publisher.flush().await.unwrap();
            let mut got = None;
            while got.is_none() {
                tokio::time::timeout(
                    t,
                    sub.recv(|m| {
                        if is_type(m, b"bench") {
                            got = Some(m.to_vec());
                        }
                    }),
                )
                .await
                .expect("the delivery arrives")
                .unwrap();
            }
            got.unwrap()
        });
    let mut want = Vec::new();
    wse_bench::scenarios::floor::delivery(&mut want, &stamp, "xyz");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
}

#[test]
fn compare_reads_two_results() {
    let dir = std::env::temp_dir().join(format!("wse-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let s = server();
    let (a, b) = (dir.join("a.json"), dir.join("b.json"));
    for path in [&a, &b] {
        let r = run(&s, "connect-storm", &["-n", "5"]);
        r.write_json(path).unwrap();
    }
    let Outcome::Text(t) = run_args([
        "wse-bench",
        "compare",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ])
    .unwrap() else {
        panic!("compare prints text");
    };
    assert!(t.contains("handshakes_per_s"), "{t}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_second_controller_waits_then_is_refused_while_the_first_holds_the_agent() {
    use wse_bench::dist::controller::Agents;
    let addr = agent();
    let first = Agents::connect(std::slice::from_ref(&addr)).expect("first controller");
    let err = Agents::connect(std::slice::from_ref(&addr))
        .err()
        .expect("the agent is busy");
    assert!(format!("{err:#}").contains("busy"), "{err:#}");
    // Once the first controller goes, the next one is served.
    drop(first);
    Agents::connect(std::slice::from_ref(&addr)).expect("served after the first left");
}
