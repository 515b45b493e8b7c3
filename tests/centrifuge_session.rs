//! The Centrifuge session (`wse_shards::centrifuge`, sans-IO) against the published
//! centrifuge-python 0.7.0, unmodified, in JSON and in protobuf, over a real WebSocket.
//!
//! What this checks is the protocol engine — the dialect choice at the upgrade, the codec, the
//! session's replies and pushes, recovery after a forced reconnect (3011) — as a real client
//! reads them. It is not the server: the
//! listener here is the test's own (tokio-tungstenite) and the topic table an in-memory
//! stand-in for the shard, because the engine is not wired into the shard's connections yet
//! (docs/CENTRIFUGO.md). The stand-in does what the session asks and nothing more.

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
    Settings, encode_publication,
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
    cfg.centrifuge.namespaces = vec![NamespaceConfig {
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
    }];
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
                ..
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
                self.members
                    .entry(channel.to_string())
                    .or_default()
                    .push(Member {
                        client: client.to_owned(),
                        info: presence,
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
                if let Some(m) = self.members.get_mut(&*channel) {
                    m.retain(|m| m.client != client);
                }
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

    fn leave(&mut self, client: &str) {
        for members in self.members.values_mut() {
            members.retain(|m| m.client != client);
        }
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
    let mut session = Session::new(format, client.clone().into(), settings, Instant::now());
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    loop {
        while let Some(m) = session.poll_transmit() {
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
                Some(Ok(Message::Text(t))) => session.handle_message(cx(&auth), t.as_bytes()),
                Some(Ok(Message::Binary(b))) => session.handle_message(cx(&auth), &b),
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
async fn run_client(encoding: &str) -> (Vec<Value>, Arc<Mutex<Hub>>) {
    let python = venv_python();
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

    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/centrifuge_client.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(format!("ws://{addr}/connection/websocket"))
        .arg(token("py-user", json!({"info": {"name": "Py"}})))
        .arg(encoding)
        .env("PYTHONUNBUFFERED", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start centrifuge_client.py");
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
        if value["step"] == "presence_stats" {
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

async fn connect_subscribe_publish_history_presence(encoding: &str) {
    let (transcript, hub) = run_client(encoding).await;
    let steps: Vec<&str> = transcript
        .iter()
        .map(|v| v["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "connected",
            "subscribed",
            "publication",
            "history",
            "presence",
            "presence_stats",
            "recovered",
            "done"
        ]
    );
    assert_eq!(
        transcript[1],
        json!({"step": "subscribed", "recoverable": true, "positioned": true,
               "epoch": EPOCH, "offset": 0})
    );
    let message = json!({"text": "hello", "from": "python"});
    assert_eq!(
        transcript[2],
        json!({"step": "publication", "data": message, "offset": 1, "user": "py-user"})
    );
    assert_eq!(
        transcript[3],
        json!({"step": "history", "epoch": EPOCH, "offset": 1,
               "publications": [{"offset": 1, "data": message}]})
    );
    assert_eq!(
        transcript[4],
        json!({"step": "presence", "users": ["py-user"]})
    );
    assert_eq!(
        transcript[5],
        json!({"step": "presence_stats", "num_clients": 1, "num_users": 1})
    );
    // centrifuge-python reports the close code as the reason it is connecting again.
    assert_eq!(
        transcript[6],
        json!({"step": "recovered", "was_recovering": true, "recovered": true,
               "connecting": [0, 3011],
               "publications": [{"offset": 2, "data": {"n": 2}}, {"offset": 3, "data": {"n": 3}}]})
    );
    let format = if encoding == "protobuf" {
        Format::Protobuf
    } else {
        Format::Json
    };
    // One encode per publication with a subscriber (the two published while it was away had
    // none).
    assert_eq!(hub.lock().unwrap().encodes.get(&format), Some(&1));
}

#[tokio::test]
async fn centrifuge_python_json() {
    connect_subscribe_publish_history_presence("json").await;
}

#[tokio::test]
async fn centrifuge_python_protobuf() {
    connect_subscribe_publish_history_presence("protobuf").await;
}
