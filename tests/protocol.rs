//! The WSE protocol end to end: the real binary on loopback, driven by the Rust client.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use support::{Wse, publisher_token, token, token_signed};
use wse_client::{Connector, Error};

const T: Duration = Duration::from_secs(10);

fn connector(wse: &Wse, sub: &str) -> Connector {
    Connector::new(wse.url()).token(token(sub, json!({})))
}

#[tokio::test]
async fn handshake_order_and_hello() {
    let wse = Wse::start(&["--cores", "1"]);
    let mut c = Connector::new(wse.url())
        .token(token("alice", json!({})))
        .hello(false)
        .connect()
        .await
        .unwrap();
    // server_ready is the first frame, as text, with the shape the clients read.
    let ready = c.server_ready().clone();
    assert_eq!(ready.t, "server_ready");
    assert_eq!(ready.c.as_deref(), Some("WSE"));
    let text = ready.text.as_deref().expect("server_ready is a text frame");
    assert!(
        text.starts_with(r#"{"c":"WSE","t":"server_ready","p":{"#),
        "{text}"
    );
    let details = &ready.p["details"];
    assert_eq!(details["user_id"], "alice");
    assert_eq!(details["features"]["recovery"], false);
    assert_eq!(details["connection_id"].as_str().unwrap().len(), 16);
    assert_eq!(ready.raw["seq"], 1);
    assert_eq!(ready.raw["v"], 1);

    // client_hello → server_hello, twice (a repeated hello gets the same answer).
    for _ in 0..2 {
        c.send_json(
            &json!({"c":"WSE","t":"client_hello","p":{"client_version":"t","protocol_version":1}}),
        )
        .await
        .unwrap();
        let hello = c.recv().await.unwrap();
        assert_eq!(hello.t, "server_hello", "{:?}", hello.raw);
        assert_eq!(hello.p["protocol_version"], 1);
        assert_eq!(hello.p["limits"]["max_message_size"], 1_048_576);
        assert_eq!(hello.p["ping_interval"], 25_000);
        assert_eq!(hello.p["connection_id"], details["connection_id"]);
        assert_eq!(hello.p["features"]["msgpack"], true);
    }

    // Client ping → compact text PONG echoing the timestamp.
    c.send_text(r#"{"c":"WSE","t":"ping","p":{"timestamp":1700000000000}}"#)
        .await
        .unwrap();
    let pong = c.recv().await.unwrap();
    let text = pong.text.clone().unwrap();
    assert!(text[..25].contains(r#""t":"PONG""#), "{text}");
    assert_eq!(pong.p["client_timestamp"], 1_700_000_000_000u64);
    assert!(pong.p["server_timestamp"].as_u64().unwrap() > 1_700_000_000_000);
}

#[tokio::test]
async fn subscribe_ack_shape_and_unsubscribe() {
    let wse = Wse::start(&["--cores", "2"]);
    let mut c = connector(&wse, "alice").connect().await.unwrap();
    let ack = c.subscribe(&["a", "b", "a"]).await.unwrap();
    assert_eq!(ack.t, "subscription_update");
    assert_eq!(ack.c.as_deref(), Some("WSE"));
    assert_eq!(ack.p["action"], "subscribe");
    assert_eq!(ack.p["success"], true);
    assert_eq!(ack.p["success_topics"], json!(["a", "b", "a"]));
    assert_eq!(ack.p["failed_topics"], json!([]));
    let text = ack.text.unwrap();
    assert!(
        text.starts_with(r#"{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","success":true,"success_topics":"#),
        "{text}"
    );

    // Invalid topics are refused individually.
    let long = "x".repeat(1025);
    let ack = c
        .subscribe(&["ok", "", "bad\u{1}topic", &long])
        .await
        .unwrap();
    assert_eq!(ack.p["success"], false);
    assert_eq!(ack.p["success_topics"], json!(["ok"]));
    assert_eq!(ack.p["failed_topics"].as_array().unwrap().len(), 3);

    // Unsubscribing, even from a topic one is not on, succeeds; nothing arrives afterwards.
    let ack = c.unsubscribe(&["a", "never"]).await.unwrap();
    assert_eq!(ack.p["action"], "unsubscribe");
    assert_eq!(ack.p["success"], true);
    // The barrier is on the same topic: a witness on c's shard, subscribed to "a", gets the
    // publication, so c's shard has handled it (for all its subscribers at once); had c still
    // been subscribed, the publication would be queued for c before the PONG c asks for next.
    let shard = c.connection_id()[..2].to_owned();
    let mut others = Vec::new();
    let mut witness = loop {
        assert!(others.len() < 40, "no connection landed on c's shard");
        let w = connector(&wse, "witness").connect().await.unwrap();
        if w.connection_id()[..2] == shard {
            break w;
        }
        others.push(w);
    };
    assert_eq!(witness.subscribe(&["a"]).await.unwrap().p["success"], true);
    let (status, _) = wse.api_publish("a", "x", json!(1)).await;
    assert_eq!(status, 200);
    let ev = witness.recv_until(|e| e.t == "x", T).await.unwrap();
    assert_eq!(ev.p, json!(1));
    assert_eq!(c.ping().await.unwrap().t, "PONG");
    let before_pong = c.recv_timeout(Duration::ZERO).await.unwrap();
    assert!(
        before_pong.is_none(),
        "a publication on an unsubscribed topic arrived: {before_pong:?}"
    );
    // The topic still subscribed to still delivers.
    let (status, _) = wse.api_publish("b", "y", json!(2)).await;
    assert_eq!(status, 200);
    let ev = c.recv().await.unwrap();
    assert_eq!((ev.t.as_str(), &ev.p), ("y", &json!(2)));
}

#[tokio::test]
async fn publication_reaches_subscribers_on_every_shard() {
    let wse = Wse::start(&["--cores", "2"]);
    let mut subs = Vec::new();
    let mut shards = HashSet::new();
    // Connections are spread over the shards by the kernel; keep connecting until both have some.
    for i in 0..64 {
        let mut c = connector(&wse, &format!("u{i}")).connect().await.unwrap();
        shards.insert(c.connection_id()[..2].to_owned());
        assert_eq!(c.subscribe(&["room"]).await.unwrap().p["success"], true);
        subs.push(c);
        if shards.len() == 2 && subs.len() >= 16 {
            break;
        }
    }
    assert_eq!(shards.len(), 2, "connections never landed on both shards");
    let mut publisher = Connector::new(wse.url())
        .token(publisher_token("pub"))
        .connect()
        .await
        .unwrap();
    let ack = publisher
        .publish_acked("room", "chat", json!({"text": "hi"}))
        .await
        .unwrap();
    assert_eq!(ack.t, "publish_ack", "{:?}", ack.raw);
    assert_eq!(ack.p["topic"], "room");
    assert_eq!(ack.p["offset"], 1);
    for c in &mut subs {
        let ev = c.recv_until(|e| e.t == "chat", T).await.unwrap();
        assert_eq!(ev.c.as_deref(), Some("U"));
        assert_eq!(ev.p, json!({"text": "hi"}));
        assert_eq!(
            ev.text.as_deref(),
            Some(r#"{"c":"U","t":"chat","p":{"text":"hi"},"v":1}"#)
        );
    }
}

#[tokio::test]
async fn subscribe_acl_and_publish_refusal() {
    let wse = Wse::start(&["--cores", "1"]);
    let tok = token(
        "bob",
        json!({"wse_topics": {"allow": ["public:*", "user:bob"], "deny": ["public:secret*"]}}),
    );
    let mut c = Connector::new(wse.url())
        .token(tok)
        .connect()
        .await
        .unwrap();
    let ack = c
        .subscribe(&[
            "public:news",
            "public:secret-plans",
            "user:alice",
            "user:bob",
        ])
        .await
        .unwrap();
    assert_eq!(ack.p["success"], false);
    assert_eq!(ack.p["success_topics"], json!(["public:news", "user:bob"]));
    let failed: Vec<(String, String)> = ack.p["failed_topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["topic"].as_str().unwrap().to_owned(),
                f["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        failed,
        vec![
            ("public:secret-plans".to_owned(), "FORBIDDEN".to_owned()),
            ("user:alice".to_owned(), "FORBIDDEN".to_owned()),
        ]
    );

    // No wse_publish claim: publishing is refused, and the connection stays usable.
    let reply = c.publish_acked("public:news", "x", json!(1)).await.unwrap();
    assert_eq!(reply.t, "error");
    assert_eq!(reply.code(), Some("FORBIDDEN"));
    assert_eq!(reply.p["recoverable"], true);
    assert_eq!(c.ping().await.unwrap().t, "PONG");

    // A token allowed to publish to one topic only.
    let tok = token("carol", json!({"wse_publish": {"allow": ["public:*"]}}));
    let mut p = Connector::new(wse.url())
        .token(tok)
        .connect()
        .await
        .unwrap();
    assert_eq!(
        p.publish_acked("public:news", "x", json!(1))
            .await
            .unwrap()
            .t,
        "publish_ack"
    );
    assert_eq!(
        p.publish_acked("user:bob", "x", json!(1))
            .await
            .unwrap()
            .code(),
        Some("FORBIDDEN")
    );
    let ev = c.recv_until(|e| e.t == "x", T).await.unwrap();
    assert_eq!(ev.p, json!(1));
}

#[tokio::test]
async fn auth_failures_close_with_4401_after_the_upgrade() {
    let wse = Wse::start(&["--cores", "1"]);
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "AUTH_REQUIRED"),
        (Some("not-a-jwt".to_owned()), "AUTH_FAILED"),
        (
            Some(
                jsonwebtoken::encode(
                    &jsonwebtoken::Header::default(),
                    &json!({"sub": "x", "exp": 4_000_000_000u64}),
                    &jsonwebtoken::EncodingKey::from_secret(b"another-secret-another-secret-0123"),
                )
                .unwrap(),
            ),
            "AUTH_FAILED",
        ),
        (Some(token("x", json!({"exp": 1_000_000}))), "AUTH_FAILED"),
    ];
    for (tok, code) in cases {
        let mut conn = Connector::new(wse.url());
        if let Some(t) = tok {
            conn = conn.token(t);
        }
        match conn.connect().await {
            Err(Error::Closed {
                code: 4401,
                last_error: Some(err),
                ..
            }) => {
                assert_eq!(err.code(), Some(code));
                assert_eq!(err.p["recoverable"], false);
            }
            other => panic!("expected 4401 with {code}, got {other:?}"),
        }
    }
    assert_eq!(wse.metric("wse_auth_failures_total", "").await, 4.0);
    // Token sources: cookie, bearer header, query parameter.
    for via in [
        wse_client::TokenVia::Cookie,
        wse_client::TokenVia::Bearer,
        wse_client::TokenVia::Query,
    ] {
        let c = Connector::new(wse.url())
            .token(token("dave", json!({})))
            .token_via(via)
            .connect()
            .await
            .unwrap();
        assert_eq!(c.server_ready().p["details"]["user_id"], "dave");
    }
}

#[tokio::test]
async fn wse_subscribe_claim_subscribes_at_connect() {
    let wse = Wse::start(&["--cores", "2"]);
    let tok = token("erin", json!({"wse_subscribe": ["alerts"]}));
    let mut c = Connector::new(wse.url())
        .token(tok)
        .connect()
        .await
        .unwrap();
    let ack = c
        .recv_until(|e| e.t == "subscription_update", T)
        .await
        .unwrap();
    assert_eq!(ack.p["success_topics"], json!(["alerts"]));
    wse.api_publish("alerts", "alert", json!({"level": 3}))
        .await;
    assert_eq!(
        c.recv_until(|e| e.t == "alert", T).await.unwrap().p["level"],
        3
    );
}

#[tokio::test]
async fn persistent_flood_is_closed_with_4429() {
    let wse = Wse::start(&[
        "--cores",
        "1",
        "--rate-limit-capacity",
        "5",
        "--rate-limit-refill",
        "1",
        "--rate-limit-abuse-drops",
        "20",
    ]);
    let mut c = connector(&wse, "flood")
        .hello(false)
        .auto_pong(false)
        .connect()
        .await
        .unwrap();
    for _ in 0..40 {
        if c.send_text(r#"{"c":"WSE","t":"noise","p":{}}"#)
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(c.expect_close(T).await.unwrap().code, 4429);
}

#[tokio::test]
async fn idle_connections_are_pinged_then_closed_with_4408() {
    let wse = Wse::start(&[
        "--cores",
        "1",
        "--ping-interval",
        "300ms",
        "--idle-timeout",
        "1200ms",
    ]);
    // A silent client: sees pings (compact text, "t":"ping" within 25 chars), then 4408.
    let mut silent = connector(&wse, "quiet")
        .hello(false)
        .auto_pong(false)
        .connect()
        .await
        .unwrap();
    // A client that answers pings stays.
    let mut lively = connector(&wse, "lively").connect().await.unwrap();
    // The lively one must keep reading to answer pings, while the silent one is watched.
    let keep_lively = async {
        assert!(
            lively
                .recv_timeout(Duration::from_millis(2500))
                .await
                .unwrap()
                .is_none()
        );
    };
    let (info, ()) = tokio::join!(silent.expect_close(T), keep_lively);
    let info = info.unwrap();
    assert_eq!(info.code, 4408);
    let pings: Vec<_> = info
        .events_before
        .iter()
        .filter(|e| e.t == "ping")
        .collect();
    assert!(pings.len() >= 2, "{:?}", info.events_before);
    let text = pings[0].text.as_deref().unwrap();
    assert!(text[..25].contains(r#""t":"ping""#), "{text}");
    assert!(
        lively
            .recv_timeout(Duration::from_millis(1500))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(lively.ping().await.unwrap().t, "PONG");
    assert_eq!(wse.metric("wse_closes_total", "code=\"4408\"").await, 1.0);
}

#[tokio::test]
async fn oversized_message_gets_message_too_large_then_1009() {
    let wse = Wse::start(&["--cores", "1", "--max-message-size", "2048"]);
    let mut c = connector(&wse, "big").connect().await.unwrap();
    let big = format!(r#"{{"c":"U","t":"blob","p":"{}"}}"#, "x".repeat(4000));
    c.send_text(big).await.unwrap();
    let info = c.expect_close(T).await.unwrap();
    assert_eq!(info.code, 1009);
    let err = info
        .events_before
        .iter()
        .find(|e| e.t == "error")
        .expect("an error before the close");
    assert_eq!(err.code(), Some("MESSAGE_TOO_LARGE"));
    // Other connections are unaffected.
    let mut other = connector(&wse, "small").connect().await.unwrap();
    assert_eq!(other.ping().await.unwrap().t, "PONG");
}

#[tokio::test]
async fn max_connections_closes_the_excess_with_1013() {
    let wse = Wse::start(&["--cores", "2", "--max-connections", "3"]);
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(connector(&wse, &format!("c{i}")).connect().await.unwrap());
    }
    match connector(&wse, "extra").connect().await {
        Err(Error::Closed { code: 1013, .. }) => {}
        other => panic!("expected 1013, got {other:?}"),
    }
    assert_eq!(
        wse.metric("wse_rejected_total", "reason=\"max_connections\"")
            .await,
        1.0
    );
    // A place frees up when a connection leaves.
    held.pop().unwrap().close(1000, "bye").await.unwrap();
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = connector(&wse, "later").connect().await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the freed place was never reusable");
}

#[tokio::test]
async fn graceful_shutdown_closes_with_4300_and_exits_zero() {
    let mut wse = Wse::start(&["--cores", "2"]);
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut c = connector(&wse, &format!("c{i}")).connect().await.unwrap();
        c.subscribe(&["t"]).await.unwrap();
        clients.push(c);
    }
    wse.sigterm();
    for c in &mut clients {
        assert_eq!(c.expect_close(T).await.unwrap().code, 4300);
    }
    for c in clients {
        drop(c);
    }
    let status = wse.wait_exit(T).expect("server exited");
    assert!(status.success(), "{status:?}");
    // The listener is gone.
    assert!(tokio::net::TcpStream::connect(wse.ws).await.is_err());
}

/// A drain spreads its close frames over half of `server.drain_timeout` (one batch per
/// `DRAIN_BATCH_INTERVAL`) so the clients do not all reconnect elsewhere at once; each gets
/// 4300, the drain completes once they are gone, and the process exits 0.
#[tokio::test]
async fn a_drain_spreads_its_closes_over_the_timeout() {
    const CLIENTS: usize = 20;
    // Half of the 2 s timeout is 1 s of spread: the first and the last batch are 900 ms apart.
    const SPREAD_MIN: Duration = Duration::from_millis(600);
    let mut wse = Wse::start(&["--cores", "1", "--drain-timeout", "2s"]);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(connector(&wse, &format!("c{i}")).connect().await.unwrap());
    }
    let start = tokio::time::Instant::now();
    wse.sigterm();
    let closes: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let close = c.expect_close(T).await.unwrap();
                (close.code, tokio::time::Instant::now())
            })
        })
        .collect();
    let mut at = Vec::new();
    for close in closes {
        let (code, when) = close.await.unwrap();
        assert_eq!(code, 4300);
        at.push(when - start);
    }
    at.sort();
    let (first, last) = (at[0], at[CLIENTS - 1]);
    assert!(
        last - first >= SPREAD_MIN,
        "closes arrived within {:?} of each other: {at:?}",
        last - first
    );
    assert!(last < Duration::from_secs(2), "{at:?}");
    let status = wse.wait_exit(T).expect("server exited");
    assert!(status.success(), "{status:?}");
    assert!(wse.log().contains("drain complete"), "{}", wse.log());
}

/// A refused token is logged at info with the reason and the peer's address, never the token.
#[tokio::test]
async fn an_authentication_refusal_is_logged_with_reason_and_peer() {
    let wse = Wse::start(&["--cores", "1"]);
    let forged = token_signed("not-the-server-secret-but-32-bytes-long!", "mallory");
    let err = Connector::new(wse.url())
        .token(forged.clone())
        .connect()
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, Error::Closed { code: 4401, .. }), "{err:?}");
    assert!(
        wse.wait_log("authentication refused", 1, T),
        "{}",
        wse.log()
    );
    let log = wse.log();
    let line = log
        .lines()
        .find(|l| l.contains("authentication refused"))
        .unwrap();
    assert!(line.contains("invalid signature"), "{line}");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    let signature = forged.rsplit('.').next().unwrap();
    assert!(
        !log.contains(signature),
        "the token reached the log:\n{log}"
    );
}

/// At debug, each connection's life is in the log: accepted (with the peer), upgraded, closed
/// with its code.
#[tokio::test]
async fn debug_logs_each_connections_lifecycle() {
    let mut cmd = Wse::command();
    cmd.env("RUST_LOG", "info,wse_shards=debug").args([
        "--listen",
        "127.0.0.1:0",
        "--control-listen",
        "127.0.0.1:0",
        "--cores",
        "1",
    ]);
    let wse = Wse::start_command(cmd);
    let c = Connector::new(wse.url()).connect().await.unwrap();
    let id = c.connection_id().to_owned();
    c.close(1000, "bye").await.unwrap();
    let closed = format!("conn={id} code=1000");
    assert!(wse.wait_log(&closed, 1, T), "{}", wse.log());
    let log = wse.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&id)).collect();
    assert!(
        lines[0].contains("accepted") && lines[0].contains("peer=127.0.0.1:"),
        "{lines:#?}"
    );
    assert!(lines.iter().any(|l| l.contains("upgraded")), "{lines:#?}");
    assert!(lines.last().unwrap().contains("closed"), "{lines:#?}");
}

#[tokio::test]
async fn subscription_limit_holds_even_for_pipelined_requests() {
    let wse = Wse::start(&["--cores", "2", "--max-subscriptions-per-connection", "3"]);
    let mut c = connector(&wse, "greedy").connect().await.unwrap();
    let ack = c.subscribe(&["a", "b"]).await.unwrap();
    assert_eq!(ack.p["success"], true);
    // Two requests in flight at once: together they must not pass the limit.
    for topics in [json!(["c", "d"]), json!(["e", "a"])] {
        c.send_json(&json!({"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":topics}}))
            .await
            .unwrap();
    }
    let mut ok = Vec::new();
    let mut limited = Vec::new();
    for _ in 0..2 {
        let ack = c
            .recv_until(|e| e.t == "subscription_update", T)
            .await
            .unwrap();
        ok.extend(
            ack.p["success_topics"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_owned()),
        );
        for f in ack.p["failed_topics"].as_array().unwrap() {
            assert_eq!(f["reason"], "SUBSCRIPTION_LIMIT");
            limited.push(f["topic"].as_str().unwrap().to_owned());
        }
    }
    ok.sort();
    limited.sort();
    // "a" was already held (re-subscribing is free); one new topic fits.
    assert_eq!(ok, vec!["a", "c"]);
    assert_eq!(limited, vec!["d", "e"]);
}

#[tokio::test]
async fn a_departed_subscriber_leaves_nothing_behind_for_its_slot_successor() {
    let wse = Wse::start(&["--cores", "1"]);
    let mut a = connector(&wse, "a").connect().await.unwrap();
    a.subscribe(&["secret"]).await.unwrap();
    let a_id = a.connection_id().to_owned();
    a.close(1000, "bye").await.unwrap();
    // Once the server has released the slot, the next connection reuses it (same slab key: the
    // id's last 8 hex digits).
    for _ in 0..200 {
        if wse.metric("wse_sockets", "").await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut b = connector(&wse, "b").connect().await.unwrap();
    assert_eq!(b.connection_id()[8..], a_id[8..], "the slot was not reused");
    b.subscribe(&["public"]).await.unwrap();
    wse.api_publish("secret", "leak", json!(1)).await;
    wse.api_publish("public", "ok", json!(2)).await;
    let ev = b
        .recv_until(|e| e.t == "leak" || e.t == "ok", T)
        .await
        .unwrap();
    assert_eq!(
        ev.t, "ok",
        "the slot's previous subscription leaked to its new occupant"
    );
}
