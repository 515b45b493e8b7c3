//! Hostile input through the real binary (issue 10, "Bounded under attack"): JSON nested past
//! `JSON_DEPTH_MAX` is refused and reaches neither subscribers, presence nor the event stream;
//! an `iss` claim must be the configured string, not an array holding it; each kind of refusal
//! is logged once per `log.attack_summary_interval` with its count, descriptor exhaustion
//! included.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::{API_KEY, Wse, publisher_token, token};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wse_client::{Client, Connector, Error};

const T: Duration = Duration::from_secs(10);

/// `n` nested arrays: 2 KB for 1 000, well past the limit (64) and past the recursion limits of
/// the parsers downstream (serde_json's 128; Python's `json` fails near 1 000).
fn deep(n: usize) -> String {
    format!("{}1{}", "[".repeat(n), "]".repeat(n))
}

/// Sends `message` and expects the `INVALID_MESSAGE` error naming the depth limit.
async fn refused_as_too_deep(c: &mut Client, message: String) {
    c.send_text(message).await.unwrap();
    let e = c.recv_until(|e| e.is_error(), T).await.unwrap();
    assert_eq!(e.code(), Some("INVALID_MESSAGE"), "{}", e.raw);
    let text = e.p["message"].as_str().unwrap();
    assert!(text.contains("deeper than 64 levels"), "{}", e.raw);
    assert_eq!(e.p["recoverable"], true, "the connection stays: {}", e.raw);
}

#[tokio::test]
async fn json_nested_too_deep_is_refused_and_relayed_nowhere() {
    let wse = Wse::start(&["--cores", "2", "--presence-enabled", "true"]);
    let url = format!("ws://{}/api/v1/events", wse.control.unwrap());
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("X-API-Key", API_KEY.parse().unwrap());
    let (mut stream, _) = tokio_tungstenite::connect_async(request).await.unwrap();

    let mut bob = Connector::new(wse.url())
        .token(token("bob", json!({})))
        .connect()
        .await
        .unwrap();
    let ack = bob
        .subscribe_with(json!({"action": "subscribe", "topics": ["room"], "presence": {"n": 1}}))
        .await
        .unwrap();
    assert_eq!(ack.p["success"], true, "{}", ack.raw);
    let join = bob.recv_until(|e| e.t == "presence_join", T).await.unwrap();
    assert_eq!(join.p["user_id"], "bob", "{}", join.raw);
    let mut eve = Connector::new(wse.url())
        .token(publisher_token("eve"))
        .connect()
        .await
        .unwrap();

    let d = deep(1000);
    for message in [
        format!(r#"{{"c":"U","t":"publish","p":{{"topic":"room","event":"deep","data":{d}}}}}"#),
        format!(r#"{{"t":"deep","p":{d}}}"#),
        format!(r#"{{"t":"presence_update","p":{{"data":{{"x":{d}}}}}}}"#),
        format!(
            r#"{{"t":"subscription_update","p":{{"action":"subscribe","topics":["room"],"presence":{{"x":{d}}}}}}}"#
        ),
        format!(
            r#"{{"t":"subscription_update","p":{{"action":"subscribe","topics":["room"],"recover":true,"recovery":{{"room":{d}}}}}}}"#
        ),
        format!(
            r#"{{"t":"batch","p":{{"messages":[{{"c":"U","t":"publish","p":{{"topic":"room","event":"deep","data":{d}}}}},{{"t":"deep","p":{d}}}]}}}}"#
        ),
    ] {
        refused_as_too_deep(&mut eve, message).await;
    }
    // At the limit: accepted (the message object and `p` are two of the 64 levels).
    let at_limit = deep(62);
    eve.send_text(format!(
        r#"{{"c":"U","t":"publish","p":{{"topic":"room","event":"marker","data":{at_limit}}}}}"#
    ))
    .await
    .unwrap();
    eve.send_text(format!(r#"{{"t":"marker","p":{at_limit}}}"#))
        .await
        .unwrap();

    // Bob's next topic message is the marker: nothing deep, no presence from eve, before it.
    let ev = bob.recv_until(|e| e.t != "ping", T).await.unwrap();
    assert_eq!(ev.t, "marker", "{}", ev.raw);
    assert_eq!(ev.p, serde_json::from_str::<Value>(&at_limit).unwrap());

    // The event stream's next client message is the marker too.
    let marker = loop {
        let frame = tokio::time::timeout(T, stream.next())
            .await
            .expect("the event stream went quiet")
            .expect("the event stream ended")
            .unwrap();
        let events: Value =
            serde_json::from_str(frame.to_text().unwrap()).expect("events the backend can parse");
        let msg = events
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"] == "msg" || e["type"] == "raw");
        if let Some(msg) = msg {
            break msg.clone();
        }
    };
    assert_eq!(marker["payload"]["t"], "marker", "{marker}");
    assert_eq!(
        wse.metric("wse_dropped_total", "json_too_deep").await,
        6.0,
        "each refused message counted once"
    );
}

#[tokio::test]
async fn an_issuer_array_holding_the_issuer_is_refused_with_4401() {
    let wse = Wse::start(&["--cores", "1", "--auth-issuer", "https://auth.example"]);
    let good = token("ann", json!({"iss": "https://auth.example"}));
    Connector::new(wse.url())
        .token(good)
        .connect()
        .await
        .unwrap();
    for iss in [
        json!(["https://auth.example", "https://evil.example"]),
        json!(["https://auth.example"]),
    ] {
        let forged = token("eve", json!({ "iss": iss }));
        match Connector::new(wse.url()).token(forged).connect().await {
            Err(Error::Closed {
                code: 4401,
                last_error: Some(err),
                ..
            }) => {
                assert_eq!(err.code(), Some("AUTH_FAILED"), "{}", err.raw);
                assert!(err.describe().contains("wrong issuer"), "{}", err.raw);
            }
            other => panic!("{iss}: expected 4401, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn refusals_are_summarised_in_the_log_once_per_interval() {
    let wse = Wse::start(&["--cores", "1", "--log-attack-summary-interval", "300ms"]);
    for _ in 0..3 {
        let forged = support::token_signed("another-secret-another-secret-0123", "eve");
        let refused = Connector::new(wse.url()).token(forged).connect().await;
        assert!(matches!(refused, Err(Error::Closed { code: 4401, .. })));
    }
    let refused = Connector::new(wse.url()).connect().await;
    assert!(matches!(refused, Err(Error::Closed { code: 4401, .. })));
    let line = "4 connections failed authentication (closed 4401) in the last";
    assert!(wse.wait_log(line, 1, T), "{}", wse.log());
    let log = wse.log();
    let line = log.lines().find(|l| l.contains(line)).unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains(": authentication required 1, invalid signature 3"),
        "{line}"
    );

    // Said once: a later summary, about something else, says nothing more about it.
    let mut s = std::net::TcpStream::connect(wse.ws).unwrap();
    let response = support::send_and_read_to_end(&mut s, b"GET / HTTP/1.1\r\n\r\n", T);
    assert!(response.starts_with(b"HTTP/1.1 4"), "{response:?}");
    let line = "1 WebSocket upgrades refused as malformed (HTTP 4xx) in the last";
    assert!(wse.wait_log(line, 1, T), "{}", wse.log());
    assert_eq!(wse.log().matches("failed authentication").count(), 1);
}

/// Descriptor exhaustion (accept failing with EMFILE, retried every 100 ms) used to log a
/// warning per retry; it is now one line of the summary per interval.
#[test]
fn descriptor_exhaustion_is_logged_once_per_interval() {
    const INTERVAL: Duration = Duration::from_millis(500);
    const HARD: u64 = 256;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    assert!(
        limit.maximum.is_none_or(|max| max >= HARD),
        "RLIMIT_NOFILE hard limit below {HARD}: raise it (e.g. `ulimit -Hn 4096` as root) to run \
         this test"
    );
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("ulimit -n {HARD} && exec \"$0\" \"$@\""))
        .args([
            env!("CARGO_BIN_EXE_wse-server"),
            "--listen",
            "127.0.0.1:0",
            "--control-enabled",
            "false",
            "--cores",
            "1",
            "--log-attack-summary-interval",
            "500ms",
        ])
        .env("RUST_LOG", "info");
    let wse = Wse::start_command(cmd);
    // More connections than descriptors: the kernel queues them, accept fails with EMFILE.
    let held: Vec<std::net::TcpStream> = (0..HARD + 64)
        .map(|_| std::net::TcpStream::connect(wse.ws).unwrap())
        .collect();
    // Accepts keep failing every 100 ms while the connections wait; the log says so once per
    // interval: the third line comes two intervals after the first (it came 200 ms after).
    let needle = "file descriptors";
    assert!(wse.wait_log(needle, 1, T), "{}", wse.log());
    let first = Instant::now();
    assert!(wse.wait_log(needle, 3, T), "{}", wse.log());
    let apart = first.elapsed();
    assert!(
        apart >= INTERVAL * 3 / 2,
        "3 lines within {apart:?}:\n{}",
        wse.log()
    );
    drop(held);
}
