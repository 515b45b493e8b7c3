//! Bad input of every kind gets a defined answer (an HTTP error, a close code, or an error event)
//! and the server keeps serving everyone else.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;
use support::{
    Wse, client_frame, close_code, raw_upgrade, read_to_end, send_and_read_to_end, server_frames,
    token,
};
use wse_client::{Connector, Message};

const T: Duration = Duration::from_secs(10);

/// The server still serves a well-behaved client.
async fn assert_serving(wse: &Wse) {
    let mut c = Connector::new(wse.url())
        .token(token("probe", json!({})))
        .connect()
        .await
        .unwrap();
    assert_eq!(c.ping().await.unwrap().t, "PONG");
}

fn status_of(response: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(response);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn bad_handshakes_get_http_errors() {
    let wse = Wse::start(&["--cores", "1", "--max-handshake-bytes", "4096"]);
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let up = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
    let huge = format!(
        "GET /wse HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(5000)
    );
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "plain GET",
            "GET /wse HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            426,
        ),
        (
            "POST",
            "POST /wse HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".into(),
            405,
        ),
        (
            "version 8",
            format!("GET /wse HTTP/1.1\r\nHost: x\r\n{up}{key}Sec-WebSocket-Version: 8\r\n\r\n"),
            426,
        ),
        (
            "no key",
            format!("GET /wse HTTP/1.1\r\nHost: x\r\n{up}Sec-WebSocket-Version: 13\r\n\r\n"),
            400,
        ),
        (
            "short key",
            format!(
                "GET /wse HTTP/1.1\r\nHost: x\r\n{up}Sec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ),
            400,
        ),
        (
            "HTTP/1.0",
            format!("GET /wse HTTP/1.0\r\nHost: x\r\n{up}{key}Sec-WebSocket-Version: 13\r\n\r\n"),
            400,
        ),
        ("garbage", "\x16\x03\x01\x02\x00garbage\r\n\r\n".into(), 400),
        ("oversized", huge, 431),
    ];
    for (name, request, status) in cases {
        let mut s = TcpStream::connect(wse.ws).unwrap();
        let response = send_and_read_to_end(&mut s, request.as_bytes(), T);
        assert_eq!(
            status_of(&response),
            status,
            "{name}: {}",
            String::from_utf8_lossy(&response)
        );
        let text = String::from_utf8_lossy(&response);
        assert!(text.contains("Connection: close"), "{name}: {text}");
        if status == 426 {
            assert!(text.contains("Sec-WebSocket-Version: 13"), "{name}: {text}");
        }
    }
    assert_serving(&wse).await;
}

#[tokio::test]
async fn bad_frames_get_close_codes() {
    let wse = Wse::start(&["--cores", "1"]);
    let query = format!("/wse?token={}", token("raw", json!({})));
    let mut big_ping = vec![0x89, 0x80 | 126, 0, 126, 1, 2, 3, 4];
    big_ping.extend(std::iter::repeat_n(0u8, 126));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "unmasked",
            vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'],
            1002,
        ),
        ("reserved opcode", client_frame(0x83, b"x"), 1002),
        ("reserved control opcode", client_frame(0x8B, b""), 1002),
        ("rsv1 without extension", client_frame(0xC1, b"x"), 1002),
        ("control frame over 125 bytes", big_ping, 1002),
        ("fragmented ping", client_frame(0x09, b"x"), 1002),
        ("continuation first", client_frame(0x80, b"x"), 1002),
        (
            "new message mid-fragment",
            [client_frame(0x01, b"a"), client_frame(0x81, b"b")].concat(),
            1002,
        ),
        (
            "invalid utf-8",
            client_frame(0x81, &[0xff, 0xfe, 0xfd]),
            1007,
        ),
        (
            "close code 1005",
            client_frame(0x88, &1005u16.to_be_bytes()),
            1002,
        ),
        (
            "close code 999",
            client_frame(0x88, &999u16.to_be_bytes()),
            1002,
        ),
        ("one-byte close", client_frame(0x88, &[3]), 1002),
        (
            "close reason not utf-8",
            client_frame(0x88, &[0x03, 0xe8, 0xff]),
            1007,
        ),
        (
            "normal close echoed",
            client_frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']),
            1000,
        ),
        (
            "4000-range close echoed",
            client_frame(0x88, &4321u16.to_be_bytes()),
            4321,
        ),
    ];
    for (name, frame, code) in cases {
        let (mut s, mut received) = raw_upgrade(wse.ws, &query, "");
        received.extend(send_and_read_to_end(&mut s, &frame, T));
        let frames = server_frames(&received);
        assert_eq!(
            frames.first().map(|f| f.0),
            Some(1),
            "{name}: server_ready first"
        );
        assert_eq!(close_code(&frames), Some(code), "{name}: {frames:?}");
    }
    assert_serving(&wse).await;
}

#[tokio::test]
async fn pipelined_frames_after_the_upgrade_are_processed() {
    let wse = Wse::start(&["--cores", "1"]);
    let mut s = TcpStream::connect(wse.ws).unwrap();
    let req = format!(
        "GET /wse?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token("pipe", json!({}))
    );
    let mut bytes = req.into_bytes();
    bytes.extend(client_frame(
        0x81,
        br#"{"c":"WSE","t":"ping","p":{"timestamp":7}}"#,
    ));
    bytes.extend(client_frame(0x88, &1000u16.to_be_bytes()));
    let response = send_and_read_to_end(&mut s, &bytes, T);
    let head_end = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(status_of(&response), 101);
    let frames = server_frames(&response[head_end..]);
    let texts: Vec<String> = frames
        .iter()
        .filter(|f| f.0 == 1)
        .map(|f| String::from_utf8_lossy(&f.1).into_owned())
        .collect();
    assert!(texts[0].contains("server_ready"));
    assert!(
        texts[1].contains(r#""t":"PONG""#) && texts[1].contains(r#""client_timestamp":7"#),
        "{texts:?}"
    );
    assert_eq!(close_code(&frames), Some(1000));
}

#[tokio::test]
async fn bad_messages_get_error_events_and_the_connection_stays() {
    let wse = Wse::start(&["--cores", "1"]);
    let mut c = Connector::new(wse.url())
        .token(token("sloppy", json!({})))
        .connect()
        .await
        .unwrap();
    let cases: Vec<(&str, Message, &str)> = vec![
        ("not json", Message::text("not json"), "INVALID_MESSAGE"),
        ("no type", Message::text(r#"{"p":{}}"#), "INVALID_MESSAGE"),
        ("array", Message::text("[1,2,3]"), "INVALID_MESSAGE"),
        (
            "truncated",
            Message::text(r#"{"t":"ping","p":{"#),
            "INVALID_MESSAGE",
        ),
        (
            "topics not a list",
            Message::text(r#"{"t":"subscription_update","p":{"action":"subscribe","topics":"a"}}"#),
            "INVALID_SUBSCRIPTION",
        ),
        (
            "unknown action",
            Message::text(r#"{"t":"subscription_update","p":{"action":"maybe","topics":["a"]}}"#),
            "INVALID_SUBSCRIPTION",
        ),
        (
            "publish without topic",
            Message::text(r#"{"c":"U","t":"publish","p":{"event":"x"}}"#),
            "INVALID_MESSAGE",
        ),
        (
            "corrupt zlib",
            Message::binary(b"C:not zlib".to_vec()),
            "INVALID_MESSAGE",
        ),
        (
            "encrypted",
            Message::binary(b"E:abcd".to_vec()),
            "INVALID_MESSAGE",
        ),
        (
            "corrupt msgpack",
            Message::binary(b"M:\xc1".to_vec()),
            "INVALID_MESSAGE",
        ),
        (
            "binary not utf-8 json",
            Message::binary(vec![0xff, 0x00, 0x12]),
            "INVALID_MESSAGE",
        ),
    ];
    for (name, msg, code) in cases {
        c.send_message(msg).await.unwrap();
        let ev = c.recv().await.unwrap();
        assert_eq!(ev.t, "error", "{name}: {:?}", ev.raw);
        assert_eq!(ev.code(), Some(code), "{name}");
        assert_eq!(ev.p["recoverable"], true, "{name}");
    }
    // Accepted encodings: MessagePack and zlib-compressed JSON, legacy prefixes, batches.
    let ping = json!({"c":"WSE","t":"ping","p":{"timestamp": 5}});
    let mut packed = b"M:".to_vec();
    packed.extend(rmp_of(&ping));
    c.send_binary(packed).await.unwrap();
    assert_eq!(c.recv().await.unwrap().p["client_timestamp"], 5);
    c.send_text(r#"WSE{"t":"ping","p":{"timestamp":6}}"#)
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap().p["client_timestamp"], 6);
    c.send_json(&json!({"c":"WSE","t":"batch","p":{"messages":[
        {"t":"ping","p":{"timestamp":8}},
        {"t":"subscription_update","p":{"action":"subscribe","topics":["b1"]}}
    ]}}))
    .await
    .unwrap();
    assert_eq!(c.recv().await.unwrap().p["client_timestamp"], 8);
    assert_eq!(c.recv().await.unwrap().p["success_topics"], json!(["b1"]));
    // Unknown types are application events: no reply, counted.
    c.send_text(r#"{"c":"U","t":"custom_event","p":{"x":1}}"#)
        .await
        .unwrap();
    assert_eq!(c.ping().await.unwrap().t, "PONG");
    // auth_connect, raw ("not json", "truncated"), bin (the non-UTF-8 binary), msg.
    assert_eq!(wse.metric("wse_app_events_total", "").await, 5.0);
    assert_serving(&wse).await;
}

/// MessagePack encoding of a JSON value (a tiny encoder for the shapes used here).
fn rmp_of(v: &serde_json::Value) -> Vec<u8> {
    fn enc(v: &serde_json::Value, out: &mut Vec<u8>) {
        match v {
            serde_json::Value::Object(m) => {
                out.push(0x80 | m.len() as u8);
                for (k, v) in m {
                    enc(&serde_json::Value::String(k.clone()), out);
                    enc(v, out);
                }
            }
            serde_json::Value::String(s) => {
                out.push(0xa0 | s.len() as u8);
                out.extend_from_slice(s.as_bytes());
            }
            serde_json::Value::Number(n) => {
                out.push(0xcf);
                out.extend_from_slice(&n.as_u64().unwrap().to_be_bytes());
            }
            other => panic!("not needed: {other}"),
        }
    }
    let mut out = Vec::new();
    enc(v, &mut out);
    out
}

#[tokio::test]
async fn slow_handshakes_time_out_and_are_capped() {
    let wse = Wse::start(&[
        "--cores",
        "1",
        "--handshake-timeout",
        "1s",
        "--max-pending-handshakes",
        "2",
    ]);
    // Two sockets that never finish their request occupy the pending slots...
    let mut slow: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(wse.ws).unwrap();
            s.write_all(b"GET /wse HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    // ...so a third is refused with 503 straight away.
    std::thread::sleep(Duration::from_millis(200));
    let mut third = TcpStream::connect(wse.ws).unwrap();
    let response = read_to_end(&mut third, T);
    assert_eq!(
        status_of(&response),
        503,
        "{}",
        String::from_utf8_lossy(&response)
    );
    // The slow ones are closed once the handshake timeout passes.
    for s in &mut slow {
        s.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "expected the server to close the slow handshake");
    }
    assert_eq!(
        wse.metric("wse_rejected_total", "reason=\"handshake_timeout\"")
            .await,
        2.0
    );
    assert_eq!(
        wse.metric("wse_rejected_total", "reason=\"pending_handshakes\"")
            .await,
        1.0
    );
    assert_serving(&wse).await;
}

#[tokio::test]
async fn abrupt_disconnects_release_everything() {
    let wse = Wse::start(&["--cores", "2"]);
    for i in 0..20 {
        let (mut s, _) = raw_upgrade(
            wse.ws,
            &format!("/wse?token={}", token(&format!("r{i}"), json!({}))),
            "",
        );
        let sub =
            br#"{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":["x"]}}"#;
        s.write_all(&client_frame(0x81, sub)).unwrap();
        // Half a frame, then the socket vanishes.
        s.write_all(&client_frame(0x81, b"{\"t\":\"ping\"}")[..5])
            .unwrap();
        drop(s);
    }
    for _ in 0..100 {
        if wse.metric("wse_connections", "").await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(wse.metric("wse_connections", "").await, 0.0);
    assert_serving(&wse).await;
}
