//! The Centrifuge client protocol served by the real binary on `/connection/websocket`, with
//! the published centrifuge-python 0.7.0 (unmodified, JSON and protobuf) and a WSE client (the
//! Rust client) on the same topic: each receives the other's publication, in its own format.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Wse, collect_stderr, for_each_line, publisher_token, token, venv_python};
use wse_client::Connector;

/// Longest wait for one step of either client.
const STEP_WAIT: Duration = Duration::from_secs(30);
/// The channel both clients use: in the `room` namespace, which lets clients subscribe and
/// publish.
const CHANNEL: &str = "room:main";

fn server() -> Wse {
    Wse::start(&[
        "--cores",
        "2",
        "--centrifuge-namespaces",
        r#"[{"name":"room","allow_subscribe_for_client":true,"allow_publish_for_client":true}]"#,
    ])
}

async fn python_and_wse_share_a_topic(encoding: &str) {
    let python = venv_python();
    let wse = server();
    let mut wse_client = Connector::new(wse.url())
        .token(publisher_token("bob"))
        .connect()
        .await
        .unwrap();
    let ack = wse_client.subscribe(&[CHANNEL]).await.unwrap();
    assert_eq!(ack.p["success_topics"], json!([CHANNEL]));

    let url = format!("ws://{}/connection/websocket", wse.ws);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/centrifuge_real.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(&url)
        .arg(token("alice", json!({})))
        .arg(encoding)
        .arg(CHANNEL)
        .env("PYTHONUNBUFFERED", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tests/python/centrifuge_real.py");
    let stderr = collect_stderr(&mut child);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    for_each_line(child.stdout.take().unwrap(), move |line| {
        tx.send(serde_json::from_str(&line).unwrap_or(Value::String(line)))
            .is_ok()
    });
    let mut step = async |name: &str| -> Value {
        let got = tokio::time::timeout(STEP_WAIT, rx.recv()).await;
        let line = got.ok().flatten().unwrap_or_else(|| {
            panic!(
                "no `{name}` step; client stderr:\n{}\nserver log:\n{}",
                stderr.lock().unwrap(),
                wse.log()
            )
        });
        assert_eq!(line["step"], name, "{line}");
        line
    };
    step("connected").await;
    // Acknowledged by the server only once the topic's owner confirmed the subscription, so
    // the publication below reaches it.
    step("subscribed").await;

    wse_client
        .publish_acked(CHANNEL, "chat", json!({"text": "hi", "from": "wse"}))
        .await
        .unwrap();
    let from_wse = wse_client
        .recv_until(|e| e.t == "chat", STEP_WAIT)
        .await
        .unwrap();
    assert_eq!(from_wse.p, json!({"text": "hi", "from": "wse"}));
    let line = step("publication").await;
    assert_eq!(line["data"], json!({"text": "hi", "from": "wse"}));

    // The Python client's publication, as WSE clients see it: the `publication` event.
    let line = step("own_publication").await;
    assert_eq!(line["data"], json!({"text": "hello", "from": "python"}));
    let from_python = wse_client
        .recv_until(|e| e.c.as_deref() == Some("U"), STEP_WAIT)
        .await
        .unwrap();
    assert_eq!(
        from_python.raw,
        json!({"c": "U", "t": "publication", "p": {"text": "hello", "from": "python"}, "v": 1})
    );
    step("done").await;
    let status = child.wait().unwrap();
    assert!(status.success(), "{}", stderr.lock().unwrap());
}

#[tokio::test]
async fn centrifuge_python_json_and_a_wse_client_share_a_topic() {
    python_and_wse_share_a_topic("json").await;
}

#[tokio::test]
async fn centrifuge_python_protobuf_and_a_wse_client_share_a_topic() {
    python_and_wse_share_a_topic("protobuf").await;
}
