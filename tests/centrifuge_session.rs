//! The Centrifuge session (`wse_shards::centrifuge`, sans-IO) against the published clients,
//! unmodified, in JSON and in protobuf, over a real WebSocket: centrifuge-python 0.7.0 and
//! centrifuge-js 5.7.4 under Node (with `ws`).
//!
//! What this checks is the protocol engine's side of what the server does not serve yet —
//! presence, presence stats, join and leave pushes (docs/CENTRIFUGO.md) — along with the rest
//! of each client's scenario, as real clients read it. It is not the server: the listener here
//! is the test's own (tokio-tungstenite) and the topic table an in-memory stand-in for the
//! shard, which does what the session asks and nothing more. The server itself, with these
//! clients, token-bowl-chat and a WSE client on one topic, is `tests/centrifuge_server.rs`.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use wse_shards::Config;
use wse_shards::auth::Authenticator;
use wse_shards::centrifuge::proto::{ClientInfo, Publication, StreamPosition};
use wse_shards::centrifuge::{
    Answer, Cx, DisconnectCode, Format, NamespaceConfig, Request as SessionRequest, Session,
    Settings, encode_join_leave, encode_publication,
};
use wse_shards::config::AuthConfig;
use wse_shards::dialect::{Choice, Dialect};
use wse_shards::handshake::UpgradeRequest;

use support::{SECRET, collect_stderr, for_each_line, token, venv_python};

/// The stand-in's one epoch: its history is never lost.
const EPOCH: &str = "0000c0de";
/// Longest wait for one line of the client's transcript.
const STEP_WAIT: Duration = Duration::from_secs(30);

fn config() -> Config {
    let mut cfg = Config::default();
    cfg.recovery.enabled = true;
    cfg.centrifuge.namespaces = vec![
        NamespaceConfig {
            name: "user".into(),
            history_size: 50,
            history_ttl: Duration::from_secs(300),
            presence: true,
            ..Default::default()
        },
        NamespaceConfig {
            name: "room".into(),
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            presence: true,
            join_leave: true,
            allow_subscribe_for_client: true,
            allow_publish_for_client: true,
            allow_history_for_client: true,
            allow_presence_for_client: true,
            ..Default::default()
        },
    ];
    cfg.validate().unwrap();
    cfg
}

/// What the stand-in sends a connection's task.
enum Out {
    /// A push, encoded for the connection's format.
    Push(Bytes),
    /// Close the connection with this code.
    Close(DisconnectCode),
}

/// A subscriber as the stand-in topic table holds it.
struct Member {
    client: String,
    info: Option<ClientInfo>,
    /// It asked for join/leave pushes.
    join_leave: bool,
    format: Format,
    tx: mpsc::UnboundedSender<Out>,
}

/// The in-memory stand-in for the shard: channels, their members and their history.
#[derive(Default)]
struct Hub {
    members: HashMap<String, Vec<Member>>,
    history: HashMap<String, Vec<Publication>>,
    /// Publication pushes encoded, per format: once per publication and format in use.
    encodes: HashMap<Format, usize>,
    /// Each connection's first data message, as received.
    first_messages: Vec<Vec<u8>>,
    /// Every message each connection was sent, in order.
    sent: HashMap<String, Vec<Bytes>>,
}

impl Hub {
    fn top(&self, channel: &str) -> StreamPosition {
        StreamPosition {
            offset: self
                .history
                .get(channel)
                .and_then(|h| h.last())
                .map_or(0, |p| p.offset),
            epoch: EPOCH.into(),
        }
    }

    /// Carries out one request of `client`'s session; the answer, if it has one.
    fn serve(
        &mut self,
        client: &str,
        format: Format,
        tx: &mpsc::UnboundedSender<Out>,
        request: SessionRequest,
    ) -> Option<Answer> {
        match request {
            SessionRequest::Subscribe {
                ticket,
                channel,
                stream,
                recover,
                presence,
                join_leave,
            } => {
                let top = self.top(&channel);
                let recovery = recover.map(|from| {
                    let missed: Vec<Publication> = self
                        .history
                        .get(&*channel)
                        .into_iter()
                        .flatten()
                        .filter(|p| p.offset > from.offset)
                        .cloned()
                        .collect();
                    (from.epoch.is_empty() || from.epoch == EPOCH, missed)
                });
                if let Some(info) = &presence {
                    self.join_leave(&channel, true, info);
                }
                self.members
                    .entry(channel.to_string())
                    .or_default()
                    .push(Member {
                        client: client.to_owned(),
                        info: presence,
                        join_leave,
                        format,
                        tx: tx.clone(),
                    });
                Some(Answer::Subscribed {
                    ticket,
                    top: stream.then_some(top),
                    recovery,
                })
            }
            SessionRequest::Unsubscribe { channel } => {
                self.remove(&channel, client);
                None
            }
            SessionRequest::Publish {
                ticket,
                channel,
                data,
                info,
            } => {
                self.publish(&channel, data, Some(info));
                Some(Answer::Published { ticket })
            }
            SessionRequest::Presence { ticket, channel } => Some(Answer::Presence {
                ticket,
                clients: self
                    .members
                    .get(&*channel)
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.info.clone())
                    .collect(),
            }),
            SessionRequest::PresenceStats { ticket, channel } => {
                let members: Vec<&ClientInfo> = self
                    .members
                    .get(&*channel)
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.info.as_ref())
                    .collect();
                let mut users: Vec<&str> = members.iter().map(|i| i.user.as_str()).collect();
                users.sort_unstable();
                users.dedup();
                Some(Answer::PresenceStats {
                    ticket,
                    num_clients: members.len() as u32,
                    num_users: users.len() as u32,
                })
            }
            SessionRequest::History {
                ticket,
                channel,
                limit,
                since,
                reverse,
            } => {
                let all = self.history.get(&*channel).cloned().unwrap_or_default();
                let after = since.map_or(0, |s| s.offset);
                let mut publications: Vec<Publication> =
                    all.into_iter().filter(|p| p.offset > after).collect();
                if reverse {
                    publications.reverse();
                }
                publications.truncate(limit);
                Some(Answer::History {
                    ticket,
                    publications,
                    top: self.top(&channel),
                })
            }
            SessionRequest::Send { .. } => None,
            // This stand-in has no application backend: the server's answer without one.
            SessionRequest::Rpc { ticket, .. } => Some(Answer::Failed {
                ticket,
                code: wse_shards::centrifuge::ErrorCode::NotAvailable,
            }),
        }
    }

    /// Numbers, keeps and fans out a publication, each format encoded once.
    fn publish(&mut self, channel: &str, data: Bytes, info: Option<ClientInfo>) {
        let offset = self.top(channel).offset + 1;
        let publication = Publication {
            data,
            info,
            offset,
            ..Default::default()
        };
        self.history
            .entry(channel.to_owned())
            .or_default()
            .push(publication.clone());
        let mut frames: HashMap<Format, Bytes> = HashMap::new();
        for m in self.members.get(channel).into_iter().flatten() {
            let frame = frames.entry(m.format).or_insert_with(|| {
                *self.encodes.entry(m.format).or_default() += 1;
                encode_publication(m.format, channel, publication.clone()).unwrap()
            });
            let _ = m.tx.send(Out::Push(frame.clone()));
        }
    }

    /// Closes every subscriber's connection with `code` (they leave at once: what is published
    /// next is only in the history).
    fn kick_all(&mut self, code: DisconnectCode) {
        for m in self.members.drain().flat_map(|(_, m)| m) {
            let _ = m.tx.send(Out::Close(code));
        }
    }

    /// A connection left `channel`: the others that asked are told.
    fn remove(&mut self, channel: &str, client: &str) {
        let Some(members) = self.members.get_mut(channel) else {
            return;
        };
        let gone: Vec<Member> = members.extract_if(.., |m| m.client == client).collect();
        for info in gone.into_iter().filter_map(|m| m.info) {
            self.join_leave(channel, false, &info);
        }
    }

    /// Sends a join or leave push of `who` to the members of `channel` that asked for them.
    fn join_leave(&mut self, channel: &str, joined: bool, who: &ClientInfo) {
        for m in self.members.get(channel).into_iter().flatten() {
            if m.join_leave && m.client != who.client {
                let push = encode_join_leave(m.format, channel, joined, who.clone()).unwrap();
                let _ = m.tx.send(Out::Push(push));
            }
        }
    }

    fn leave(&mut self, client: &str) {
        let channels: Vec<String> = self.members.keys().cloned().collect();
        for channel in channels {
            self.remove(&channel, client);
        }
    }
}

fn note_first(hub: &Mutex<Hub>, first: &mut bool, message: &[u8]) {
    if std::mem::take(first) {
        hub.lock().unwrap().first_messages.push(message.to_vec());
    }
}

fn cx(auth: &Authenticator) -> Cx<'_> {
    Cx {
        now: Instant::now(),
        wall_s: wall_s(),
        auth: Some(auth),
    }
}

fn wall_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Serves one connection: the upgrade (dialect and subprotocol chosen by the engine), then
/// the session, until either side closes.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    serial: usize,
    cfg: Arc<Config>,
    settings: Arc<Settings>,
    auth: Arc<Authenticator>,
    hub: Arc<Mutex<Hub>>,
) {
    let mut choice = None;
    // The signature is tungstenite's `Callback`; its error type is not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let upgrade = UpgradeRequest {
            path: req.uri().path().to_owned(),
            query: req.uri().query().map(str::to_owned),
            protocols: req
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            ..UpgradeRequest::default()
        };
        let chosen = Choice::select(&upgrade, &cfg);
        if let Some(p) = chosen.subprotocol {
            resp.headers_mut()
                .insert("sec-websocket-protocol", p.parse().unwrap());
        }
        choice = Some(chosen);
        Ok(resp)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, callback)
        .await
        .expect("upgrade");
    let Some(Choice {
        dialect: Dialect::Centrifuge(format),
        ..
    }) = choice
    else {
        panic!("the client did not reach the Centrifuge endpoint: {choice:?}");
    };
    let client = format!("client-{serial}");
    let mut first = true;
    let mut session = Session::new(format, client.clone().into(), settings, Instant::now());
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    loop {
        while let Some(m) = session.poll_transmit() {
            hub.lock()
                .unwrap()
                .sent
                .entry(client.clone())
                .or_default()
                .push(m.clone());
            let message = if format.is_binary() {
                Message::Binary(m)
            } else {
                Message::Text(String::from_utf8(m.to_vec()).unwrap().into())
            };
            if ws.send(message).await.is_err() {
                hub.lock().unwrap().leave(&client);
                return;
            }
        }
        let deadline = session
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let result = tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Text(t))) => {
                    note_first(&hub, &mut first, t.as_bytes());
                    session.handle_message(cx(&auth), t.as_bytes())
                }
                Some(Ok(Message::Binary(b))) => {
                    note_first(&hub, &mut first, &b);
                    session.handle_message(cx(&auth), &b)
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => Ok(()),
            },
            Some(out) = rx.recv() => match out {
                Out::Push(push) => session.push(push),
                Out::Close(code) => Err(code),
            },
            () = tokio::time::sleep_until(deadline.into()) => session.handle_timeout(Instant::now()),
        };
        // Carry out what the session asked, and what the answers released.
        let mut result = result;
        while let Some(request) = session.poll_request() {
            let answer = hub.lock().unwrap().serve(&client, format, &tx, request);
            if let (Some(answer), Ok(())) = (answer, &result) {
                result = session.answer(cx(&auth), answer);
            }
        }
        if let Err(code) = result {
            while let Some(m) = session.poll_transmit() {
                let _ = ws
                    .send(if format.is_binary() {
                        Message::Binary(m)
                    } else {
                        Message::Text(String::from_utf8(m.to_vec()).unwrap().into())
                    })
                    .await;
            }
            let _ = ws
                .close(Some(CloseFrame {
                    code: code.code().into(),
                    reason: code.reason().into(),
                }))
                .await;
            break;
        }
    }
    hub.lock().unwrap().leave(&client);
}

/// Runs `centrifuge_client.py` against a fresh stand-in and returns its transcript (one JSON
/// value per step) and the hub.
/// The published clients this test drives.
#[derive(Clone, Copy, PartialEq)]
enum Sdk {
    /// centrifuge-python 0.7.0 (`tests/python/centrifuge_client.py`).
    Python,
    /// centrifuge-js 5.7.4 under Node (`tests/node/centrifuge_client.mjs`).
    Js,
}

/// The command that runs `sdk`'s script; its last arguments are the URL, the token and the
/// encoding.
fn client_command(sdk: Sdk) -> Command {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match sdk {
        Sdk::Python => {
            let mut c = Command::new(venv_python());
            c.arg(root.join("tests/python/centrifuge_client.py"))
                .env("PYTHONUNBUFFERED", "1");
            c
        }
        Sdk::Js => {
            let status = Command::new(root.join("tests/node/setup-centrifuge-js.sh"))
                .status()
                .expect("run tests/node/setup-centrifuge-js.sh");
            assert!(
                status.success(),
                "installing centrifuge-js failed: {status}"
            );
            let dir = std::env::var_os("CENTRIFUGE_JS_DIR")
                .map_or_else(|| root.join("target/centrifuge-js"), PathBuf::from);
            let mut c = Command::new("node");
            c.arg(root.join("tests/node/centrifuge_client.mjs"))
                .arg(dir);
            c
        }
    }
}

/// Starts the stand-in: the engine behind a listener of the test's own, and its hub.
async fn stand_in() -> (std::net::SocketAddr, Arc<Mutex<Hub>>) {
    let cfg = Arc::new(config());
    let settings = Arc::new(Settings::new(
        &cfg.centrifuge,
        cfg.limits.max_outbound_queue_bytes,
    ));
    let auth = Arc::new(
        Authenticator::new(&AuthConfig {
            enabled: true,
            secret: Some(SECRET.into()),
            ..Default::default()
        })
        .unwrap(),
    );
    let hub = Arc::new(Mutex::new(Hub::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_hub = Arc::clone(&hub);
    tokio::spawn(async move {
        let mut serial = 0;
        while let Ok((stream, _)) = listener.accept().await {
            serial += 1;
            tokio::spawn(serve_connection(
                stream,
                serial,
                Arc::clone(&cfg),
                Arc::clone(&settings),
                Arc::clone(&auth),
                Arc::clone(&server_hub),
            ));
        }
    });
    (addr, hub)
}

async fn run_client(sdk: Sdk, encoding: &str) -> (Vec<Value>, Arc<Mutex<Hub>>) {
    let mut command = client_command(sdk);
    let (addr, hub) = stand_in().await;
    let mut child = command
        .arg(format!("ws://{addr}/connection/websocket"))
        .arg(token("sdk-user", json!({"info": {"name": "Sdk"}})))
        .arg(encoding)
        .args((sdk == Sdk::Python).then(|| token("other-user", json!({"info": {"name": "Other"}}))))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the client's script");
    let errors = collect_stderr(&mut child);
    let (tx, mut rx) = mpsc::unbounded_channel();
    for_each_line(child.stdout.take().unwrap(), move |line| {
        tx.send(line).is_ok()
    });
    let mut transcript = Vec::new();
    loop {
        let line = tokio::time::timeout(STEP_WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the client went quiet after {transcript:?}; stderr: {}",
                    errors.lock().unwrap()
                )
            });
        let Some(line) = line else { break };
        let value: Value = serde_json::from_str(&line).unwrap();
        if sdk == Sdk::Python && value["step"] == "presence_stats" {
            // Force a reconnect, and publish what the client will have to recover.
            let mut hub = hub.lock().unwrap();
            hub.kick_all(DisconnectCode::ForceReconnect);
            for n in [2, 3] {
                hub.publish("room:main", Bytes::from(format!("{{\"n\":{n}}}")), None);
            }
        }
        let done = value["step"] == "done";
        transcript.push(value);
        if done {
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{status}; transcript {transcript:?}; stderr: {}",
        errors.lock().unwrap()
    );
    (transcript, hub)
}

/// The step named `name` of a transcript.
fn step<'t>(transcript: &'t [Value], name: &str) -> &'t Value {
    transcript
        .iter()
        .find(|v| v["step"] == name)
        .unwrap_or_else(|| panic!("no {name} in {transcript:?}"))
}

async fn connect_subscribe_publish_history_presence(sdk: Sdk, encoding: &str) {
    let (transcript, hub) = run_client(sdk, encoding).await;
    let steps: Vec<&str> = transcript
        .iter()
        .map(|v| v["step"].as_str().unwrap())
        .filter(|s| *s != "connected")
        .collect();
    let mut expected = vec![
        "subscribed",
        "publication",
        "history",
        "presence",
        "presence_stats",
    ];
    if sdk == Sdk::Python {
        expected.insert(3, "join_leave");
    }
    if sdk == Sdk::Python {
        expected.push("recovered");
    }
    expected.push("done");
    assert_eq!(steps, expected);
    assert_eq!(
        step(&transcript, "subscribed"),
        &json!({"step": "subscribed", "recoverable": true, "positioned": true,
               "epoch": EPOCH, "offset": 0})
    );
    let from = if sdk == Sdk::Python { "python" } else { "js" };
    let message = json!({"text": "hello", "from": from});
    assert_eq!(
        step(&transcript, "publication"),
        &json!({"step": "publication", "data": message, "offset": 1, "user": "sdk-user"})
    );
    assert_eq!(
        step(&transcript, "history"),
        &json!({"step": "history", "epoch": EPOCH, "offset": 1,
               "publications": [{"offset": 1, "data": message}]})
    );
    assert_eq!(
        step(&transcript, "presence"),
        &json!({"step": "presence", "users": ["sdk-user"]})
    );
    assert_eq!(
        step(&transcript, "presence_stats"),
        &json!({"step": "presence_stats", "num_clients": 1, "num_users": 1})
    );
    if sdk == Sdk::Python {
        // Join and leave pushes, with the joiner's connection info embedded as JSON.
        assert_eq!(
            step(&transcript, "join_leave"),
            &json!({"step": "join_leave",
                   "join": {"user": "other-user", "conn_info": {"name": "Other"}},
                   "leave": {"user": "other-user", "same_client": true}})
        );
        // centrifuge-python reports the close code as the reason it is connecting again.
        assert_eq!(
            step(&transcript, "recovered"),
            &json!({"step": "recovered", "was_recovering": true, "recovered": true,
                   "connecting": [0, 3011],
                   "publications": [{"offset": 2, "data": {"n": 2}}, {"offset": 3, "data": {"n": 3}}]})
        );
    }
    let hub = hub.lock().unwrap();
    if sdk == Sdk::Js && encoding == "json" {
        // The client sent its connect and its subscribe in one message, id after the body.
        let first = String::from_utf8(hub.first_messages[0].clone()).unwrap();
        let lines: Vec<Value> = first
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{first}");
        assert!(
            lines[0]["connect"].is_object() && lines[1]["subscribe"].is_object(),
            "{first}"
        );
        assert!(first.starts_with("{\"connect\":"), "{first}");
    }
    let format = if encoding == "protobuf" {
        Format::Protobuf
    } else {
        Format::Json
    };
    // One encode per publication with a subscriber (the two published while the Python client
    // was away had none).
    assert_eq!(hub.encodes.get(&format), Some(&1));
}

#[tokio::test]
async fn centrifuge_python_json() {
    connect_subscribe_publish_history_presence(Sdk::Python, "json").await;
}

#[tokio::test]
async fn centrifuge_python_protobuf() {
    connect_subscribe_publish_history_presence(Sdk::Python, "protobuf").await;
}

#[tokio::test]
async fn centrifuge_js_json() {
    connect_subscribe_publish_history_presence(Sdk::Js, "json").await;
}

#[tokio::test]
async fn centrifuge_js_protobuf() {
    connect_subscribe_publish_history_presence(Sdk::Js, "protobuf").await;
}
