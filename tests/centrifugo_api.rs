//! Centrifugo's HTTP server API (`/api/<method>`) on the real binary, driven by the published
//! `cent` 5.2.0 client (unmodified; `tests/python/cent_api.py`): publications reach a
//! centrifuge-python 0.7.0 subscriber and a WSE subscriber (the Rust client); presence,
//! presence stats, channels, info, batch, subscribe, unsubscribe and disconnect answers compared
//! field by field; history read from the topic's owner (limit, since, reverse, 112) and removed
//! keeping the stream's position; refresh expiring a Centrifuge connection; what is not available
//! answers 108; errors (a bad key, an unknown method, bad JSON, an oversized body) in both error
//! modes. And `server.allowed_origins` on both WebSocket
//! endpoints.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};
use support::{API_KEY, Wse, collect_stderr, publisher_token, token, venv_python};
use wse_client::Connector;

/// Longest wait for one step of a client or one answer of `cent`.
const STEP_WAIT: Duration = Duration::from_secs(30);
/// The channel everyone uses: in the `room` namespace, with presence.
const CHANNEL: &str = "room:main";
/// `limits.max_message_size` of the server: the control plane's body limit too.
const BODY_LIMIT: usize = 64 * 1024;

fn server() -> Wse {
    Wse::start(&[
        "--cores",
        "2",
        "--presence-enabled",
        "true",
        "--max-message-size",
        &BODY_LIMIT.to_string(),
        "--centrifuge-namespaces",
        r#"[{"name":"room","presence":true,"allow_subscribe_for_client":true}]"#,
    ])
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// A Python child that prints one JSON line per event or answer.
struct Lines {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Lines {
    fn spawn(mut cmd: Command) -> Lines {
        let mut child = cmd
            .env("PYTHONUNBUFFERED", "1")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a Python client");
        let stderr = collect_stderr(&mut child);
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Lines {
            child,
            stdin,
            rx,
            stderr,
        }
    }

    fn next(&self, what: &str) -> Value {
        let line = self.rx.recv_timeout(STEP_WAIT).unwrap_or_else(|_| {
            panic!(
                "no line for {what}; stderr:\n{}",
                self.stderr.lock().unwrap()
            )
        });
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
    }

    /// One `cent_api.py` command and its answer.
    fn ask(&mut self, command: Value) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        self.next(&command.to_string())
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cent(wse: &Wse) -> Lines {
    let mut cmd = Command::new(venv_python());
    cmd.arg(script("cent_api.py"))
        .arg(format!("http://{}/api", wse.control.unwrap()))
        .arg(API_KEY);
    Lines::spawn(cmd)
}

/// A centrifuge-python subscriber of [`CHANNEL`] as `user`, whose connection token carries
/// `claims` too (`info`: its `conn_info`).
fn centrifuge_subscriber(wse: &Wse, user: &str, claims: Value) -> Lines {
    let mut cmd = Command::new(venv_python());
    cmd.arg(script("centrifuge_subscriber.py"))
        .arg(format!("ws://{}/connection/websocket", wse.ws))
        .arg(token(user, claims))
        .arg(CHANNEL);
    let sub = Lines::spawn(cmd);
    assert_eq!(sub.next("subscribed"), json!({"step": "subscribed"}));
    sub
}

fn call(method: &str, args: Value) -> Value {
    json!({"call": method, "args": args})
}

fn raw(path: &str, body: &str, headers: Value) -> Value {
    json!({"raw": {"path": path, "body": body, "headers": headers}})
}

/// What `cent` reports for a Centrifugo error reply.
fn api_error(code: u32, message: &str) -> Value {
    json!({"error": {"type": "CentApiResponseError", "code": code, "message": message,
        "status_code": null}})
}

/// cent's `PublishResult` with nothing set: our publications come back without offset/epoch.
fn published() -> Value {
    json!({"epoch": "", "offset": 0})
}

#[tokio::test]
async fn cent_publishes_to_centrifuge_and_wse_subscribers_and_reads_the_channel() {
    let wse = server();
    let mut bob = Connector::new(wse.url())
        .token(publisher_token("bob"))
        .connect()
        .await
        .unwrap();
    let ack = bob.subscribe(&[CHANNEL]).await.unwrap();
    assert_eq!(ack.p["success_topics"], json!([CHANNEL]));
    let alice = centrifuge_subscriber(&wse, "alice", json!({"info": {"device": "py"}}));
    let mut cent = cent(&wse);

    // publish, broadcast and a batch of publish + presence_stats: each publication reaches
    // both subscribers once, in order.
    let answer = cent.ask(call(
        "publish",
        json!({"channel": CHANNEL, "data": {"n": 1}}),
    ));
    assert_eq!(answer, json!({"result": published()}));
    let answer = cent.ask(call(
        "broadcast",
        json!({"channels": [CHANNEL, "nowhere:x"], "data": {"n": 2}}),
    ));
    assert_eq!(
        answer,
        json!({"result": {"responses": [
            {"error": null, "result": published()},
            {"error": {"code": 102, "message": "unknown channel"}, "result": null},
        ]}})
    );
    let answer = cent.ask(call(
        "batch",
        json!({"commands": [
            {"call": "publish", "args": {"channel": CHANNEL, "data": {"n": 3}}},
            {"call": "presence_stats", "args": {"channel": CHANNEL}},
        ]}),
    ));
    assert_eq!(
        answer,
        json!({"result": {"replies": [published(), {"num_clients": 2, "num_users": 2}]}})
    );
    for n in 1..=3 {
        let line = alice.next("a publication");
        assert_eq!(line, json!({"step": "publication", "data": {"n": n}}));
        let event = bob
            .recv_until(|e| e.t == "publication", STEP_WAIT)
            .await
            .unwrap();
        assert_eq!(event.p, json!({"n": n}));
    }

    // presence: one entry per connection, keyed by its client id (bob's WSE connection without
    // info, alice's with her token's); presence_stats, channels, info.
    let (status, body) = wse
        .http("GET", "/api/v1/connections", &[("X-API-Key", API_KEY)], "")
        .await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    let connection_of = |user: &str| {
        listed["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["user_id"] == user)
            .unwrap_or_else(|| panic!("{user} not listed: {listed}"))["connection_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let bob_id = connection_of("bob");
    let answer = cent.ask(call("presence", json!({"channel": CHANNEL})));
    let presence = answer["result"]["presence"].as_object().unwrap();
    assert_eq!(presence.len(), 2, "{answer}");
    assert_eq!(
        presence[&bob_id],
        json!({"client": bob_id, "user": "bob", "conn_info": null, "chan_info": null})
    );
    // A Centrifuge connection's client id is its connection id.
    let alice_id = connection_of("alice");
    assert_eq!(
        presence[&alice_id],
        json!({"client": alice_id, "user": "alice", "conn_info": {"device": "py"},
            "chan_info": null})
    );
    let answer = cent.ask(call("presence_stats", json!({"channel": CHANNEL})));
    assert_eq!(
        answer,
        json!({"result": {"num_clients": 2, "num_users": 2}})
    );
    let channels = json!({"result": {"channels": {CHANNEL: {"num_clients": 2}}}});
    assert_eq!(cent.ask(call("channels", json!({}))), channels);
    assert_eq!(
        cent.ask(call("channels", json!({"pattern": "room:*"}))),
        channels
    );
    assert_eq!(
        cent.ask(call("channels", json!({"pattern": "user:*"}))),
        json!({"result": {"channels": {}}})
    );
    let answer = cent.ask(call("info", json!({})));
    let node = &answer["result"]["nodes"][0];
    assert_eq!(answer["result"]["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(node["num_clients"], json!(2));
    assert_eq!(node["num_users"], json!(2));
    assert_eq!(node["num_subs"], json!(2));
    assert_eq!(node["num_channels"], json!(1));
    assert_eq!(node["version"], json!(env!("CARGO_PKG_VERSION")));
    assert_eq!(node["uid"].as_str().unwrap().len(), 36, "{node}");
    assert!(
        node["name"]
            .as_str()
            .unwrap()
            .ends_with(&format!("_{}", wse.ws.port())),
        "{node}"
    );

    // subscribe / unsubscribe move bob's WSE connection on and off another channel.
    let other = "room:other";
    let answer = cent.ask(call("subscribe", json!({"user": "bob", "channel": other})));
    assert_eq!(answer, json!({"result": {}}));
    assert_eq!(
        cent.ask(call("channels", json!({"pattern": "*other"}))),
        json!({"result": {"channels": {other: {"num_clients": 1}}}})
    );
    let answer = cent.ask(call("publish", json!({"channel": other, "data": {"n": 4}})));
    assert_eq!(answer, json!({"result": published()}));
    let event = bob
        .recv_until(|e| e.t == "publication", STEP_WAIT)
        .await
        .unwrap();
    assert_eq!(event.p, json!({"n": 4}));
    let answer = cent.ask(call(
        "unsubscribe",
        json!({"user": "bob", "channel": other}),
    ));
    assert_eq!(answer, json!({"result": {}}));
    assert_eq!(
        cent.ask(call("channels", json!({"pattern": "*other"}))),
        json!({"result": {"channels": {}}})
    );

    // What is not available answers 108, as Centrifugo without the feature (`room` keeps no
    // history).
    for (method, args) in [
        ("history", json!({"channel": CHANNEL, "limit": 10})),
        ("history_remove", json!({"channel": CHANNEL})),
        ("refresh", json!({"user": "alice", "info": {"a": 1}})),
    ] {
        assert_eq!(
            cent.ask(call(method, args)),
            api_error(108, "not available"),
            "{method}"
        );
    }
    assert_eq!(
        cent.ask(call("publish", json!({"channel": "nowhere:x", "data": {}}))),
        api_error(102, "unknown channel")
    );

    // disconnect with alice's connection in the whitelist, or another client named: nobody
    // leaves.
    for args in [
        json!({"user": "alice", "whitelist": [alice_id]}),
        json!({"user": "alice", "client": "00000000000000ff"}),
    ] {
        assert_eq!(cent.ask(call("disconnect", args)), json!({"result": {}}));
    }
    // Still connected: a publication made after those answers reaches her (a closed connection
    // would show as `disconnected` first).
    let answer = cent.ask(call(
        "publish",
        json!({"channel": CHANNEL, "data": {"n": 5}}),
    ));
    assert_eq!(answer, json!({"result": published()}));
    assert_eq!(
        alice.next("a publication"),
        json!({"step": "publication", "data": {"n": 5}})
    );

    // disconnect: alice's Centrifuge connection closes with Centrifugo's default, 3503 (the
    // clients do not reconnect).
    let answer = cent.ask(call("disconnect", json!({"user": "alice"})));
    assert_eq!(answer, json!({"result": {}}));
    assert_eq!(
        alice.next("disconnected"),
        json!({"step": "disconnected", "code": 3503, "reason": "force disconnect"})
    );
    let answer = cent.ask(call("presence_stats", json!({"channel": CHANNEL})));
    assert_eq!(
        answer,
        json!({"result": {"num_clients": 1, "num_users": 1}})
    );
}

#[tokio::test]
async fn cent_and_plain_http_get_centrifugo_errors() {
    let wse = server();
    let mut cent = cent(&wse);
    let key = json!({"X-API-Key": API_KEY});

    // A wrong key: 401 with an empty body, which cent reports as unauthorised.
    let mut wrong = call("info", json!({}));
    wrong["key"] = json!("not-the-key");
    assert_eq!(
        cent.ask(wrong),
        json!({"error": {"type": "CentUnauthorizedError", "code": null, "message": null,
            "status_code": null}})
    );
    assert_eq!(
        cent.ask(raw("/api/info", "{}", json!({}))),
        json!({"status": 401, "body": ""})
    );
    // The key as `Authorization: apikey <key>` and as `?api_key=`.
    let auth = json!({"Authorization": format!("apikey {API_KEY}")});
    let answer = cent.ask(raw("/api/presence_stats", r#"{"channel":"room:a"}"#, auth));
    assert_eq!(
        answer,
        json!({"status": 200, "body": r#"{"result":{"num_clients":0,"num_users":0}}"#})
    );
    let path = format!("/api/channels?api_key={API_KEY}");
    assert_eq!(
        cent.ask(raw(&path, "", json!({}))),
        json!({"status": 200, "body": r#"{"result":{"channels":{}}}"#})
    );

    // Unknown method, bad JSON, a body that is not an object, unknown fields, an oversized
    // body: 200 with the error, or with `X-Centrifugo-Error-Mode: transport` the HTTP status
    // and the error alone.
    let transport = json!({"X-API-Key": API_KEY, "X-Centrifugo-Error-Mode": "transport"});
    let big = format!(
        r#"{{"channel":"room:a","data":"{}"}}"#,
        "x".repeat(BODY_LIMIT)
    );
    for (path, body, code, message, status) in [
        ("/api/nope", "{}", 104, "method not found", 404),
        ("/api/publish", "{", 107, "bad request", 400),
        ("/api/publish", "[1]", 107, "bad request", 400),
        (
            "/api/publish",
            r#"{"channel":"room:a","dta":1}"#,
            107,
            "bad request",
            400,
        ),
        (
            "/api/publish",
            r#"{"channel":"","data":1}"#,
            107,
            "bad request",
            400,
        ),
        (
            "/api/history",
            r#"{"channel":"room:a"}"#,
            108,
            "not available",
            400,
        ),
        ("/api/publish", big.as_str(), 107, "bad request", 400),
    ] {
        let error = json!({"code": code, "message": message});
        let answer = cent.ask(raw(path, body, key.clone()));
        assert_eq!(answer["status"], json!(200), "{path} {answer}");
        let got: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
        assert_eq!(got, json!({ "error": error }), "{path}");
        let answer = cent.ask(raw(path, body, transport.clone()));
        assert_eq!(answer["status"], json!(status), "{path} {answer}");
        let got: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
        assert_eq!(got, error, "{path}");
    }

    // A batch answers each command on its own, errors included, with 200 in either mode.
    let body = json!({"commands": [
        {"publish": {"channel": "nowhere:x", "data": {}}},
        {"nope": {}},
        {"presence_stats": {"channel": "room:a"}},
    ]})
    .to_string();
    let answer = cent.ask(raw("/api/batch", &body, transport));
    assert_eq!(answer["status"], json!(200), "{answer}");
    let got: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        got,
        json!({"replies": [
            {"error": {"code": 102, "message": "unknown channel"}},
            {"error": {"code": 104, "message": "method not found"}},
            {"presence_stats": {"num_clients": 0, "num_users": 0}},
        ]})
    );
    // The `/api/v1` API is untouched by the Centrifugo routes.
    let (status, body) = wse
        .http("GET", "/api/v1/health", &[("X-API-Key", API_KEY)], "")
        .await;
    assert_eq!(status, 200, "{body}");
}

/// The connection id of each live connection of `user`, as `/api/v1/connections` lists them.
async fn connections_of(wse: &Wse, user: &str) -> Vec<String> {
    let (status, body) = wse
        .http("GET", "/api/v1/connections", &[("X-API-Key", API_KEY)], "")
        .await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["user_id"] == user)
        .map(|c| c["connection_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn cent_refreshes_and_expires_centrifuge_connections() {
    let wse = server();
    let mut bob = Connector::new(wse.url())
        .token(publisher_token("bob"))
        .connect()
        .await
        .unwrap();
    bob.subscribe(&[CHANNEL]).await.unwrap();
    let alice = centrifuge_subscriber(&wse, "alice", json!({}));
    let mut cent = cent(&wse);
    let first = connections_of(&wse, "alice").await;
    assert_eq!(first.len(), 1, "{first:?}");

    // A later expiry, and a refresh of a WSE-only user: nobody leaves (a publication made after
    // the answers reaches both).
    let in_an_hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    for args in [
        json!({"user": "alice", "expire_at": in_an_hour}),
        json!({"user": "bob", "expired": true}),
    ] {
        assert_eq!(cent.ask(call("refresh", args)), json!({"result": {}}));
    }
    let answer = cent.ask(call(
        "publish",
        json!({"channel": CHANNEL, "data": {"n": 1}}),
    ));
    assert_eq!(answer, json!({"result": published()}));
    assert_eq!(
        alice.next("a publication"),
        json!({"step": "publication", "data": {"n": 1}})
    );
    let event = bob
        .recv_until(|e| e.t == "publication", STEP_WAIT)
        .await
        .unwrap();
    assert_eq!(event.p, json!({"n": 1}));

    // expired: alice's connection closes with 3005, on which the client reconnects (a new
    // connection) and subscribes again.
    let answer = cent.ask(call("refresh", json!({"user": "alice", "expired": true})));
    assert_eq!(answer, json!({"result": {}}));
    assert_eq!(alice.next("resubscribed"), json!({"step": "subscribed"}));
    // The one close so far (3005 is counted among the `other` codes).
    assert_eq!(wse.metric("wse_closes_total", "code=\"other\"").await, 1.0);
    // The old connection goes once its close completes (bounded wait).
    let deadline = std::time::Instant::now() + STEP_WAIT;
    loop {
        let now = connections_of(&wse, "alice").await;
        if now.len() == 1 && now != first {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alice's connections: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No user nor client: 107.
    assert_eq!(
        cent.ask(call("refresh", json!({"user": ""}))),
        api_error(107, "bad request")
    );
}

/// [`server`] with recovery on and a namespace that keeps history (`news`, 10 publications)
/// next to `room`, which keeps none.
fn history_server() -> Wse {
    Wse::start(&[
        "--cores",
        "2",
        "--recovery-enabled",
        "true",
        "--presence-enabled",
        "true",
        "--centrifuge-namespaces",
        r#"[{"name":"room","presence":true,"allow_subscribe_for_client":true},
            {"name":"news","history_size":10,"history_ttl":"300s"}]"#,
    ])
}

/// `(data.n, offset)` of each publication of a cent `HistoryResult`.
fn history_of(answer: &Value) -> Vec<(i64, u64)> {
    answer["result"]["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("no publications: {answer}"))
        .iter()
        .map(|p| {
            (
                p["data"]["n"].as_i64().unwrap(),
                p["offset"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn cent_reads_and_removes_a_channels_history() {
    let wse = history_server();
    let mut cent = cent(&wse);
    let channel = "news:h";
    for n in 1..=3 {
        let answer = cent.ask(call(
            "publish",
            json!({"channel": channel, "data": {"n": n}}),
        ));
        assert_eq!(answer, json!({"result": published()}));
    }

    // No limit: the stream's position alone.
    let top = cent.ask(call("history", json!({"channel": channel})));
    assert_eq!(top["result"]["offset"], json!(3), "{top}");
    assert_eq!(top["result"]["publications"], json!([]), "{top}");
    let epoch = top["result"]["epoch"].as_str().unwrap().to_owned();
    assert!(!epoch.is_empty(), "{top}");

    let answer = cent.ask(call("history", json!({"channel": channel, "limit": 10})));
    assert_eq!(history_of(&answer), [(1, 1), (2, 2), (3, 3)]);
    assert_eq!(answer["result"]["epoch"], json!(epoch));
    let answer = cent.ask(call("history", json!({"channel": channel, "limit": -1})));
    assert_eq!(history_of(&answer), [(1, 1), (2, 2), (3, 3)]);
    let answer = cent.ask(call(
        "history",
        json!({"channel": channel, "limit": 2, "reverse": true}),
    ));
    assert_eq!(history_of(&answer), [(3, 3), (2, 2)]);
    let since = json!({"offset": 1, "epoch": epoch});
    let answer = cent.ask(call(
        "history",
        json!({"channel": channel, "limit": 10, "since": since}),
    ));
    assert_eq!(history_of(&answer), [(2, 2), (3, 3)]);
    assert_eq!(answer["result"]["offset"], json!(3));

    // A position in another epoch: 112; a namespace without history: 108; none: 102.
    let since = json!({"offset": 1, "epoch": "not-the-epoch"});
    assert_eq!(
        cent.ask(call(
            "history",
            json!({"channel": channel, "limit": 10, "since": since})
        )),
        api_error(112, "unrecoverable position")
    );
    assert_eq!(
        cent.ask(call("history", json!({"channel": "room:x", "limit": 10}))),
        api_error(108, "not available")
    );
    assert_eq!(
        cent.ask(call("history", json!({"channel": "nowhere:x"}))),
        api_error(102, "unknown channel")
    );
    // In the transport error mode, 112 is 416.
    let transport = json!({"X-API-Key": API_KEY, "X-Centrifugo-Error-Mode": "transport"});
    let body = json!({"channel": channel, "limit": 1, "since": {"offset": 1, "epoch": "x"}});
    let answer = cent.ask(raw("/api/history", &body.to_string(), transport));
    assert_eq!(answer["status"], json!(416), "{answer}");
    // A plain request with nulls for the optional fields, as Centrifugo takes it.
    let body = r#"{"channel":"news:h","limit":1,"since":null,"reverse":null}"#;
    let answer = cent.ask(raw("/api/history", body, json!({"X-API-Key": API_KEY})));
    let got: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        got,
        json!({"result": {"publications": [{"data": {"n": 1}, "offset": 1}],
            "offset": 3, "epoch": epoch}})
    );

    // history_remove: the publications go, the position stays (Centrifugo's behaviour).
    let answer = cent.ask(call("history_remove", json!({"channel": channel})));
    assert_eq!(answer, json!({"result": {}}));
    let answer = cent.ask(call("history", json!({"channel": channel, "limit": -1})));
    assert!(history_of(&answer).is_empty(), "{answer}");
    assert_eq!(answer["result"]["offset"], json!(3));
    assert_eq!(answer["result"]["epoch"], json!(epoch));
    // A position from before the removal is no longer followed by what came after it.
    let since = json!({"offset": 1, "epoch": epoch});
    assert_eq!(
        cent.ask(call(
            "history",
            json!({"channel": channel, "limit": 10, "since": since})
        )),
        api_error(112, "unrecoverable position")
    );
    // The next publication gets the next offset in the same epoch, and is read from the top.
    let answer = cent.ask(call(
        "publish",
        json!({"channel": channel, "data": {"n": 4}}),
    ));
    assert_eq!(answer, json!({"result": published()}));
    let since = json!({"offset": 3, "epoch": epoch});
    let answer = cent.ask(call(
        "history",
        json!({"channel": channel, "limit": 10, "since": since}),
    ));
    assert_eq!(history_of(&answer), [(4, 4)]);
    assert_eq!(answer["result"]["epoch"], json!(epoch));
    assert_eq!(
        cent.ask(call("history_remove", json!({"channel": "room:x"}))),
        api_error(108, "not available")
    );
    // A channel that never had a publication: nothing to remove, not an error.
    assert_eq!(
        cent.ask(call("history_remove", json!({"channel": "news:empty"}))),
        json!({"result": {}})
    );
}

/// The status line of the server's answer to an upgrade request on `path` with `origin`.
fn upgrade_status(wse: &Wse, path: &str, origin: Option<&str>) -> String {
    let mut s = std::net::TcpStream::connect(wse.ws).unwrap();
    s.set_read_timeout(Some(STEP_WAIT)).unwrap();
    let origin = origin.map_or_else(String::new, |o| format!("Origin: {o}\r\n"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n",
        wse.ws
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Bounded by the read timeout and the size of a status line.
    while !head.ends_with(b"\r\n") && head.len() < 256 {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).trim_end().to_owned()
}

#[tokio::test]
async fn allowed_origins_guard_both_websocket_endpoints() {
    let wse = Wse::start(&[
        "--allowed-origins",
        "https://app.example.com, http://*.local.test",
    ]);
    for path in ["/wse", "/connection/websocket"] {
        for origin in [
            None,
            Some("https://app.example.com"),
            Some("http://a.local.test"),
        ] {
            assert_eq!(
                upgrade_status(&wse, path, origin),
                "HTTP/1.1 101 Switching Protocols",
                "{path} {origin:?}"
            );
        }
        assert_eq!(
            upgrade_status(&wse, path, Some("https://evil.example")),
            "HTTP/1.1 403 Forbidden",
            "{path}"
        );
    }
    assert_eq!(
        wse.metric("wse_rejected_total", "reason=\"origin\"").await,
        2.0
    );

    // The default allows every origin.
    let open = Wse::start(&[]);
    assert_eq!(
        upgrade_status(&open, "/connection/websocket", Some("https://evil.example")),
        "HTTP/1.1 101 Switching Protocols"
    );
}
