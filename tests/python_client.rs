//! Wire compatibility with the published Python client (`wse-client==2.5.1` from PyPI, its code
//! unmodified): connect with a JWT, subscribe, receive publications, and stay connected past its
//! liveness watchdog without a reconnect.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::{Wse, for_each_line, token, venv_python};

/// The client's heartbeat (a ping every 15 s, a reconnect after 40 s without a pong or a server
/// ping) and the server's (a ping every 5 s here, a close after its default 60 s without a frame)
/// run this many times faster, so that staying past the watchdog takes seconds, not a minute; the
/// ratios between them, and the code on both sides, are as deployed.
const WATCHDOG_SCALE: &str = "10";
/// Longer than the client's scaled 4 s watchdog plus one 1.5 s turn of its heartbeat loop, which
/// is when it checks.
const STAY_SECONDS: &str = "6";

#[tokio::test]
async fn published_python_client_subscribes_receives_and_stays_connected() {
    let python = venv_python();
    // The server's ping (5 s here) and idle timeout (its default 60 s), scaled like the
    // client's; everything else as deployed.
    let wse = Wse::start(&[
        "--cores",
        "2",
        "--ping-interval",
        "500ms",
        "--idle-timeout",
        "6s",
    ]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/compat.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(wse.url())
        .arg(token("py-user", json!({})))
        .arg(STAY_SECONDS)
        .arg(WATCHDOG_SCALE)
        .env("PYTHONUNBUFFERED", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start compat.py");
    let stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            s.push_str(&line);
            s.push('\n');
        }
        s
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for_each_line(child.stdout.take().unwrap(), move |line| {
        tx.send(line).is_ok()
    });
    let mut transcript = Vec::new();
    let mut next = async || -> String {
        tokio::time::timeout(Duration::from_secs(90), rx.recv())
            .await
            .expect("compat.py went quiet")
            .unwrap_or_default()
    };
    let ready = next().await;
    transcript.push(ready.clone());
    assert!(ready.starts_with("READY "), "{ready}");
    let subscribed = next().await;
    assert_eq!(subscribed, "SUBSCRIBED", "{ready}");
    let (status, body) = wse
        .api_publish("news", "headline", json!({"title": "hello from rust"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let got = next().await;
    assert_eq!(got, r#"GOT headline {"title": "hello from rust"}"#);
    let stayed = next().await;
    assert!(stayed.starts_with("STAYED "), "{stayed}");
    let (status, _) = wse.api_publish("news", "late", json!({"n": 2})).await;
    assert_eq!(status, 200);
    let late = next().await;
    assert_eq!(late, r#"GOT late {"n": 2}"#);
    let stats = next().await;
    transcript.extend([subscribed, got, stayed, late, stats.clone()]);
    let status = child.wait().unwrap();
    let errors = errors.join().unwrap();
    assert!(
        status.success(),
        "compat.py failed: {errors}\ntranscript: {transcript:?}"
    );
    let stats: serde_json::Value =
        serde_json::from_str(stats.strip_prefix("STATS ").unwrap()).unwrap();
    assert_eq!(stats["reconnect_count"], 0);
    assert_eq!(
        stats["connection_id"],
        ready.strip_prefix("READY ").unwrap()
    );
}

/// Drives `tests/python/recovery.py`: commands on its stdin, answers on its stdout.
struct PyDriver {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    errors: std::thread::JoinHandle<String>,
}

impl PyDriver {
    fn start(script: &str, args: &[String]) -> PyDriver {
        let python = venv_python();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/python")
            .join(script);
        let mut child = Command::new(python)
            .arg(script)
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the Python script");
        let stderr = child.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
                .join("\n")
        });
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        for_each_line(child.stdout.take().unwrap(), move |line| {
            tx.send(line).is_ok()
        });
        PyDriver {
            child,
            lines,
            errors,
        }
    }

    async fn expect(&mut self, prefix: &str) -> String {
        match tokio::time::timeout(Duration::from_secs(90), self.lines.recv()).await {
            Ok(Some(line)) if line.starts_with(prefix) => line,
            other => {
                let _ = self.child.kill();
                panic!(
                    "expected {prefix:?}, got {other:?}; python stderr: {}",
                    self.stderr()
                );
            }
        }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
    }

    fn stderr(&mut self) -> String {
        let _ = self.child.kill();
        std::mem::replace(&mut self.errors, std::thread::spawn(String::new))
            .join()
            .unwrap_or_default()
    }
}

async fn publish_ticks(wse: &Wse, seqs: std::ops::Range<u64>) {
    for seq in seqs {
        let (status, body) = wse.api_publish("feed", "tick", json!({"seq": seq})).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test]
async fn published_python_client_recovers_missed_messages_and_rebaselines_after_a_restart() {
    let args = |port: &str| -> Vec<String> {
        [
            "--listen",
            port,
            "--control-listen",
            "127.0.0.1:0",
            "--cores",
            "2",
            "--recovery-enabled",
            "true",
            "--auth-enabled",
            "true",
            "--auth-secret",
            support::SECRET,
            "--api-key",
            support::API_KEY,
            "--drain-timeout",
            "2s",
        ]
        .map(String::from)
        .to_vec()
    };
    let start = |a: Vec<String>| Wse::start_raw(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let mut wse = start(args("127.0.0.1:0"));
    let port = wse.ws.to_string();
    let mut py = PyDriver::start("recovery.py", &[wse.url(), token("py", json!({}))]);
    py.expect("READY").await;

    publish_ticks(&wse, 0..50).await;
    py.send("wait 50");
    py.expect("GOT 50").await;

    // Disconnected while 50 more are published: the client recovers them when it is back.
    py.send("drop");
    py.expect("DROPPED").await;
    publish_ticks(&wse, 50..100).await;
    py.send("wait 100");
    py.expect("GOT 100").await;

    // A restart loses the history: the client re-baselines on the new epoch and carries on.
    wse.sigterm();
    assert!(
        wse.wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    let wse = start(args(&port));
    py.send("wait_epoch_change");
    py.expect("REBASELINED").await;
    publish_ticks(&wse, 100..150).await;
    py.send("wait 150");
    py.expect("GOT 150").await;
    py.send("check 150");
    let ok = py.expect("OK").await;
    assert!(
        ok.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap()
            >= 2
    );
}
