//! The Centrifuge client protocol served by the real binary on `/connection/websocket`, with
//! the published centrifuge-python 0.7.0 (unmodified, JSON and protobuf) and a WSE client (the
//! Rust client) on the same topic: each receives the other's publication, in its own format,
//! with the offsets of the topic owner's ring, which the Python client's positioned subscribe,
//! `history`, `presence`, `presence_stats` and recovery after a reconnect forced through the server API (3011) read,
//! which meets the server's tokens (3500 terminal for a bad one, a refresh before expiry, 3005
//! without one), and whose `rpc` a stand-in backend answers from the event stream; centrifuge-js
//! 5.7.4 under Node (JSON and protobuf); and token-bowl-chat
//! 4.0.2 (unmodified) with a stand-in of its backend that publishes through
//! Centrifugo's HTTP API (`/api/publish`): server-side subscriptions from the token's `channels`, a room and a direct
//! message each exactly once at the right users.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::{
    API_KEY, SECRET, Wse, collect_stderr, for_each_line, publisher_token, token, token_signed,
    venv_python,
};
use wse_client::Connector;

/// Longest wait for one step of either client.
const STEP_WAIT: Duration = Duration::from_secs(30);
/// The channel both clients use: in the `room` namespace, which lets clients subscribe and
/// publish.
const CHANNEL: &str = "room:main";

fn server() -> Wse {
    server_with(&[])
}

/// [`server`], with `extra` arguments.
fn server_with(extra: &[&str]) -> Wse {
    let mut args = vec![
        "--cores",
        "2",
        "--recovery-enabled",
        "true",
        "--presence-enabled",
        "true",
        "--centrifuge-namespaces",
        r#"[{"name":"room","allow_subscribe_for_client":true,"allow_publish_for_client":true,
            "allow_history_for_client":true,"history_size":10,"history_ttl":"300s",
            "presence":true,"allow_presence_for_client":true,"join_leave":true}]"#,
    ];
    args.extend_from_slice(extra);
    Wse::start(&args)
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
    let mut child = loopback_python(&python, script)
        .arg(&url)
        .arg(token("alice", json!({"info": {"name": "Alice"}})))
        .arg(encoding)
        .arg(CHANNEL)
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
    // the publication below reaches it; positioned at the top of the owner's ring.
    let subscribed = step("subscribed").await;
    assert_eq!(subscribed["recoverable"], json!(true));
    assert_eq!(subscribed["offset"], json!(0));
    let epoch = subscribed["epoch"].as_str().unwrap().to_owned();
    assert_eq!(epoch.len(), 8, "{subscribed}");
    // The application sees the Centrifuge connection like any other: alice, on one topic.
    let (status, body) = wse
        .http("GET", "/api/v1/connections", &[("X-API-Key", API_KEY)], "")
        .await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    let mut users: Vec<(String, u64)> = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["user_id"].as_str().unwrap().to_owned(),
                c["topics"].as_u64().unwrap(),
            )
        })
        .collect();
    users.sort();
    assert_eq!(users, [("alice".to_owned(), 1), ("bob".to_owned(), 1)]);
    let connection_of = |user: &str| -> String {
        listed["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["user_id"] == user)
            .unwrap()["connection_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (alice_id, bob_id) = (connection_of("alice"), connection_of("bob"));
    // The Python subscription asked for join/leave pushes: its own join first.
    assert_eq!(
        step("own_join").await,
        json!({"step": "own_join", "kind": "join", "client": alice_id, "user": "alice",
               "conn_info": {"name": "Alice"}})
    );

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
    assert_eq!(line["offset"], json!(1));

    // The Python client's publication, as WSE clients see it: the `publication` event.
    let line = step("own_publication").await;
    assert_eq!(line["data"], json!({"text": "hello", "from": "python"}));
    assert_eq!(line["offset"], json!(2));
    let from_python = wse_client
        .recv_until(|e| e.c.as_deref() == Some("U"), STEP_WAIT)
        .await
        .unwrap();
    assert_eq!(
        from_python.raw,
        json!({"tp": CHANNEL, "e": epoch, "o": 2,
            "c": "U", "t": "publication", "p": {"text": "hello", "from": "python"}, "v": 1})
    );
    // The history, read from the topic owner's ring.
    let history = step("history").await;
    assert_eq!(
        history,
        json!({"step": "history", "epoch": epoch, "offset": 2, "publications": [
            {"offset": 1, "data": {"text": "hi", "from": "wse"}},
            {"offset": 2, "data": {"text": "hello", "from": "python"}}]})
    );
    // Presence from the topic owner's members: alice (Centrifuge) and bob (WSE).
    assert_eq!(
        step("presence_stats").await,
        json!({"step": "presence_stats", "num_clients": 2, "num_users": 2})
    );
    // The members' connections, by client id (the connection id): alice with her token's
    // `info`, bob (a WSE client) with none.
    assert_eq!(
        step("presence").await,
        json!({"step": "presence", "clients": {
            alice_id.clone(): {"client": alice_id, "user": "alice", "conn_info": {"name": "Alice"}},
            bob_id.clone(): {"client": bob_id, "user": "bob", "conn_info": null},
        }})
    );
    // Another subscriber comes and goes: the Python client hears its join and its leave.
    let mut dave = Connector::new(wse.url())
        .token(publisher_token("dave"))
        .connect()
        .await
        .unwrap();
    let ack = dave.subscribe(&[CHANNEL]).await.unwrap();
    assert_eq!(ack.p["success_topics"], json!([CHANNEL]));
    let dave_id = dave.connection_id().to_owned();
    dave.close(1000, "done").await.unwrap();
    assert_eq!(
        step("join_leave").await,
        json!({"step": "join_leave", "events": [
            {"kind": "join", "client": dave_id, "user": "dave", "conn_info": null},
            {"kind": "leave", "client": dave_id, "user": "dave", "conn_info": null}]})
    );

    // The application forces a reconnect (3011) and two publications happen meanwhile.
    let (_, body) = wse
        .http("GET", "/api/v1/connections", &[("X-API-Key", API_KEY)], "")
        .await;
    let listed: Value = serde_json::from_str(&body).unwrap();
    let alice = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["user_id"] == "alice")
        .unwrap()["connection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, answer) = wse
        .http(
            "POST",
            &format!("/api/v1/connections/{alice}/disconnect"),
            &[("X-API-Key", API_KEY)],
            r#"{"code":3011,"reason":"force reconnect"}"#,
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    for n in [3, 4] {
        wse_client
            .publish_acked(CHANNEL, "chat", json!({"n": n}))
            .await
            .unwrap();
    }
    assert_eq!(
        step("recovered").await,
        json!({"step": "recovered", "was_recovering": true, "recovered": true,
               "publications": [{"offset": 3, "data": {"n": 3}}, {"offset": 4, "data": {"n": 4}}]})
    );
    step("done").await;
    let status = child.wait().unwrap();
    assert!(status.success(), "{}", stderr.lock().unwrap());
}

/// Installs the published centrifuge-js (and playwright-core) from `tests/node/package-lock.json`
/// once, and returns where.
fn centrifuge_js_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join("tests/node/setup-centrifuge-js.sh"))
        .status()
        .expect("run tests/node/setup-centrifuge-js.sh");
    assert!(
        status.success(),
        "installing centrifuge-js failed: {status}"
    );
    std::env::var_os("CENTRIFUGE_JS_DIR")
        .map_or_else(|| root.join("target/centrifuge-js"), PathBuf::from)
}

/// Runs `tests/node/<script>` with the centrifuge-js directory and `args`; returns the JSON line
/// it printed for each step, failing with its error output and the server's log if it failed.
fn node_steps(wse: &Wse, script: &str, args: &[String]) -> Vec<Value> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("node")
        .arg(root.join("tests/node").join(script))
        .arg(centrifuge_js_dir())
        .args(args)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        wse.log()
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// centrifuge-js 5.7.4 under Node (`tests/node/centrifuge_client.mjs`): connect and subscribe
/// in one message, a positioned subscription, its own publication back, history, presence and
/// presence stats.
fn centrifuge_js(encoding: &str) {
    let wse = server();
    let lines = node_steps(
        &wse,
        "centrifuge_client.mjs",
        &[
            format!("ws://{}/connection/websocket", wse.ws),
            token("alice", json!({})),
            encoding.to_owned(),
        ],
    );
    let epoch = lines[0]["epoch"].as_str().unwrap().to_owned();
    let message = json!({"text": "hello", "from": "js"});
    assert_eq!(
        lines,
        [
            json!({"step": "subscribed", "recoverable": true, "positioned": true,
                   "epoch": epoch, "offset": 0}),
            // The publisher's client info is not carried (docs/CENTRIFUGO.md).
            json!({"step": "publication", "data": message, "offset": 1, "user": null}),
            json!({"step": "history", "epoch": epoch, "offset": 1,
                   "publications": [{"offset": 1, "data": message}]}),
            json!({"step": "presence", "users": ["alice"]}),
            json!({"step": "presence_stats", "num_clients": 1, "num_users": 1}),
            json!({"step": "done"}),
        ]
    );
}

#[test]
fn centrifuge_js_json() {
    centrifuge_js("json");
}

#[test]
fn centrifuge_js_protobuf() {
    centrifuge_js("protobuf");
}

/// Debian's Chromium, found on `PATH` (or at `CHROMIUM`); a missing browser fails the test with
/// the command that installs it, never skips it.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
        .expect(
            "chromium is needed: apt-get install --no-install-recommends chromium (.ci/run does)",
        )
}

/// centrifuge-js 5.7.4's browser bundle in headless Chromium (`tests/node/centrifuge_browser.mjs`,
/// driven by playwright-core): the page, served from its own origin, which the server's
/// `allowed_origins` lists, connects and subscribes in one message, receives a publication made through the server API, disconnects, and on
/// reconnecting recovers exactly the two publications made while it was away.
#[test]
fn centrifuge_js_in_chromium() {
    let browser = chromium();
    // The page's port, chosen here so that the server can be told its origin.
    let page_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let page_origin = format!("http://127.0.0.1:{page_port}");
    let wse = server_with(&["--allowed-origins", &page_origin]);
    let lines = node_steps(
        &wse,
        "centrifuge_browser.mjs",
        &[
            format!("ws://{}/connection/websocket", wse.ws),
            token("alice", json!({})),
            format!("http://{}", wse.control.expect("control plane on")),
            API_KEY.to_owned(),
            browser.display().to_string(),
            page_port.to_string(),
        ],
    );
    assert_eq!(lines[0], json!({"step": "origin", "origin": page_origin}));
    let publication =
        |n: u64| json!({"step": "back", "kind": "publication", "data": {"n": n}, "offset": n});
    assert_eq!(
        lines[1..],
        [
            json!({"step": "subscribed", "kind": "subscribed", "wasRecovering": false,
                   "recovered": false, "recoverable": true}),
            json!({"step": "live", "kind": "publication", "data": {"n": 1}, "offset": 1}),
            // A disconnect the client asked for (code 0: client-side).
            json!({"step": "away", "kind": "disconnected", "code": 0}),
            json!({"step": "back", "kind": "subscribed", "wasRecovering": true,
                   "recovered": true, "recoverable": true}),
            publication(2),
            publication(3),
            json!({"step": "done"}),
        ]
    );
}

/// How long the short-lived connection token of [`tokens`] is valid, seconds.
const SHORT_TOKEN_S: u64 = 3;

/// centrifuge-python 0.7.0 with the server's tokens (`tests/python/centrifuge_tokens.py`): a
/// token with a wrong signature is refused with 3500, on which the client stops (terminal); a
/// client that refreshes its expiring token stays connected past the expiry, while one that
/// cannot is closed with 3005 once the expiry and `centrifuge.expired_close_delay` (1 s here)
/// have passed.
fn tokens(encoding: &str) {
    let wse = server_with(&["--centrifuge-expired-close-delay", "1s"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/centrifuge_tokens.py");
    let output = loopback_python(&venv_python(), script)
        .arg(format!("ws://{}/connection/websocket", wse.ws))
        .arg(token_signed("not-the-servers-secret-0123456789", "alice"))
        .arg(token("alice", json!({"exp": now + SHORT_TOKEN_S})))
        .arg(token("alice", json!({})))
        .arg(encoding)
        .arg("room:tokens")
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        wse.log()
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            json!({"step": "bad_token", "changes": [["connecting", 0], ["disconnected", 3500]]}),
            json!({"step": "get_token_called"}),
            json!({"step": "stuck", "kind": "connecting", "code": 3005}),
            json!({"step": "refreshed", "publication": {"text": "after expiry"},
                   "state_changes": 0}),
            json!({"step": "done"}),
        ]
    );
}

#[test]
fn centrifuge_python_json_token_refused_refreshed_and_expired() {
    tokens("json");
}

#[test]
fn centrifuge_python_protobuf_token_refused_refreshed_and_expired() {
    tokens("protobuf");
}

#[tokio::test]
async fn centrifuge_python_json_and_a_wse_client_share_a_topic() {
    python_and_wse_share_a_topic("json").await;
}

#[tokio::test]
async fn centrifuge_python_protobuf_and_a_wse_client_share_a_topic() {
    python_and_wse_share_a_topic("protobuf").await;
}

/// Python from the test venv running `script` on loopback: unbuffered, no proxy from the
/// environment (httpx and requests honour proxy variables), output piped.
fn loopback_python(python: &std::path::Path, script: PathBuf) -> Command {
    let mut c = Command::new(python);
    c.arg(script)
        .env("PYTHONUNBUFFERED", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[tokio::test]
async fn token_bowl_chat_room_and_direct_messages() {
    let python = venv_python();
    let wse = Wse::start(&[
        "--cores",
        "2",
        "--centrifuge-namespaces",
        r#"[{"name":"room"},{"name":"user"}]"#,
    ]);
    // The stand-in backend (examples/token-bowl/backend.py): its connection tokens' `channels`
    // claim makes server-side subscriptions; it publishes with `cent` through Centrifugo's HTTP
    // API, as the real backend does.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut backend = loopback_python(&python, root.join("examples/token-bowl/backend.py"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            API_KEY,
            "--secret",
            SECRET,
        ])
        .arg("--ws-url")
        .arg(format!("ws://{}/connection/websocket", wse.ws))
        .arg("--api-url")
        .arg(format!("http://{}/api", wse.control.unwrap()))
        .spawn()
        .expect("start examples/token-bowl/backend.py");
    let backend_errors = collect_stderr(&mut backend);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for_each_line(backend.stdout.take().unwrap(), move |line| {
        tx.send(line).is_ok()
    });
    let base = tokio::time::timeout(STEP_WAIT, rx.recv())
        .await
        .ok()
        .flatten()
        .and_then(|l| l.strip_prefix("listening on ").map(str::to_owned))
        .unwrap_or_else(|| {
            panic!(
                "the backend did not start: {}",
                backend_errors.lock().unwrap()
            )
        });
    let _backend = KillOnDrop(backend);

    let script = root.join("tests/python/token_bowl_client.py");
    let mut child = loopback_python(&python, script)
        .arg(&base)
        .spawn()
        .expect("start token_bowl_client.py");
    let errors = collect_stderr(&mut child);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for_each_line(child.stdout.take().unwrap(), move |line| {
        tx.send(line).is_ok()
    });
    let line = tokio::time::timeout(STEP_WAIT, rx.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            panic!(
                "no result; stderr: {}\nbackend: {}\nserver log:\n{}",
                errors.lock().unwrap(),
                backend_errors.lock().unwrap(),
                wse.log()
            )
        });
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{status}; stderr: {}",
        errors.lock().unwrap()
    );
    let result: Value = serde_json::from_str(&line).unwrap();
    let room = json!({"id": "m0", "content": "hello room", "type": "room", "from": "alice"});
    let dm = json!({"id": "m1", "content": "psst bob", "type": "direct", "from": "alice"});
    let end = json!({"id": "m2", "content": "end", "type": "room", "from": "bob"});
    assert_eq!(
        result,
        json!({"got": {"alice": [room, end], "bob": [room, dm, end]}, "errors": []})
    );
}

/// The application closes a Centrifuge connection through the server API with Centrifuge's
/// 3011 ("force reconnect"), which the clients answer by reconnecting and recovering.
#[tokio::test]
async fn the_server_api_lists_and_disconnects_a_centrifuge_connection() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let wse = server();
    let url = format!("ws://{}/connection/websocket", wse.ws);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let connect = json!({"id": 1, "connect": {"token": token("carol", json!({}))}});
    ws.send(Message::text(connect.to_string())).await.unwrap();
    let reply = tokio::time::timeout(STEP_WAIT, ws.next()).await.unwrap();
    let reply: Value = serde_json::from_str(reply.unwrap().unwrap().to_text().unwrap()).unwrap();
    let client = reply["connect"]["client"].as_str().unwrap().to_owned();

    let (status, body) = wse
        .http("GET", "/api/v1/connections", &[("X-API-Key", API_KEY)], "")
        .await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["connections"][0]["connection_id"], json!(client));
    assert_eq!(listed["connections"][0]["user_id"], json!("carol"));

    let path = format!("/api/v1/connections/{client}/disconnect");
    let body = json!({"code": 3011, "reason": "force reconnect"}).to_string();
    let (status, answer) = wse
        .http("POST", &path, &[("X-API-Key", API_KEY)], &body)
        .await;
    assert_eq!(status, 200, "{answer}");
    let close = loop {
        match tokio::time::timeout(STEP_WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame.unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (3011, "force reconnect")
    );
}

/// Kills a child process when dropped, so a failing test does not leave it running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// centrifuge-python's `rpc` answered by a stand-in backend: it reads the `rpc` events from the
/// event stream and replies through `POST /api/v1/connections/{id}/rpc_reply`, once with data
/// and once with an error, which the client gets as they are.
async fn python_rpc_answered_by_the_backend(encoding: &str) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let python = venv_python();
    let wse = server();
    // The backend reads the events before the client connects: only then is an rpc an event.
    let mut request = format!("ws://{}/api/v1/events", wse.control.unwrap())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("X-API-Key", API_KEY.parse().unwrap());
    let (mut events, _) = tokio_tungstenite::connect_async(request).await.unwrap();

    let url = format!("ws://{}/connection/websocket", wse.ws);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/centrifuge_rpc.py");
    let mut child = loopback_python(&python, script)
        .arg(&url)
        .arg(token("alice", json!({})))
        .arg(encoding)
        .spawn()
        .expect("run tests/python/centrifuge_rpc.py");
    let stderr = collect_stderr(&mut child);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    for_each_line(child.stdout.take().unwrap(), move |line| {
        tx.send(serde_json::from_str(&line).unwrap_or(Value::String(line)))
            .is_ok()
    });
    let mut steps = Vec::new();
    let mut methods = Vec::new();
    // Bounded: two rpcs, two steps, each within STEP_WAIT.
    for _ in 0..64 {
        if steps.len() == 2 {
            break;
        }
        tokio::select! {
            line = rx.recv() => match line {
                Some(line) => steps.push(line),
                None => panic!(
                    "the client ended after {steps:?}; stderr:\n{}\nserver log:\n{}",
                    stderr.lock().unwrap(),
                    wse.log()
                ),
            },
            frame = tokio::time::timeout(STEP_WAIT, events.next()) => {
                let frame = frame.expect("the event stream went quiet").unwrap().unwrap();
                let batch: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
                for ev in batch.as_array().unwrap() {
                    if ev["type"] != "rpc" {
                        continue;
                    }
                    assert_eq!(ev["user_id"], "alice", "{ev}");
                    let p = &ev["payload"];
                    methods.push(p["method"].as_str().unwrap().to_owned());
                    let reply = match p["method"].as_str().unwrap() {
                        "sum" => json!({"request": p["request"],
                            "data": {"sum": p["data"]["a"].as_i64().unwrap()
                                + p["data"]["b"].as_i64().unwrap()}}),
                        _ => json!({"request": p["request"],
                            "error": {"code": 1001, "message": "no such thing"}}),
                    };
                    let path = format!(
                        "/api/v1/connections/{}/rpc_reply",
                        ev["connection_id"].as_str().unwrap()
                    );
                    let (status, body) = wse
                        .http("POST", &path, &[("X-API-Key", API_KEY)], &reply.to_string())
                        .await;
                    assert_eq!((status, body.as_str()), (200, r#"{"replied":true}"#));
                }
            }
        }
    }
    assert_eq!(methods, ["sum", "fail"]);
    assert_eq!(
        steps,
        [
            json!({"step": "result", "data": {"sum": 3}}),
            json!({"step": "error", "code": 1001, "message": "no such thing"}),
        ]
    );
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn centrifuge_python_json_rpc_answered_by_the_backend() {
    python_rpc_answered_by_the_backend("json").await;
}

#[tokio::test]
async fn centrifuge_python_protobuf_rpc_answered_by_the_backend() {
    python_rpc_answered_by_the_backend("protobuf").await;
}
