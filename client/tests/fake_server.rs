//! The client against a scripted in-process WebSocket server.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wse_client::{Connector, Encoding, Error, Message, TokenVia};

type Ws = WebSocketStream<TcpStream>;

/// What the upgrade request carried.
#[derive(Debug, Clone)]
struct Upgrade {
    uri: String,
    cookie: Option<String>,
    authorization: Option<String>,
}

/// Serves one connection with `script`; returns the URL to connect to.
// The header callback's error type is tungstenite's.
#[allow(clippy::result_large_err)]
async fn serve<F, Fut>(script: F) -> (String, JoinHandle<()>)
where
    F: FnOnce(Ws, Upgrade) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/wse", listener.local_addr().unwrap());
    let handle = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut upgrade = None;
        let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
            let h = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            upgrade = Some(Upgrade {
                uri: req.uri().to_string(),
                cookie: h("cookie"),
                authorization: h("authorization"),
            });
            Ok(resp)
        })
        .await
        .unwrap();
        script(ws, upgrade.unwrap()).await;
    });
    (url, handle)
}

fn server_ready(id: &str) -> String {
    format!(
        r#"{{"c":"WSE","t":"server_ready","p":{{"message":"ok","details":{{"version":1,"features":{{"recovery":true}},"connection_id":"{id}","user_id":"alice"}}}},"seq":1,"v":1}}"#
    )
}

const SERVER_HELLO: &str = r#"{"c":"WSE","t":"server_hello","p":{"server_version":"9.9.9","protocol_version":1,"ping_interval":25000},"v":1}"#;

/// Next text frame from the client (WebSocket pings/pongs skipped).
async fn next_text(ws: &mut Ws) -> String {
    loop {
        match ws.next().await.expect("client went away").unwrap() {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// server_ready, client_hello check, server_hello.
async fn handshake(ws: &mut Ws, id: &str) {
    send(ws, &server_ready(id)).await;
    let hello: Value = serde_json::from_str(&next_text(ws).await).unwrap();
    assert_eq!(hello["t"], "client_hello");
    send(ws, SERVER_HELLO).await;
}

async fn close(ws: &mut Ws, code: u16, reason: &str) {
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })))
    .await
    .unwrap();
    // Wait for the client's close reply.
    while let Some(Ok(_)) = ws.next().await {}
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

const LONG: Duration = Duration::from_secs(10);

#[tokio::test]
async fn handshake_buffering_auto_pong_and_close() {
    let (url, server) = serve(|mut ws, upgrade| async move {
        assert_eq!(upgrade.cookie.as_deref(), Some("access_token=jwt123"));
        assert_eq!(upgrade.authorization.as_deref(), Some("Bearer jwt123"));
        assert_eq!(upgrade.uri, "/wse?x=1");

        send(&mut ws, &server_ready("conn-1")).await;
        let hello = next_text(&mut ws).await;
        assert!(
            hello.starts_with(r#"{"c":"WSE","t":"client_hello","p":{"client_version":"wse-rs/0.1","protocol_version":1,"features":{"#),
            "{hello}"
        );
        let hello: Value = serde_json::from_str(&hello).unwrap();
        assert_eq!(hello["p"]["connection_id"], "conn-1");
        assert_eq!(hello["v"], 1);
        // Something else arrives before server_hello: kept for recv.
        send(&mut ws, r#"{"c":"U","t":"early","p":{"n":0}}"#).await;
        send(&mut ws, SERVER_HELLO).await;

        let sub = next_text(&mut ws).await;
        assert_eq!(
            sub,
            r#"{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":["a","b"]}}"#
        );
        send(&mut ws, r#"{"tp":"a","e":"0000abcd","o":1,"c":"U","t":"msg","p":{"n":1}}"#).await;
        send(&mut ws, r#"{"c":"WSE","t":"ping","p":{"server_time":"2026-01-01T00:00:00Z"}}"#).await;
        let pong = next_text(&mut ws).await;
        assert!(
            pong.starts_with(r#"{"c":"WSE","t":"PONG","p":{"server_timestamp":"2026-01-01T00:00:00Z","client_timestamp":"#),
            "{pong}"
        );
        assert!(pong.ends_with(r#"},"v":1}"#), "{pong}");
        send(&mut ws, r#"{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","success":true,"success_topics":["a","b"],"failed_topics":[]},"v":1}"#).await;

        // Binary frames: a compressed batch and a msgpack message.
        let mut frame = b"C:".to_vec();
        frame.extend(zlib(
            br#"{"c":"WSE","t":"batch","p":{"messages":[{"c":"U","t":"m2","p":{"n":2}},{"c":"U","t":"m3","p":{"n":3}}],"count":2},"v":1}"#,
        ));
        ws.send(Message::binary(frame)).await.unwrap();
        let mut frame = b"M:".to_vec();
        frame.extend(rmp_serde::to_vec_named(&json!({"c":"U","t":"m4","p":{"n":4}})).unwrap());
        ws.send(Message::binary(frame)).await.unwrap();
        send(&mut ws, r#"{"c":"U","t":"last","p":{}}"#).await;
        close(&mut ws, 4300, "draining").await;
    })
    .await;

    let mut client = Connector::new(format!("{url}?x=1"))
        .token("jwt123")
        .connect()
        .await
        .unwrap();
    assert_eq!(client.connection_id(), "conn-1");
    assert_eq!(client.server_ready().t, "server_ready");
    assert!(client.server_ready().text.is_some());
    assert_eq!(client.server_hello().unwrap().p["server_version"], "9.9.9");

    let reply = client.subscribe(&["a", "b"]).await.unwrap();
    assert_eq!(reply.t, "subscription_update");
    assert_eq!(reply.p["success"], true);
    assert_eq!(client.auto_pongs_sent(), 1);

    let early = client.recv().await.unwrap();
    assert_eq!(early.t, "early");
    let msg = client.recv().await.unwrap();
    assert_eq!((msg.t.as_str(), msg.p["n"].as_i64()), ("msg", Some(1)));
    assert_eq!(msg.topic.as_deref(), Some("a"));
    assert_eq!(msg.epoch.as_deref(), Some("0000abcd"));
    assert_eq!(msg.offset, Some(1));

    let m2 = client.recv().await.unwrap();
    assert_eq!(m2.t, "m2");
    assert!(m2.batched && m2.binary);
    assert_eq!(m2.encoding, Encoding::Zlib);
    assert_eq!(client.recv().await.unwrap().t, "m3");
    let m4 = client.recv().await.unwrap();
    assert_eq!((m4.t.as_str(), m4.encoding), ("m4", Encoding::MsgPack));

    let info = client.expect_close(LONG).await.unwrap();
    assert_eq!((info.code, info.reason.as_str()), (4300, "draining"));
    let before: Vec<_> = info.events_before.iter().map(|e| e.t.as_str()).collect();
    assert_eq!(before, ["last"]);
    assert_eq!(info.last_error, None);
    // Closed for good.
    assert!(matches!(
        client.recv().await,
        Err(Error::Closed { code: 4300, .. })
    ));
    assert!(matches!(
        client.send_text("x").await,
        Err(Error::Closed { code: 4300, .. })
    ));
    server.await.unwrap();
}

#[tokio::test]
async fn auth_failure_is_closed_with_last_error() {
    let (url, server) = serve(|mut ws, upgrade| async move {
        assert_eq!(upgrade.cookie, None);
        assert_eq!(upgrade.authorization, None);
        assert!(upgrade.uri.ends_with("token=bad"), "{}", upgrade.uri);
        send(&mut ws, r#"{"c":"WSE","t":"error","p":{"code":"AUTH_FAILED","message":"Authentication failed","timestamp":"2026-01-01T00:00:00Z"},"v":1}"#).await;
        close(&mut ws, 4401, "Authentication failed").await;
    })
    .await;
    let err = Connector::new(url)
        .token("bad")
        .token_via(TokenVia::Query)
        .connect()
        .await
        .unwrap_err();
    match err {
        Error::Closed {
            code,
            reason,
            last_error: Some(ev),
        } => {
            assert_eq!(code, 4401);
            assert_eq!(reason, "Authentication failed");
            assert_eq!(ev.code(), Some("AUTH_FAILED"));
        }
        other => panic!("{other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn first_message_must_be_server_ready() {
    let (url, server) = serve(|mut ws, _| async move {
        send(&mut ws, r#"{"c":"WSE","t":"ping","p":{}}"#).await;
        let _ = ws.next().await;
    })
    .await;
    let err = Connector::new(url).connect().await.unwrap_err();
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("server_ready")),
        "{err:?}"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn server_ready_needs_a_connection_id() {
    let (url, server) = serve(|mut ws, _| async move {
        send(
            &mut ws,
            r#"{"c":"WSE","t":"server_ready","p":{"details":{}}}"#,
        )
        .await;
        let _ = ws.next().await;
    })
    .await;
    let err = Connector::new(url).connect().await.unwrap_err();
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("connection_id")),
        "{err:?}"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn handshake_timeout() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (url, server) = serve(|ws, _| async move {
        // Say nothing (but keep the connection open) until the client gave up.
        let _ws = ws;
        let _ = rx.await;
    })
    .await;
    let err = Connector::new(url)
        .timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    tx.send(()).unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn dropped_connection_is_1006() {
    let (url, server) = serve(|mut ws, _| async move {
        handshake(&mut ws, "c").await;
        send(&mut ws, r#"{"t":"bye","p":{}}"#).await;
        drop(ws); // TCP close without a close frame
    })
    .await;
    let mut client = Connector::new(url).connect().await.unwrap();
    assert_eq!(client.recv().await.unwrap().t, "bye");
    let err = client.recv().await.unwrap_err();
    assert_eq!(err.close_code(), Some(1006), "{err:?}");
    server.await.unwrap();
}

#[tokio::test]
async fn no_hello_ping_publish_and_errors() {
    let (url, server) = serve(|mut ws, _| async move {
        send(&mut ws, &server_ready("c")).await;
        // hello(false): the first client message is the ping.
        let ping: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
        assert_eq!(ping["c"], "WSE");
        assert_eq!(ping["t"], "ping");
        let ts = ping["p"]["timestamp"].as_u64().unwrap();
        send(&mut ws, &format!(r#"{{"c":"WSE","t":"PONG","p":{{"client_timestamp":{ts},"server_timestamp":1,"latency":0}},"v":1}}"#)).await;

        let publish = next_text(&mut ws).await;
        assert_eq!(
            publish,
            r#"{"c":"U","t":"publish","p":{"topic":"t","event":"ev","data":{"k":[1]}}}"#
        );
        let publish = next_text(&mut ws).await;
        assert_eq!(
            publish,
            r#"{"c":"U","t":"publish","p":{"topic":"t","event":"ev","data":null,"ack":true}}"#
        );
        send(&mut ws, r#"{"c":"WSE","t":"error","p":{"code":"FORBIDDEN","message":"no","recoverable":true},"v":1}"#).await;

        // Garbage is reported, and the connection stays usable.
        send(&mut ws, "not json").await;
        send(&mut ws, r#"{"t":"a"}"#).await;
        send(&mut ws, r#"{"t":"b"}"#).await;
        send(&mut ws, r#"{"t":"c"}"#).await;
        let custom = next_text(&mut ws).await;
        assert_eq!(
            custom,
            r#"{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","recover":true,"topics":["x"]}}"#
        );
        send(&mut ws, r#"{"c":"WSE","t":"subscription_update","p":{"success":true}}"#).await;
        let _ = next_text(&mut ws).await; // raw text
        let bin = ws.next().await.unwrap().unwrap();
        assert_eq!(bin, Message::binary(b"\x01\x02".to_vec()));
        close(&mut ws, 1000, "").await;
    })
    .await;
    let mut client = Connector::new(url).hello(false).connect().await.unwrap();
    assert!(client.server_hello().is_none());

    let pong = client.ping().await.unwrap();
    assert_eq!(pong.t, "PONG");
    assert!(pong.text.unwrap().starts_with(r#"{"c":"WSE","t":"PONG""#));

    client.publish("t", "ev", json!({"k": [1]})).await.unwrap();
    let err = client.publish_acked("t", "ev", Value::Null).await.unwrap();
    assert!(err.is_error());
    assert_eq!(err.code(), Some("FORBIDDEN"));
    assert_eq!(client.last_error().unwrap().code(), Some("FORBIDDEN"));

    assert!(matches!(client.recv().await, Err(Error::Protocol(_))));
    assert!(
        client
            .recv_timeout(LONG)
            .await
            .unwrap()
            .is_some_and(|e| e.t == "a")
    );
    let c = client.recv_until(|e| e.t == "c", LONG).await.unwrap();
    assert_eq!(c.t, "c");
    assert!(
        client
            .recv_timeout(Duration::from_millis(20))
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        client
            .recv_until(|e| e.t == "never", Duration::from_millis(20))
            .await,
        Err(Error::Timeout)
    ));

    let reply = client
        .subscribe_with(json!({"action": "subscribe", "topics": ["x"], "recover": true}))
        .await
        .unwrap();
    assert_eq!(reply.p["success"], true);
    client.send_text("raw text").await.unwrap();
    client.send_binary(vec![1u8, 2]).await.unwrap();
    let info = client.expect_close(LONG).await.unwrap();
    assert_eq!(info.code, 1000);
    assert_eq!(info.last_error.unwrap().code(), Some("FORBIDDEN"));
    server.await.unwrap();
}

#[tokio::test]
async fn client_close_gets_the_servers_reply() {
    let (url, server) = serve(|mut ws, _| async move {
        handshake(&mut ws, "c").await;
        send(&mut ws, r#"{"t":"pending","p":{}}"#).await;
        // tungstenite echoes the close frame.
        match ws.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => {
                assert_eq!(u16::from(f.code), 4000);
                assert_eq!(f.reason.as_str(), "done");
            }
            other => panic!("{other:?}"),
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let client = Connector::new(url).connect().await.unwrap();
    let info = client.close(4000, "done").await.unwrap();
    assert_eq!((info.code, info.reason.as_str()), (4000, "done"));
    assert_eq!(info.events_before.len(), 1);
    server.await.unwrap();
}

#[tokio::test]
async fn expect_close_timeout_keeps_messages() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (url, server) = serve(|mut ws, _| async move {
        handshake(&mut ws, "c").await;
        send(&mut ws, r#"{"t":"one","p":{}}"#).await;
        let _ = rx.await;
        close(&mut ws, 4408, "idle").await;
    })
    .await;
    let mut client = Connector::new(url).connect().await.unwrap();
    // Wait until "one" is in, then check expect_close times out without losing it.
    let one = client.recv().await.unwrap();
    assert_eq!(one.t, "one");
    assert!(matches!(
        client.expect_close(Duration::from_millis(50)).await,
        Err(Error::Timeout)
    ));
    tx.send(()).unwrap();
    let err = client.recv().await.unwrap_err();
    assert_eq!(err.close_code(), Some(4408));
    server.await.unwrap();
}

#[tokio::test]
async fn auto_pong_off_surfaces_pings() {
    let (url, server) = serve(|mut ws, _| async move {
        handshake(&mut ws, "c").await;
        send(&mut ws, r#"{"c":"WSE","t":"ping","p":{"server_time":"x"}}"#).await;
        close(&mut ws, 4300, "").await;
    })
    .await;
    let mut client = Connector::new(url)
        .auto_pong(false)
        .connect()
        .await
        .unwrap();
    let ping = client.recv().await.unwrap();
    assert_eq!(ping.t, "ping");
    assert_eq!(
        ping.text.as_deref(),
        Some(r#"{"c":"WSE","t":"ping","p":{"server_time":"x"}}"#)
    );
    assert_eq!(client.expect_close(LONG).await.unwrap().code, 4300);
    assert_eq!(client.auto_pongs_sent(), 0);
    server.await.unwrap();
}

#[tokio::test]
async fn closed_mid_request() {
    let (url, server) = serve(|mut ws, _| async move {
        handshake(&mut ws, "c").await;
        let _ = next_text(&mut ws).await;
        send(&mut ws, r#"{"t":"before","p":{}}"#).await;
        send(
            &mut ws,
            r#"{"c":"WSE","t":"error","p":{"code":"RATE_LIMITED"}}"#,
        )
        .await;
        close(&mut ws, 4429, "abuse").await;
    })
    .await;
    let mut client = Connector::new(url).connect().await.unwrap();
    let err = tokio::time::timeout(LONG, client.ping())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.close_code(), Some(4429));
    // What arrived before the close is still there, in order.
    assert_eq!(client.recv().await.unwrap().t, "before");
    assert_eq!(client.recv().await.unwrap().code(), Some("RATE_LIMITED"));
    assert_eq!(client.recv().await.unwrap_err().close_code(), Some(4429));
    server.await.unwrap();
}
