//! Wire compatibility with the published Python client (`wse-client==2.5.1` from PyPI, run
//! unmodified): connect with a JWT, subscribe, receive publications, and stay connected past its
//! 40 s liveness watchdog without a reconnect.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::{Wse, token};

/// Longer than the client's 40 s watchdog.
const STAY_SECONDS: &str = "46";

fn venv_python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join("tests/python/setup-venv.sh"))
        .status()
        .expect("run tests/python/setup-venv.sh");
    assert!(
        status.success(),
        "setting up the Python venv failed: {status}"
    );
    std::env::var_os("WSE_PY_VENV")
        .map_or_else(|| root.join("target/py-venv"), PathBuf::from)
        .join("bin/python")
}

#[tokio::test]
async fn published_python_client_subscribes_receives_and_stays_connected() {
    let python = venv_python();
    // Ping well inside the client's watchdog; everything else as deployed.
    let wse = Wse::start(&["--cores", "2", "--ping-interval", "5s"]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/compat.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(wse.url())
        .arg(token("py-user", json!({})))
        .arg(STAY_SECONDS)
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
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
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
