//! The control plane over real HTTP, against a running one-shard engine. The client is a few
//! lines of HTTP/1.1 over a tokio `TcpStream` (`Connection: close`, read to the end).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wse_shards::{Config, Server};

use super::*;

const KEY: &str = "kkkkkkkkkkkkkkkk";
const BODY_LIMIT: usize = 4096;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts the JSON error shape and returns its code.
    fn error_code(&self) -> String {
        let v = self.json();
        assert!(v["error"]["message"].is_string(), "{v}");
        assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
        v["error"]["code"].as_str().expect("error.code").to_owned()
    }
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await.unwrap();
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw));
    // A reset after the whole reply (e.g. a refused body left unread) still leaves the reply.
    let _ = read.await.expect("reply within 10s");
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete reply");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn publish(addr: SocketAddr, path: &str, auth: (&str, &str), body: &str) -> Reply {
    let headers = [auth, ("Content-Type", "application/json")];
    http(addr, "POST", path, &headers, body.as_bytes()).await
}

fn engine() -> (Arc<Server>, Config) {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.cores = 1;
    cfg.server.pin_threads = false;
    cfg.server.drain_timeout = Duration::from_secs(1);
    cfg.limits.max_message_size = BODY_LIMIT;
    cfg.control.listen = "127.0.0.1:0".parse().unwrap();
    cfg.control.api_key = Some(KEY.to_owned());
    let server = Arc::new(Server::start(cfg.clone()).expect("engine starts"));
    (server, cfg)
}

/// Polls `/metrics` until `line` appears (shards update their counters as they run).
async fn wait_for_metric(addr: SocketAddr, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = http(addr, "GET", "/metrics", &[], b"").await.body;
        if text.lines().any(|l| l == line) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn control_plane_over_http() {
    let (server, cfg) = engine();
    let control = start(server.clone(), &cfg.control, None).expect("control plane starts");
    let addr = control.local_addr();
    assert_ne!(addr.port(), 0);

    // A WebSocket subscriber, to see a publication arrive.
    let ws = format!("ws://{}/wse", server.local_addr());
    let mut client = wse_client::Connector::new(ws).connect().await.unwrap();
    let ack = client.subscribe(&["news"]).await.unwrap();
    assert_eq!(ack.p["success"], json!(true), "{:?}", ack.raw);

    // Health.
    let r = http(addr, "GET", "/health", &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let h = r.json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert!(h["uptime_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(
        (h["shards"].as_u64(), h["connections"].as_u64()),
        (Some(1), Some(1))
    );

    // Publish: one object, Bearer key; the subscriber gets exactly the data.
    let bearer = format!("Bearer {KEY}");
    let body = r#"{"topic":"news","event":"breaking","data":{"id":1,"x":[true,null]}}"#;
    let r = publish(addr, "/api/v1/publish", ("Authorization", &bearer), body).await;
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"published": 1})),
        "{}",
        r.body
    );
    let ev = client
        .recv_until(|e| e.t == "breaking", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(ev.p, json!({"id":1,"x":[true,null]}));
    assert_eq!(ev.c.as_deref(), Some("U"));

    // An array with X-API-Key, and {"messages":[...]} on /batch: delivered in order.
    let body = r#"[{"topic":"news","event":"n1"},{"topic":"news","event":"n2","data":2}]"#;
    let r = publish(addr, "/api/v1/publish", ("X-API-Key", KEY), body).await;
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"published": 2})),
        "{}",
        r.body
    );
    let body = r#"{"messages":[{"topic":"news","event":"n3"},{"topic":"other"}]}"#;
    let r = publish(addr, "/api/v1/publish/batch", ("X-API-Key", KEY), body).await;
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"published": 2})),
        "{}",
        r.body
    );
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let ev = client
            .recv_until(|e| e.t.starts_with('n'), Duration::from_secs(5))
            .await
            .unwrap();
        seen.push((ev.t, ev.p));
    }
    assert_eq!(
        seen,
        [
            ("n1".to_owned(), Value::Null),
            ("n2".to_owned(), json!(2)),
            ("n3".to_owned(), Value::Null)
        ]
    );

    // Refusals, each a JSON error with its status.
    let r = publish(
        addr,
        "/api/v1/publish",
        ("X-API-Key", "wrong-key-wrong-key"),
        body,
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (401, "UNAUTHORIZED"));
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = http(addr, "POST", "/api/v1/publish", &[], b"{}").await;
    assert_eq!((r.status, r.error_code().as_str()), (401, "UNAUTHORIZED"));
    let r = publish(addr, "/api/v1/publish", ("X-API-Key", KEY), "{\"topic\":").await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "INVALID_JSON"));
    let r = publish(addr, "/api/v1/publish", ("X-API-Key", KEY), r#"{"data":1}"#).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "INVALID_REQUEST")
    );
    let r = publish(
        addr,
        "/api/v1/publish",
        ("X-API-Key", KEY),
        r#"{"topic":""}"#,
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "INVALID_TOPIC"));
    // One bad element: nothing of the batch is published.
    let body = r#"[{"topic":"news","event":"never"},{"topic":"bad\u0001"}]"#;
    let r = publish(addr, "/api/v1/publish", ("X-API-Key", KEY), body).await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "INVALID_TOPIC"));
    let big = format!(r#"{{"topic":"news","data":"{}"}}"#, "x".repeat(BODY_LIMIT));
    let r = publish(addr, "/api/v1/publish", ("X-API-Key", KEY), &big).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (413, "PAYLOAD_TOO_LARGE")
    );
    let r = http(addr, "GET", "/nope", &[], b"").await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "NOT_FOUND"));
    let r = http(addr, "GET", "/api/v1/publish", &[("X-API-Key", KEY)], b"").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (405, "METHOD_NOT_ALLOWED")
    );
    let r = http(addr, "POST", "/health", &[], b"").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (405, "METHOD_NOT_ALLOWED")
    );
    let marker = publish(
        addr,
        "/api/v1/publish",
        ("X-API-Key", KEY),
        r#"{"topic":"news","event":"marker"}"#,
    )
    .await;
    assert_eq!(marker.status, 200);
    let ev = client
        .recv_until(
            |e| e.t == "never" || e.t == "marker",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(ev.t, "marker", "the refused batch published nothing");

    // Metrics: the shard's figures, with the handshake histogram.
    let text = wait_for_metric(addr, "wse_publications_total 6").await;
    for line in [
        "wse_connections{shard=\"0\"} 1",
        "wse_connections_accepted_total 1",
        "wse_publications_total 6",
        "wse_handshake_duration_seconds_count 1",
        "wse_handshake_duration_seconds_bucket{le=\"+Inf\"} 1",
        "# TYPE wse_handshake_duration_seconds histogram",
        "wse_dropped_total{reason=\"slow_consumer\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    let r = http(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(text.contains("wse_deliveries_total"));

    // With no key configured the API is off, whatever the request carries.
    let mut no_key = cfg.control.clone();
    no_key.api_key = None;
    let closed = start(server.clone(), &no_key, None).unwrap();
    let r = publish(
        closed.local_addr(),
        "/api/v1/publish",
        ("X-API-Key", KEY),
        "{}",
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (403, "API_DISABLED"));
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("control.api_key")
    );
    let r = http(closed.local_addr(), "GET", "/health", &[], b"").await;
    assert_eq!(r.status, 200, "health needs no key");
    closed.stop();

    // A second bind of the same address fails in `start`.
    assert!(
        start(
            server.clone(),
            &ControlConfig {
                listen: addr,
                ..no_key
            },
            None,
        )
        .is_err()
    );

    // stop() is bounded even with a request left half-sent.
    let mut stuck = TcpStream::connect(addr).await.unwrap();
    stuck
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(idle.read(&mut buf).await.unwrap() > 0, "keep-alive reply");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let began = Instant::now();
    tokio::task::spawn_blocking(move || control.stop())
        .await
        .unwrap();
    let took = began.elapsed();
    assert!(
        took < STOP_GRACE + Duration::from_secs(2),
        "stop took {took:?}"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );

    drop(client);
    server.stop(Duration::from_secs(1));
}
