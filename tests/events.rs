//! The application event stream (docs/API.md) through the real binary: events over
//! `GET /api/v1/events`, commands on the same socket, per-connection order across consumers on
//! two shards, consumers leaving and coming back, drop accounting when the backend stalls, and
//! webhook mode.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{API_KEY, Wse, token};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wse_client::{Client, Connector};

const T: Duration = Duration::from_secs(15);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An event-stream consumer: the socket and the events it has read so far.
struct Backend {
    ws: Ws,
    events: Vec<Value>,
    replies: Vec<Value>,
}

impl Backend {
    async fn connect(wse: &Wse) -> Backend {
        let url = format!("ws://{}/api/v1/events", wse.control.unwrap());
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("X-API-Key", API_KEY.parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        Backend {
            ws,
            events: Vec::new(),
            replies: Vec::new(),
        }
    }

    /// Reads one frame: an array of events or a reply.
    async fn read(&mut self) {
        let message = tokio::time::timeout(T, self.ws.next())
            .await
            .expect("the event stream went quiet")
            .expect("the event stream ended")
            .unwrap();
        match serde_json::from_str(message.to_text().unwrap()).unwrap() {
            Value::Array(events) => self.events.extend(events),
            reply => self.replies.push(reply),
        }
    }

    /// Reads until `done` holds.
    async fn until(&mut self, done: impl Fn(&Backend) -> bool) {
        while !done(self) {
            self.read().await;
        }
    }

    /// Sends a command and waits for its reply.
    async fn command(&mut self, id: u64, command: Value) -> Value {
        let mut command = command;
        command["id"] = json!(id);
        self.ws
            .send(Message::text(command.to_string()))
            .await
            .unwrap();
        loop {
            if let Some(i) = self.replies.iter().position(|r| r["id"] == id) {
                return self.replies.remove(i);
            }
            self.read().await;
        }
    }

    fn of_type<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events.iter().filter(move |e| e["type"] == kind)
    }
}

async fn client(wse: &Wse, user: &str) -> Client {
    Connector::new(wse.url())
        .token(token(user, json!({})))
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn events_and_commands_share_the_socket() {
    let wse = Wse::start(&["--cores", "2", "--presence-enabled", "true"]);
    let mut backend = Backend::connect(&wse).await;
    let mut ann = client(&wse, "ann").await;
    let id = ann.connection_id().to_owned();
    ann.send_json(&json!({"t": "hello", "p": {"n": 1}}))
        .await
        .unwrap();
    backend.until(|b| b.of_type("msg").count() == 1).await;
    let connect = backend.of_type("auth_connect").next().unwrap().clone();
    assert_eq!(connect["connection_id"], id.as_str());
    assert_eq!(connect["user_id"], "ann");
    assert_eq!(connect["shard"], u64::from_str_radix(&id[..2], 16).unwrap());
    assert_eq!(connect["payload"]["sub"], "ann");
    let msg = backend.of_type("msg").next().unwrap().clone();
    assert_eq!(msg["payload"], json!({"t": "hello", "p": {"n": 1}}));

    // Commands on the socket, answered by id.
    let reply = backend
        .command(
            7,
            json!({"op": "send_event", "connection_id": id, "event": {"t": "welcome"}}),
        )
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(ann.recv().await.unwrap().t, "welcome");
    let reply = backend
        .command(
            8,
            json!({"op": "subscribe", "connection_id": id, "topics": ["room"], "presence": {}}),
        )
        .await;
    assert_eq!(reply["result"]["success_topics"], json!(["room"]));
    let reply = backend
        .command(9, json!({"op": "presence", "topic": "room"}))
        .await;
    assert_eq!(reply["result"]["members"][0]["user_id"], "ann");
    let reply = backend
        .command(
            10,
            json!({"op": "send", "connection_id": "0000000100000077", "text": "x"}),
        )
        .await;
    assert_eq!(reply["error"]["code"], "UNKNOWN_CONNECTION");
    let reply = backend.command(11, json!({"op": "bogus"})).await;
    assert_eq!(
        (reply["ok"].clone(), reply["error"]["code"].clone()),
        (json!(false), json!("INVALID_REQUEST"))
    );

    // Text that is not JSON, binary that is not an encoding, the presence join, the disconnect.
    ann.send_text("plain words").await.unwrap();
    ann.send_binary(vec![1u8, 2, 3]).await.unwrap();
    drop(ann);
    backend
        .until(|b| b.of_type("disconnect").count() == 1 && b.of_type("presence_leave").count() == 1)
        .await;
    assert_eq!(
        backend.of_type("raw").next().unwrap()["payload"],
        "plain words"
    );
    assert_eq!(backend.of_type("bin").next().unwrap()["payload"], "AQID");
    assert_eq!(
        backend.of_type("presence_join").next().unwrap()["payload"]["topic"],
        "room"
    );
    let leave = backend.of_type("presence_leave").next().unwrap();
    assert_eq!(
        (leave["connection_id"].clone(), leave["user_id"].clone()),
        (json!(id), json!("ann"))
    );
    // Exactly these events, each delivered once (the counter moves just after the frame is
    // written, so it may trail what the backend has read by a moment).
    let mut kinds: Vec<&str> = backend
        .events
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "auth_connect",
            "bin",
            "disconnect",
            "msg",
            "presence_join",
            "presence_leave",
            "raw"
        ]
    );
    let deadline = Instant::now() + T;
    let mut delivered = wse.metric("wse_events_delivered_total", "").await;
    while delivered < 7.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        delivered = wse.metric("wse_events_delivered_total", "").await;
    }
    assert_eq!(delivered, 7.0);
}

/// Each connection's events reach the backend in its order — `auth_connect` first, its presence
/// events, `disconnect` last — although presence is decided by each topic's owner, another shard
/// for most of them. The backend connects last, so every shard's backlog is pulled at once.
#[tokio::test]
async fn presence_events_come_between_connect_and_disconnect() {
    const CLIENTS: usize = 24;
    const ROOMS: usize = 8;
    let wse = Wse::start(&["--cores", "4", "--presence-enabled", "true"]);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut c = client(&wse, &format!("u{i}")).await;
        let room = format!("room{}", i % ROOMS);
        let ack = c
            .subscribe_with(json!({"action": "subscribe", "topics": [room], "presence": {}}))
            .await
            .unwrap();
        assert_eq!(ack.p["success"], true, "{:?}", ack.raw);
        clients.push(c);
    }
    let ids: Vec<String> = clients
        .iter()
        .map(|c| c.connection_id().to_owned())
        .collect();
    for c in clients {
        c.close(1000, "bye").await.unwrap();
    }
    let mut backend = Backend::connect(&wse).await;
    backend
        .until(|b| {
            b.of_type("disconnect").count() == CLIENTS
                && b.of_type("presence_leave").count() == CLIENTS
        })
        .await;
    for id in &ids {
        let kinds: Vec<&str> = backend
            .events
            .iter()
            .filter(|e| e["connection_id"] == id.as_str())
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "auth_connect",
                "presence_join",
                "presence_leave",
                "disconnect"
            ],
            "connection {id}"
        );
    }
}

/// At shutdown the backend hears the `disconnect` of every connection the drain closed, then the
/// event stream closes with 1001 (going away), and the process exits 0.
#[tokio::test]
async fn a_drain_delivers_the_disconnects_then_closes_the_stream_with_1001() {
    const CLIENTS: usize = 6;
    let mut wse = Wse::start(&["--cores", "2"]);
    let mut backend = Backend::connect(&wse).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(client(&wse, &format!("u{i}")).await);
    }
    backend
        .until(|b| b.of_type("auth_connect").count() == CLIENTS)
        .await;
    wse.sigterm();
    let closes: Vec<_> = clients
        .into_iter()
        .map(|mut c| tokio::spawn(async move { c.expect_close(T).await.unwrap().code }))
        .collect();
    for close in closes {
        assert_eq!(close.await.unwrap(), 4300);
    }
    // Everything up to the close frame, then the end of the stream.
    let mut close = None;
    while let Some(message) = tokio::time::timeout(T, backend.ws.next())
        .await
        .expect("the event stream neither closed nor ended")
    {
        match message.unwrap() {
            Message::Text(text) => match serde_json::from_str(&text).unwrap() {
                Value::Array(events) => backend.events.extend(events),
                reply => panic!("unexpected reply {reply}"),
            },
            Message::Close(frame) => close = Some(frame.expect("a close code")),
            _ => {}
        }
    }
    assert_eq!(
        backend.of_type("disconnect").count(),
        CLIENTS,
        "{:?}",
        backend.events
    );
    let close = close.expect("no close frame before the end of the stream");
    assert_eq!(u16::from(close.code), 1001);
    let status = wse.wait_exit(T).expect("server exited");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn the_key_is_required_and_may_come_in_the_query() {
    let wse = Wse::start(&["--cores", "1"]);
    let base = format!("ws://{}/api/v1/events", wse.control.unwrap());
    let refused = tokio_tungstenite::connect_async(base.clone()).await;
    assert!(refused.is_err(), "no key must be refused");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{base}?api_key={API_KEY}"))
        .await
        .unwrap();
    ws.send(Message::text(r#"{"id":"a","op":"get_connection_count"}"#))
        .await
        .unwrap();
    let reply: Value =
        serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(
        reply,
        json!({"id": "a", "ok": true, "result": {"count": 0}})
    );
    let (status, body) = wse
        .http("GET", "/api/v1/events", &[("X-API-Key", API_KEY)], "")
        .await;
    assert_eq!(status, 426, "{body}");
}

/// Per connection: the `seq` of its `msg` events, in the order a consumer got them, and which
/// consumer got them.
fn sequences(backends: &[&Backend]) -> HashMap<String, (usize, Vec<u64>)> {
    let mut out: HashMap<String, (usize, Vec<u64>)> = HashMap::new();
    for (i, b) in backends.iter().enumerate() {
        for e in b.of_type("msg") {
            let conn = e["connection_id"].as_str().unwrap().to_owned();
            let entry = out.entry(conn).or_insert((i, Vec::new()));
            assert_eq!(entry.0, i, "one connection's events went to two consumers");
            entry.1.push(e["payload"]["p"]["seq"].as_u64().unwrap());
        }
    }
    out
}

#[tokio::test]
async fn each_connections_events_stay_in_order_on_one_consumer_under_load() {
    const CLIENTS: usize = 12;
    const MESSAGES: u64 = 300;
    let wse = Wse::start(&["--cores", "2"]);
    let mut b1 = Backend::connect(&wse).await;
    let mut b2 = Backend::connect(&wse).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(client(&wse, &format!("u{i}")).await);
    }
    let shards: std::collections::HashSet<String> = clients
        .iter()
        .map(|c| c.connection_id()[..2].to_owned())
        .collect();
    // All at once: the shards interleave their batches.
    let senders = clients.into_iter().map(|mut c| {
        tokio::spawn(async move {
            for seq in 0..MESSAGES {
                c.send_json(&json!({"t": "load", "p": {"seq": seq}}))
                    .await
                    .unwrap();
            }
            c
        })
    });
    let clients: Vec<Client> = futures_util::future::join_all(senders)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let total = CLIENTS * MESSAGES as usize;
    let deadline = Instant::now() + T;
    while b1.of_type("msg").count() + b2.of_type("msg").count() < total {
        assert!(Instant::now() < deadline, "events missing");
        tokio::select! {
            _ = b1.read() => {}
            _ = b2.read() => {}
        }
    }
    let seqs = sequences(&[&b1, &b2]);
    assert_eq!(seqs.len(), CLIENTS);
    for (conn, (_, got)) in &seqs {
        let want: Vec<u64> = (0..MESSAGES).collect();
        assert_eq!(got, &want, "connection {conn}");
    }
    let used: std::collections::HashSet<usize> = seqs.values().map(|(i, _)| *i).collect();
    assert_eq!(used.len(), 2, "both consumers got connections");
    assert!(
        shards.len() == 2 || CLIENTS < 2,
        "clients on both shards: {shards:?}"
    );
    assert_eq!(wse.metric("wse_inbound_dropped_total", "").await, 0.0);
    drop(clients);
}

#[tokio::test]
async fn consumers_leave_and_return_without_losing_the_backlog() {
    let wse = Wse::start(&["--cores", "2"]);
    let mut first = Backend::connect(&wse).await;
    let mut c = client(&wse, "dora").await;
    c.send_json(&json!({"t": "m", "p": {"seq": 0}}))
        .await
        .unwrap();
    first.until(|b| b.of_type("msg").count() == 1).await;
    first.ws.close(None).await.unwrap();
    drop(first);
    // Delivery to a socket is at most once: what the server writes before it has read the
    // close is lost with the socket. So wait until it has seen the consumer go.
    wait_consumers(&wse, 0).await;
    // No consumer: the events wait in the shards.
    for seq in 1..50u64 {
        c.send_json(&json!({"t": "m", "p": {"seq": seq}}))
            .await
            .unwrap();
    }
    assert_eq!(c.ping().await.unwrap().t, "PONG");
    let mut second = Backend::connect(&wse).await;
    second.until(|b| b.of_type("msg").count() == 49).await;
    let seqs = sequences(&[&second]);
    let got = &seqs[c.connection_id()].1;
    assert_eq!(got, &(1..50).collect::<Vec<u64>>());
    // Many come and go; the server carries on.
    for _ in 0..5 {
        let b = Backend::connect(&wse).await;
        drop(b);
    }
    wait_consumers(&wse, 1).await;
    c.send_json(&json!({"t": "m", "p": {"seq": 50}}))
        .await
        .unwrap();
    second.until(|b| b.of_type("msg").count() == 50).await;
    let (status, _) = wse.http("GET", "/health", &[], "").await;
    assert_eq!(status, 200);
}

/// Waits until the server counts `n` event-stream consumers (it notices a socket going away
/// when it next reads it).
async fn wait_consumers(wse: &Wse, n: u32) {
    let deadline = Instant::now() + T;
    while wse.metric("wse_event_consumers", "").await != f64::from(n) {
        assert!(Instant::now() < deadline, "consumers never came to {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn drops_are_counted_when_nobody_reads() {
    // Without a consumer: each shard keeps its newest 16 events.
    let wse = Wse::start(&["--cores", "1", "--app-event-queue-capacity", "16"]);
    let mut c = client(&wse, "eve").await;
    for seq in 0..100u64 {
        c.send_json(&json!({"t": "m", "p": {"seq": seq}}))
            .await
            .unwrap();
    }
    assert_eq!(c.ping().await.unwrap().t, "PONG");
    // 101 events (the connect and 100 messages) through a queue of 16.
    assert_eq!(
        wse.metric("wse_inbound_dropped_total", "reason=\"queue_full\"")
            .await,
        85.0
    );
    let mut b = Backend::connect(&wse).await;
    b.until(|b| b.of_type("msg").count() == 16).await;
    let seqs = sequences(&[&b]);
    assert_eq!(seqs[c.connection_id()].1, (84..100).collect::<Vec<u64>>());

    // A consumer that stops reading: its queue (here 100 events) overflows once the socket
    // buffers are full, and the oldest events are dropped and counted.
    let wse = Wse::start(&["--cores", "2", "--events-consumer-queue-capacity", "100"]);
    let stalled = Backend::connect(&wse).await;
    let mut c = client(&wse, "frank").await;
    let pad = "x".repeat(2000);
    let deadline = Instant::now() + T;
    while wse
        .metric("wse_inbound_dropped_total", "reason=\"consumer_slow\"")
        .await
        == 0.0
    {
        assert!(Instant::now() < deadline, "nothing was dropped");
        for seq in 0..2000u64 {
            c.send_json(&json!({"t": "m", "p": {"seq": seq, "pad": pad}}))
                .await
                .unwrap();
        }
        assert_eq!(c.ping().await.unwrap().t, "PONG");
    }
    // The server is fine: the API answers, and a new consumer gets new events.
    let mut fresh = Backend::connect(&wse).await;
    let reply = fresh.command(1, json!({"op": "health"})).await;
    assert_eq!(reply["result"]["status"], "ok");
    drop(stalled);
    let mut g = client(&wse, "gina").await;
    g.send_json(&json!({"t": "m", "p": {"seq": 0}}))
        .await
        .unwrap();
    fresh
        .until(|b| b.of_type("msg").any(|e| e["user_id"] == "gina"))
        .await;
}

/// A webhook receiver: answers the first `fail` POSTs with 500, then 200; returns the bodies.
async fn webhook_receiver(
    fail: usize,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Value>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut served = 0usize;
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            // Keep-alive: several requests per connection.
            loop {
                let mut buf = Vec::new();
                let head_end = loop {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break Some(i + 4);
                    }
                };
                let Some(head_end) = head_end else { break };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                served += 1;
                let status = if served <= fail {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                if served > fail {
                    let _ =
                        tx.send(serde_json::from_slice(&buf[head_end..head_end + len]).unwrap());
                }
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                if s.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn webhook_mode_posts_batches_and_retries() {
    let (addr, mut bodies) = webhook_receiver(2).await;
    let url = format!("http://{addr}/hook");
    let wse = Wse::start(&[
        "--cores",
        "2",
        "--events-webhook-url",
        &url,
        "--events-webhook-batch-interval",
        "20ms",
        "--events-webhook-batch-size",
        "8",
    ]);
    let mut c = client(&wse, "hank").await;
    for seq in 0..20u64 {
        c.send_json(&json!({"t": "m", "p": {"seq": seq}}))
            .await
            .unwrap();
    }
    let mut events = Vec::new();
    while events
        .iter()
        .filter(|e: &&Value| e["type"] == "msg")
        .count()
        < 20
    {
        let body = tokio::time::timeout(T, bodies.recv())
            .await
            .unwrap()
            .unwrap();
        let batch = body.as_array().unwrap().clone();
        assert!(!batch.is_empty() && batch.len() <= 8, "{}", batch.len());
        events.extend(batch);
    }
    let seqs: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "msg")
        .map(|e| e["payload"]["p"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (0..20).collect::<Vec<u64>>(),
        "in order, after the retries"
    );
    assert_eq!(
        wse.metric("wse_inbound_dropped_total", "reason=\"webhook_failed\"")
            .await,
        0.0
    );
    // Sockets may still connect for commands; they get no events in webhook mode.
    let mut b = Backend::connect(&wse).await;
    let reply = b.command(1, json!({"op": "get_connection_count"})).await;
    assert_eq!(reply["result"]["count"], 1);
    assert!(b.events.is_empty());
}
