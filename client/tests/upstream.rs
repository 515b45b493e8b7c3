//! The Rust client against an independent implementation of the protocol: the upstream WSE
//! server (PyPI `wse-server` 2.5.1, installed into the test venv by `tests/python/setup-venv.sh`
//! and run by `tests/python/upstream_server.py`). The test starts it on a free loopback port with
//! `--publishers pub --ping-interval 2 --idle-timeout 3600` (the server must ping every few
//! seconds for the auto-pong check) and mints the tokens with its `--mint-token`.
//!
//! To run it against another live server instead, set `WSE_URL`, `WSE_TOKEN` (a subscriber) and
//! `WSE_PUB_TOKEN` (a connection allowed to publish).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use wse_client::{Connector, Error, TokenVia};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("set {name} (see the file's docs)"))
}

const WAIT: Duration = Duration::from_secs(10);
/// The upstream server prints its READY line within a second or two; this bounds a hang.
const START_WAIT: Duration = Duration::from_secs(30);

/// The upstream server, killed when dropped.
struct Upstream {
    child: Child,
    python: PathBuf,
    script: PathBuf,
    port: u16,
}

impl Upstream {
    /// Creates the test venv if needed (it fails, never skips, if Python >= 3.12 is missing),
    /// then starts upstream and waits for its `READY` line.
    fn start() -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(root.join("tests/python/setup-venv.sh"))
            .status()
            .expect("run tests/python/setup-venv.sh");
        assert!(status.success(), "tests/python/setup-venv.sh failed");
        let venv = std::env::var_os("WSE_PY_VENV")
            .map_or_else(|| root.join("target/py-venv"), PathBuf::from);
        let python = venv.join("bin/python");
        let script = root.join("tests/python/upstream_server.py");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut child = Command::new(&python)
            .arg(&script)
            .arg(port.to_string())
            .args([
                "--publishers",
                "pub",
                "--ping-interval",
                "2",
                "--idle-timeout",
                "3600",
            ])
            .args(["--run-seconds", "300"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the upstream server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("READY ") {
                    let _ = tx.send(());
                }
            }
        });
        let upstream = Self {
            child,
            python,
            script,
            port,
        };
        rx.recv_timeout(START_WAIT)
            .expect("the upstream server printed READY");
        upstream
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/wse", self.port)
    }

    fn mint(&self, sub: &str) -> String {
        let out = Command::new(&self.python)
            .arg(&self.script)
            .args(["--mint-token", sub])
            .output()
            .expect("mint a token");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("a token is text")
            .trim()
            .to_owned()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn against_the_upstream_server() {
    let (_upstream, url, token, pub_token) = match std::env::var("WSE_URL") {
        Ok(url) => (None, url, env("WSE_TOKEN"), env("WSE_PUB_TOKEN")),
        Err(_) => {
            let upstream = Upstream::start();
            let (url, alice, publisher) =
                (upstream.url(), upstream.mint("alice"), upstream.mint("pub"));
            (Some(upstream), url, alice, publisher)
        }
    };

    // Subscriber.
    let mut alice = Connector::new(&url).token(&token).connect().await.unwrap();
    println!("server_ready: {}", alice.server_ready().describe());
    println!("server_hello: {}", alice.server_hello().unwrap().describe());
    assert!(!alice.connection_id().is_empty());
    assert!(
        alice.server_ready().text.is_some(),
        "server_ready must be text"
    );
    let reply = alice.subscribe(&["rs-client-test"]).await.unwrap();
    println!("subscribe reply: {}", reply.describe());
    assert_eq!(reply.t, "subscription_update");
    assert_eq!(reply.p["success"], true);
    assert_eq!(reply.p["success_topics"], json!(["rs-client-test"]));

    // Publisher, on another connection (bearer header only, to cover that path).
    let mut publisher = Connector::new(&url)
        .token(&pub_token)
        .token_via(TokenVia::Bearer)
        .connect()
        .await
        .unwrap();
    let ack = publisher
        .publish_acked("rs-client-test", "tick", json!({"n": 1, "s": "é"}))
        .await
        .unwrap();
    println!("publish ack: {}", ack.describe());
    assert_eq!(ack.t, "publish_ack");
    publisher
        .publish("rs-client-test", "tick", json!({"n": 2}))
        .await
        .unwrap();

    for n in 1..=2 {
        let tick = alice.recv_until(|ev| ev.t == "tick", WAIT).await.unwrap();
        println!("received: {}", tick.describe());
        assert_eq!(tick.p["n"], n);
    }

    // Client ping -> PONG text frame with "t":"PONG" in its first 25 characters.
    let pong = alice.ping().await.unwrap();
    let text = pong.text.clone().expect("PONG must be a text frame");
    println!("pong: {text}");
    assert_eq!(pong.t, "PONG");
    assert!(
        text[..25.min(text.len())].contains(r#""t":"PONG""#),
        "{text}"
    );

    // Server pings are answered automatically (the server pings every --ping-interval).
    let deadline = tokio::time::Instant::now() + WAIT;
    while alice.auto_pongs_sent() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no server ping seen"
        );
        if let Some(ev) = alice
            .recv_timeout(Duration::from_millis(500))
            .await
            .unwrap()
        {
            println!("while waiting for a server ping: {}", ev.describe());
        }
    }

    // ... and with auto-pong off they are visible.
    let mut watcher = Connector::new(&url)
        .token(&token)
        .token_via(TokenVia::Cookie)
        .auto_pong(false)
        .connect()
        .await
        .unwrap();
    let ping = watcher.recv_until(|ev| ev.t == "ping", WAIT).await.unwrap();
    let text = ping.text.clone().expect("server ping must be a text frame");
    println!("server ping: {text}");
    assert!(
        text[..25.min(text.len())].contains(r#""t":"ping""#),
        "{text}"
    );

    // A bad token: error AUTH_FAILED, then close 4401.
    match Connector::new(&url).token("not-a-jwt").connect().await {
        Err(Error::Closed {
            code,
            reason,
            last_error,
        }) => {
            let last_error = last_error.expect("an error event before the close");
            println!(
                "bad token: close {code} {reason:?}, error {}",
                last_error.describe()
            );
            assert_eq!(code, 4401);
            assert_eq!(last_error.code(), Some("AUTH_FAILED"));
        }
        Err(other) => panic!("bad token: unexpected error {other:?}"),
        Ok(_) => panic!("bad token: connected"),
    }

    // No token at all.
    match Connector::new(&url).connect().await {
        Err(Error::Closed {
            code, last_error, ..
        }) => {
            let last_error = last_error.expect("an error event before the close");
            println!("no token: close {code}, error {}", last_error.describe());
            assert_eq!(code, 4401);
        }
        Err(other) => panic!("no token: unexpected error {other:?}"),
        Ok(_) => panic!("no token: connected"),
    }

    let info = publisher.close(1000, "done").await.unwrap();
    println!(
        "publisher close reply: {} {:?}, {} message(s) before",
        info.code,
        info.reason,
        info.events_before.len()
    );
    assert_eq!(info.code, 1000);
    let unsub = alice.unsubscribe(&["rs-client-test"]).await.unwrap();
    assert_eq!(unsub.t, "subscription_update");
    alice.close(1000, "done").await.unwrap();
    watcher.close(1000, "done").await.unwrap();
}
