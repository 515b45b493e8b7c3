//! Against a live WSE server; ignored by default.
//!
//! ```text
//! /tmp/wse-peers/venv/bin/python /work/shared/peers/wse_upstream_server.py 5917 \
//!     --publishers pub --ping-interval 2 --idle-timeout 3600 &
//! export WSE_URL=ws://127.0.0.1:5917/wse
//! export WSE_TOKEN=$(/tmp/wse-peers/venv/bin/python /work/shared/peers/wse_upstream_server.py --mint-token alice)
//! export WSE_PUB_TOKEN=$(/tmp/wse-peers/venv/bin/python /work/shared/peers/wse_upstream_server.py --mint-token pub)
//! cargo test -p wse-client --test upstream -- --ignored --nocapture
//! ```
//!
//! The server must ping at least every few seconds (`--ping-interval 2`) for the auto-pong check.

use std::time::Duration;

use serde_json::json;
use wse_client::{Connector, Error, TokenVia};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("set {name} (see the file's docs)"))
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
#[ignore = "needs a running WSE server: WSE_URL, WSE_TOKEN, WSE_PUB_TOKEN"]
async fn live_server() {
    let url = env("WSE_URL");
    let token = env("WSE_TOKEN");
    let pub_token = env("WSE_PUB_TOKEN");

    // Subscriber.
    let mut alice = Connector::new(&url).token(&token).connect().await.unwrap();
    println!("server_ready: {}", alice.server_ready().describe());
    println!("server_hello: {}", alice.server_hello().unwrap().describe());
    assert!(!alice.connection_id().is_empty());
    assert!(
        alice.server_ready().text.is_some(),
        "server_ready must be text"
    );
    let reply = alice.subscribe(&["rs-client-test"]).await.unwrap();
    println!("subscribe reply: {}", reply.describe());
    assert_eq!(reply.t, "subscription_update");
    assert_eq!(reply.p["success"], true);
    assert_eq!(reply.p["success_topics"], json!(["rs-client-test"]));

    // Publisher, on another connection (bearer header only, to cover that path).
    let mut publisher = Connector::new(&url)
        .token(&pub_token)
        .token_via(TokenVia::Bearer)
        .connect()
        .await
        .unwrap();
    let ack = publisher
        .publish_acked("rs-client-test", "tick", json!({"n": 1, "s": "é"}))
        .await
        .unwrap();
    println!("publish ack: {}", ack.describe());
    assert_eq!(ack.t, "publish_ack");
    publisher
        .publish("rs-client-test", "tick", json!({"n": 2}))
        .await
        .unwrap();

    for n in 1..=2 {
        let tick = alice.recv_until(|ev| ev.t == "tick", WAIT).await.unwrap();
        println!("received: {}", tick.describe());
        assert_eq!(tick.p["n"], n);
    }

    // Client ping -> PONG text frame with "t":"PONG" in its first 25 characters.
    let pong = alice.ping().await.unwrap();
    let text = pong.text.clone().expect("PONG must be a text frame");
    println!("pong: {text}");
    assert_eq!(pong.t, "PONG");
    assert!(
        text[..25.min(text.len())].contains(r#""t":"PONG""#),
        "{text}"
    );

    // Server pings are answered automatically (the server pings every --ping-interval).
    let deadline = tokio::time::Instant::now() + WAIT;
    while alice.auto_pongs_sent() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no server ping seen"
        );
        if let Some(ev) = alice
            .recv_timeout(Duration::from_millis(500))
            .await
            .unwrap()
        {
            println!("while waiting for a server ping: {}", ev.describe());
        }
    }

    // ... and with auto-pong off they are visible.
    let mut watcher = Connector::new(&url)
        .token(&token)
        .token_via(TokenVia::Cookie)
        .auto_pong(false)
        .connect()
        .await
        .unwrap();
    let ping = watcher.recv_until(|ev| ev.t == "ping", WAIT).await.unwrap();
    let text = ping.text.clone().expect("server ping must be a text frame");
    println!("server ping: {text}");
    assert!(
        text[..25.min(text.len())].contains(r#""t":"ping""#),
        "{text}"
    );

    // A bad token: error AUTH_FAILED, then close 4401.
    match Connector::new(&url).token("not-a-jwt").connect().await {
        Err(Error::Closed {
            code,
            reason,
            last_error,
        }) => {
            let last_error = last_error.expect("an error event before the close");
            println!(
                "bad token: close {code} {reason:?}, error {}",
                last_error.describe()
            );
            assert_eq!(code, 4401);
            assert_eq!(last_error.code(), Some("AUTH_FAILED"));
        }
        Err(other) => panic!("bad token: unexpected error {other:?}"),
        Ok(_) => panic!("bad token: connected"),
    }

    // No token at all.
    match Connector::new(&url).connect().await {
        Err(Error::Closed {
            code, last_error, ..
        }) => {
            let last_error = last_error.expect("an error event before the close");
            println!("no token: close {code}, error {}", last_error.describe());
            assert_eq!(code, 4401);
        }
        Err(other) => panic!("no token: unexpected error {other:?}"),
        Ok(_) => panic!("no token: connected"),
    }

    let info = publisher.close(1000, "done").await.unwrap();
    println!(
        "publisher close reply: {} {:?}, {} message(s) before",
        info.code,
        info.reason,
        info.events_before.len()
    );
    assert_eq!(info.code, 1000);
    let unsub = alice.unsubscribe(&["rs-client-test"]).await.unwrap();
    assert_eq!(unsub.t, "subscription_update");
    alice.close(1000, "done").await.unwrap();
    watcher.close(1000, "done").await.unwrap();
}
