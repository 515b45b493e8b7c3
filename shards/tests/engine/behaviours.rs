//! The protocol behaviours the end-to-end suite used to be the only proof of, one test each,
//! asserting the frames every connection receives — whole texts where they are deterministic
//! (the virtual wall clock makes every timestamp so), JSON field by field where they are not
//! (`server_ready`'s random `id`, a history's random epoch).

use std::time::Duration;

use serde_json::{Value, json};

use wse_shards::AppEventKind;
use wse_shards::metrics::DropReason;

use crate::harness::{Client, Engine, Frame, config, topic_owned_by};

fn subscribe(e: &mut Engine, c: Client, topics: &[&str]) {
    e.send_json(
        c,
        &json!({"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":topics}}),
    );
}

fn publish(e: &mut Engine, c: Client, topic: &str, event: &str, data: Value, ack: bool) {
    e.send_json(
        c,
        &json!({"c":"WSE","t":"publish","p":{"topic":topic,"event":event,"data":data,"ack":ack}}),
    );
}

/// The acknowledgement text of a successful subscription to `topics`.
fn sub_ack(topics: &[&str]) -> String {
    format!(
        r#"{{"c":"WSE","t":"subscription_update","p":{{"action":"subscribe","success":true,"success_topics":{},"failed_topics":[]}},"v":1}}"#,
        json!(topics)
    )
}

/// A connection on `shard` with its `server_ready` taken.
fn connected(e: &mut Engine, shard: usize, user: &str) -> Client {
    let c = e.connect(shard, user);
    let ready = e.recv(c);
    assert_eq!(ready.len(), 1);
    c
}

fn texts(frames: &[Frame]) -> Vec<&str> {
    frames.iter().map(Frame::text).collect()
}

#[test]
fn upgrade_answers_101_then_server_ready_first() {
    let mut e = Engine::new(config(2));
    let c = e.connect(1, "alice");
    let response = e.upgrade_response(c).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{response}"
    );
    // RFC 6455's worked example of the accept key.
    assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    let frames = e.recv(c);
    assert_eq!(frames.len(), 1, "{frames:?}");
    let text = frames[0].text();
    assert!(
        text.starts_with(r#"{"c":"WSE","t":"server_ready","p":{"#),
        "{text}"
    );
    let mut ready = frames[0].json();
    let id = ready.as_object_mut().unwrap().remove("id").unwrap();
    assert_eq!(id.as_str().unwrap().len(), 36, "a UUID");
    assert_eq!(
        ready,
        json!({"c":"WSE","t":"server_ready","p":{"message":"Connection established",
            "details":{"version":1,"features":{"compression":true,"encryption":false,
                "batching":true,"priority_queue":false,"circuit_breaker":false,
                "rust_transport":true,"rust_jwt":true,"recovery":false},
                "connection_id":"0100000100000000","server_time":"2027-01-15T08:00:00.000Z",
                "user_id":"alice"}},
            "ts":"2027-01-15T08:00:00.000Z","seq":1,"v":1})
    );
}

#[test]
fn a_bad_token_gets_an_error_then_4401_after_the_upgrade() {
    let mut e = Engine::new(config(1));
    let c = e.accept(0);
    let request = crate::harness::upgrade_request("/wse?token=not-a-jwt");
    e.send_raw(c, request.as_bytes());
    e.settle();
    let frames = e.recv(c);
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0].json()["p"]["code"], "AUTH_FAILED");
    assert_eq!(
        frames[1],
        Frame::Close(Some((4401, "Authentication failed".into())))
    );
    // The client answered the close; the refused connection is gone.
    assert!(e.is_released(c));
}

/// Refused connections whose peer does not answer linger for `REFUSED_LINGER` (so the error
/// frame can be read), but at most `REFUSED_LINGERING_MAX_PER_SHARD` of them at once: past that a
/// refused connection goes at its next timer tick, and a released one makes room again.
#[test]
fn refused_connections_linger_up_to_the_cap() {
    use wse_shards::config::TIMER_TICK;
    use wse_shards::conn::{REFUSED_LINGER, REFUSED_LINGERING_MAX_PER_SHARD};
    let mut e = Engine::new(config(1));
    let refuse = |e: &mut Engine| {
        let c = e.accept(0);
        e.set_reading(c, false);
        let request = crate::harness::upgrade_request("/wse?token=not-a-jwt");
        e.send_raw(c, request.as_bytes());
        e.settle();
        c
    };
    let lingering: Vec<Client> = (0..REFUSED_LINGERING_MAX_PER_SHARD)
        .map(|_| refuse(&mut e))
        .collect();
    let over = refuse(&mut e);
    e.advance(TIMER_TICK * 2);
    assert!(e.is_released(over), "over the cap: gone at its first tick");
    assert!(lingering.iter().all(|&c| !e.is_released(c)));
    e.advance(REFUSED_LINGER);
    assert!(lingering.iter().all(|&c| e.is_released(c)));
    // The count went back down: the next refusal lingers again.
    let next = refuse(&mut e);
    e.advance(TIMER_TICK * 2);
    assert!(!e.is_released(next));
    e.advance(REFUSED_LINGER);
    assert!(e.is_released(next));
}

#[test]
fn hello_and_ping_are_answered_exactly() {
    let mut e = Engine::new(config(1));
    let c = connected(&mut e, 0, "alice");
    e.advance(Duration::from_millis(1500));
    for _ in 0..2 {
        e.send(
            c,
            r#"{"c":"WSE","t":"client_hello","p":{"client_version":"t","protocol_version":1}}"#,
        );
    }
    e.send(
        c,
        r#"{"c":"WSE","t":"ping","p":{"timestamp":1800000001000}}"#,
    );
    e.settle();
    let hello = json!({"c":"WSE","t":"server_hello","p":{"server_version":
        wse_shards::protocol::SERVER_VERSION,"protocol_version":1,
        "features":{"compression":true,"recovery":false,"cluster":false,"batching":true,
            "priority_queue":false,"msgpack":true,"encryption":false},
        "limits":{"max_message_size":1_048_576,"rate_limit_capacity":100_000,
            "rate_limit_refill":10_000,"max_queue_size":4_194_304},
        "ping_interval":25_000,"connection_id":"0000000100000000",
        "server_time":"2027-01-15T08:00:01.500Z"},"v":1});
    let frames = e.recv(c);
    assert_eq!(frames.len(), 3);
    for f in &frames[..2] {
        assert!(
            f.text()
                .starts_with(r#"{"c":"WSE","t":"server_hello","p":{"#)
        );
        assert_eq!(f.json(), hello);
    }
    assert_eq!(
        frames[2].text(),
        r#"{"c":"WSE","t":"PONG","p":{"client_timestamp":1800000001000,"server_timestamp":1800000001500,"latency":500},"v":1}"#,
    );
}

/// A subscriber on shard 1 of a topic owned by shard 2, a publisher on shard 0. A publication
/// the owner sequences before the subscriber's join never reaches it; the acknowledgement comes
/// before the first publication sequenced after the join.
#[test]
fn subscribe_ack_precedes_delivery_across_shards() {
    let mut e = Engine::new(config(3));
    let topic = topic_owned_by("t", 2, 3);
    let sub = connected(&mut e, 1, "sub");
    let publisher = connected(&mut e, 0, "pub");
    subscribe(&mut e, sub, &[&topic]);
    publish(&mut e, publisher, &topic, "early", json!(1), false);
    // Shard 1 sends the join and shard 0 the publication; the owner takes its inbound queues in
    // sender order, so the publication (from 0) is sequenced before the join (from 1).
    e.turn(1);
    e.turn(0);
    e.turn(2);
    assert!(e.recv(sub).is_empty(), "nothing before the owner's answer");
    // The owner's answer, then a publication sequenced after the join, both reach shard 1 in
    // one turn: the acknowledgement goes first.
    publish(&mut e, publisher, &topic, "late", json!(2), false);
    e.turn(0);
    e.turn(2);
    e.turn(1);
    assert_eq!(
        texts(&e.recv(sub)),
        [
            sub_ack(&[&topic]).as_str(),
            r#"{"c":"U","t":"late","p":2,"v":1}"#
        ]
    );
    e.settle();
    assert!(e.recv(sub).is_empty());
    assert!(e.recv(publisher).is_empty());
}

#[test]
fn a_publication_fans_out_once_to_every_subscriber_on_every_shard() {
    let mut e = Engine::new(config(3));
    let topic = topic_owned_by("room", 1, 3);
    let subs: Vec<Client> = (0..6)
        .map(|i| connected(&mut e, i % 3, &format!("u{i}")))
        .collect();
    for &s in &subs {
        subscribe(&mut e, s, &[&topic]);
    }
    e.settle();
    for &s in &subs {
        assert_eq!(texts(&e.recv(s)), [sub_ack(&[&topic]).as_str()]);
    }
    let publisher = connected(&mut e, 2, "pub");
    publish(
        &mut e,
        publisher,
        &topic,
        "chat",
        json!({"text": "hi"}),
        true,
    );
    e.settle();
    assert_eq!(
        texts(&e.recv(publisher)),
        [
            format!(
                r#"{{"c":"WSE","t":"publish_ack","p":{{"topic":"{topic}","offset":1}},"v":1}}"#
            )
            .as_str()
        ]
    );
    for &s in &subs {
        assert_eq!(
            texts(&e.recv(s)),
            [r#"{"c":"U","t":"chat","p":{"text":"hi"},"v":1}"#]
        );
    }
    // One entry per interested shard, not per subscriber.
    assert_eq!(e.metrics(1).publications_total.get(), 1);
}

/// Publishers on every shard, interleaved turn by turn: every subscriber sees one order, and
/// each publisher's messages in the order it sent them.
#[test]
fn one_order_per_topic_under_concurrent_publishers() {
    let mut e = Engine::new(config(3));
    let topic = topic_owned_by("ticks", 0, 3);
    let subs: Vec<Client> = (0..3)
        .map(|i| connected(&mut e, i, &format!("s{i}")))
        .collect();
    for &s in &subs {
        subscribe(&mut e, s, &[&topic]);
    }
    e.settle();
    let pubs: Vec<Client> = (0..3)
        .map(|i| connected(&mut e, i, &format!("p{i}")))
        .collect();
    for &s in &subs {
        e.recv(s);
    }
    for seq in 0..40u64 {
        for (p, &c) in pubs.iter().enumerate() {
            publish(
                &mut e,
                c,
                &topic,
                "tick",
                json!({"p": p, "seq": seq}),
                false,
            );
        }
        e.turn((seq % 3) as usize);
    }
    e.settle();
    let mut orders = Vec::new();
    for &s in &subs {
        let seen: Vec<(u64, u64)> = e
            .recv_json(s)
            .iter()
            .map(|m| {
                (
                    m["p"]["p"].as_u64().unwrap(),
                    m["p"]["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(seen.len(), 120);
        for p in 0..3 {
            let mine: Vec<u64> = seen.iter().filter(|m| m.0 == p).map(|m| m.1).collect();
            assert_eq!(
                mine,
                (0..40).collect::<Vec<_>>(),
                "publisher {p} out of order"
            );
        }
        orders.push(seen);
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "subscribers disagree"
    );
}

fn recovering(shards: usize) -> Engine {
    let mut cfg = config(shards);
    cfg.recovery.enabled = true;
    // Small history: the log is allocated and touched at start, per engine.
    cfg.recovery.memory_budget = 1 << 20;
    cfg.recovery.max_topics = 64;
    Engine::new(cfg)
}

/// A recovering subscriber gets the history it missed — the very frames sent live — before its
/// acknowledgement, then live publications, with none missing or repeated, while publications
/// keep arriving during the recovery.
#[test]
fn recovery_replays_before_live_without_gaps() {
    let mut e = recovering(2);
    let topic = topic_owned_by("feed", 0, 2);
    let live = connected(&mut e, 0, "live");
    let publisher = connected(&mut e, 0, "pub");
    subscribe(&mut e, live, &[&topic]);
    e.settle();
    e.recv(live);
    for seq in 0..10 {
        publish(&mut e, publisher, &topic, "m", json!({"seq": seq}), false);
    }
    e.settle();
    let live_frames = e.recv(live);
    assert_eq!(live_frames.len(), 10);
    let epoch = live_frames[0].json()["e"].as_str().unwrap().to_owned();
    assert_eq!(epoch.len(), 8);
    assert_eq!(
        live_frames[0].text(),
        format!(r#"{{"tp":"{topic}","e":"{epoch}","o":1,"c":"U","t":"m","p":{{"seq":0}},"v":1}}"#)
    );

    // The recoverer is on the other shard; two more publications race its request.
    let r = connected(&mut e, 1, "late");
    let p = json!({"action":"subscribe","topics":[topic],"recover":true,
        "recovery":{topic.as_str(): {"epoch": epoch, "offset": 4}}});
    e.send_json(r, &json!({"c":"WSE","t":"subscription_update","p":p}));
    publish(&mut e, publisher, &topic, "m", json!({"seq": 10}), false);
    e.turn(1);
    publish(&mut e, publisher, &topic, "m", json!({"seq": 11}), false);
    e.settle();
    let got = e.recv(r);
    let ack_at = got
        .iter()
        .position(|f| f.t().as_deref() == Some("subscription_update"))
        .unwrap();
    let ack = got[ack_at].json();
    let info = &ack["p"]["recovery"][topic.as_str()];
    assert_eq!(info["recovered"], true, "{ack}");
    assert_eq!(info["epoch"], epoch.as_str());
    let last = info["offset"].as_u64().unwrap();
    let offsets: Vec<u64> = got.iter().filter_map(|f| f.json()["o"].as_u64()).collect();
    // Replay (5..=last) before the acknowledgement, live after it: 5..=12 once each, in order.
    assert_eq!(offsets, (5..=12).collect::<Vec<_>>());
    assert_eq!(
        ack_at as u64,
        last - 4,
        "exactly the replay precedes the ack"
    );
    assert_eq!(info["count"], last - 4);
    let replayed: Vec<&str> = got[..6].iter().map(Frame::text).collect();
    let sent_live: Vec<&str> = live_frames[4..].iter().map(Frame::text).collect();
    assert_eq!(
        replayed, sent_live,
        "replayed frames differ from the live ones"
    );
}

fn with_presence(shards: usize) -> Engine {
    let mut cfg = config(shards);
    cfg.presence.enabled = true;
    Engine::new(cfg)
}

fn join_presence(e: &mut Engine, c: Client, topic: &str, data: Value) {
    e.send_json(
        c,
        &json!({"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":[topic],"presence":data}}),
    );
}

fn presence(t: &str, topic: &str, user: &str, data: Value) -> String {
    format!(
        r#"{{"c":"WSE","t":"{t}","p":{{"topic":"{topic}","user_id":"{user}","data":{data}}},"v":1}}"#
    )
}

/// One join per user however many connections, across shards; an update from any connection;
/// one leave when the user's last connection goes (a disconnect without a close frame).
#[test]
fn presence_join_update_and_leave_across_shards() {
    let mut e = with_presence(2);
    let topic = topic_owned_by("room", 1, 2);
    let watcher = connected(&mut e, 0, "watcher");
    join_presence(&mut e, watcher, &topic, json!({"role": "observer"}));
    e.settle();
    assert_eq!(
        texts(&e.recv(watcher)),
        [
            sub_ack(&[&topic]).as_str(),
            presence(
                "presence_join",
                &topic,
                "watcher",
                json!({"role": "observer"})
            )
            .as_str(),
        ]
    );
    let ann: Vec<Client> = (0..2).map(|s| connected(&mut e, s, "ann")).collect();
    for &c in &ann {
        join_presence(&mut e, c, &topic, json!({"status": "here"}));
    }
    e.settle();
    let joined = presence("presence_join", &topic, "ann", json!({"status": "here"}));
    assert_eq!(texts(&e.recv(watcher)), [joined.as_str()]);
    e.send(
        ann[0],
        r#"{"c":"WSE","t":"presence_update","p":{"data":{"status":"away"}}}"#,
    );
    e.settle();
    let away = json!({"status": "away"});
    assert_eq!(
        texts(&e.recv(watcher)),
        [presence("presence_update", &topic, "ann", away.clone()).as_str()]
    );
    e.disconnect(ann[0]);
    e.settle();
    assert!(e.recv(watcher).is_empty(), "ann still has a connection");
    e.disconnect(ann[1]);
    e.settle();
    assert_eq!(
        texts(&e.recv(watcher)),
        [presence("presence_leave", &topic, "ann", away).as_str()]
    );
}

/// A silent client is pinged every `ping_interval` and closed with 4408 at `idle_timeout`; one
/// that answers stays.
#[test]
fn idle_connections_are_pinged_then_closed_with_4408() {
    let mut cfg = config(1);
    cfg.protocol.ping_interval = Duration::from_millis(300);
    cfg.protocol.idle_timeout = Duration::from_millis(1200);
    let mut e = Engine::new(cfg);
    let silent = connected(&mut e, 0, "quiet");
    let lively = connected(&mut e, 0, "lively");
    for _ in 0..8 {
        e.advance(Duration::from_millis(300));
        for f in e.recv(lively) {
            assert_eq!(f.t().as_deref(), Some("ping"));
            e.send(lively, r#"{"c":"WSE","t":"PONG","p":{}}"#);
        }
    }
    let ping = |ms: u64| {
        format!(
            r#"{{"c":"WSE","t":"ping","p":{{"server_time":"2027-01-15T08:00:0{}.{:03}Z"}}}}"#,
            ms / 1000,
            ms % 1000
        )
    };
    let frames = e.recv(silent);
    assert_eq!(
        frames,
        [
            Frame::Text(ping(300)),
            Frame::Text(ping(600)),
            Frame::Text(ping(900)),
            Frame::Close(Some((4408, "idle timeout".into()))),
        ]
    );
    assert!(e.is_released(silent));
    assert!(!e.is_released(lively));
    assert_eq!(e.metrics(0).closes(4408).get(), 1);
}

/// A subscriber that stops reading fills its socket, then its outbound queue, and is closed with
/// 4413 after an in-order prefix; the others get everything.
#[test]
fn a_slow_consumer_is_evicted_with_4413_without_affecting_others() {
    let mut cfg = config(2);
    cfg.limits.max_outbound_queue_bytes = 64 * 1024;
    let mut e = Engine::new(cfg);
    let topic = topic_owned_by("firehose", 1, 2);
    let slow = connected(&mut e, 0, "slow");
    let fast = connected(&mut e, 0, "fast");
    let publisher = connected(&mut e, 1, "pub");
    for c in [slow, fast] {
        subscribe(&mut e, c, &[&topic]);
    }
    e.settle();
    e.recv(slow);
    e.recv(fast);
    e.set_socket_capacity(slow, 16 * 1024);
    e.set_reading(slow, false);
    let pad = "x".repeat(4096);
    for seq in 0..100u64 {
        publish(
            &mut e,
            publisher,
            &topic,
            "m",
            json!({"seq": seq, "pad": pad}),
            false,
        );
        e.settle();
        let got = e.recv_json(fast);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["p"]["seq"], seq);
    }
    // Nothing but the socket's worth is out; the client now reads what it was sent.
    assert_eq!(e.unread_bytes(slow), 16 * 1024);
    e.set_reading(slow, true);
    e.settle();
    let frames = e.recv(slow);
    let (close, data) = frames.split_last().unwrap();
    assert_eq!(close, &Frame::Close(Some((4413, "slow consumer".into()))));
    let seqs: Vec<u64> = data
        .iter()
        .map(|f| f.json()["p"]["seq"].as_u64().unwrap())
        .collect();
    assert!(!seqs.is_empty() && seqs.len() < 100, "{}", seqs.len());
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    e.settle();
    assert!(e.is_released(slow));
    assert_eq!(e.metrics(0).closes(4413).get(), 1);
    assert_eq!(e.metrics(0).dropped(DropReason::SlowConsumer).get(), 1);
}

fn rate_limited(capacity: u32, refill: u32, abuse_drops: u32) -> Engine {
    let mut cfg = config(1);
    cfg.protocol.rate_limit_capacity = capacity;
    cfg.protocol.rate_limit_refill = refill;
    cfg.protocol.rate_limit_abuse_drops = abuse_drops;
    Engine::new(cfg)
}

/// 10 tokens: 8 pongs, a warning with the 9th, the 10th answered, the 11th and 12th dropped with
/// one `RATE_LIMITED` error; a second later the bucket has refilled.
#[test]
fn rate_limit_warns_then_drops_and_keeps_the_connection() {
    let mut e = rate_limited(10, 1, 1000);
    let c = connected(&mut e, 0, "flood");
    for i in 0..12 {
        e.send(
            c,
            &format!(r#"{{"c":"WSE","t":"ping","p":{{"timestamp":{i}}}}}"#),
        );
    }
    e.settle();
    let got = e.recv_json(c);
    let kinds: Vec<&str> = got.iter().map(|m| m["t"].as_str().unwrap()).collect();
    let expected = [
        ["PONG"; 8].as_slice(),
        &["rate_limit_warning", "PONG", "PONG", "error"],
    ]
    .concat();
    assert_eq!(kinds, expected);
    assert_eq!(got[8]["p"]["limit"], 1);
    assert_eq!(got[8]["p"]["remaining"], 1);
    assert_eq!(
        got[11],
        json!({"c":"WSE","t":"error","p":{"code":"RATE_LIMITED","message":"Rate limit exceeded",
            "recoverable":true,"retry_after":1.0,"timestamp":"2027-01-15T08:00:00.000Z"},"v":1})
    );
    e.send(c, r#"{"c":"WSE","t":"ping","p":{"timestamp":99}}"#);
    e.settle();
    assert!(e.recv(c).is_empty(), "a dropped message was answered");
    e.advance(Duration::from_millis(1100));
    e.send(c, r#"{"c":"WSE","t":"ping","p":{"timestamp":100}}"#);
    e.settle();
    // About one token refilled: answered, with a warning that it was the last.
    let kinds: Vec<Value> = e.recv_json(c).iter().map(|m| m["t"].clone()).collect();
    assert_eq!(kinds, [json!("rate_limit_warning"), json!("PONG")]);
    assert_eq!(e.metrics(0).rate_limited_total.get(), 3);
}

#[test]
fn a_persistent_flood_is_closed_with_4429() {
    let mut e = rate_limited(5, 1, 20);
    let c = connected(&mut e, 0, "flood");
    for _ in 0..40 {
        e.send(c, r#"{"c":"WSE","t":"noise","p":{}}"#);
    }
    e.settle();
    let frames = e.recv(c);
    assert_eq!(
        frames.last(),
        Some(&Frame::Close(Some((4429, "rate limit exceeded".into()))))
    );
    assert!(e.is_released(c));
}

/// A shutdown closes every connection on every shard with 4300, in batches spread over the first
/// half of the drain timeout; each shard has drained once its clients answered.
#[test]
fn drain_closes_everyone_with_4300() {
    let cfg = config(2);
    let spread = cfg.server.drain_timeout / 2;
    let mut e = Engine::new(cfg);
    let clients: Vec<Client> = (0..4)
        .map(|i| connected(&mut e, i % 2, &format!("c{i}")))
        .collect();
    for &c in &clients {
        subscribe(&mut e, c, &["t"]);
    }
    e.settle();
    e.shutdown();
    e.advance(spread);
    for &c in &clients {
        let frames = e.recv(c);
        assert_eq!(
            texts(&frames[..1]),
            [sub_ack(&["t"]).as_str()],
            "{frames:?}"
        );
        assert_eq!(
            frames[1..],
            [Frame::Close(Some((4300, "server shutting down".into())))]
        );
        assert!(e.is_released(c));
    }
    for s in 0..2 {
        assert!(e.shard(s).is_drained(e.clock().now));
    }
}

/// With `protocol.app_handles_requests` (the Python package's upstream mode), subscriptions and
/// publications, well-formed or not, reach the event stream as they were sent; the engine neither
/// answers nor acts on them, and other application messages still reach it too.
#[test]
fn app_handled_requests_go_to_the_event_stream_untouched() {
    let mut cfg = config(2);
    cfg.protocol.app_handles_requests = true;
    let mut e = Engine::new(cfg);
    let c = connected(&mut e, 0, "alice");
    let other = connected(&mut e, 1, "bob");
    let sent = [
        r#"{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":["news"]}}"#,
        r#"{"t":"unsubscribe","p":{"topics":["news"]}}"#,
        r#"{"c":"U","t":"publish","p":{"topic":"news","event":"e","data":{"x":1},"ack":true}}"#,
        r#"{"t":"subscription_update","p":{"topics":"not-a-list"}}"#,
        r#"{"t":"publish","p":{"no_topic":true}}"#,
        r#"{"t":"chat","p":{"text":"hi"}}"#,
    ];
    for m in sent {
        e.send(c, m);
    }
    e.settle();
    assert!(e.recv(c).is_empty(), "no acknowledgement, ack or error");
    assert!(e.recv(other).is_empty());
    let got: Vec<(AppEventKind, &str)> = e
        .shard(0)
        .app_events()
        .iter()
        .filter(|ev| ev.kind != AppEventKind::AuthConnect)
        .map(|ev| (ev.kind, std::str::from_utf8(&ev.payload).unwrap()))
        .collect();
    let want: Vec<(AppEventKind, &str)> = sent.iter().map(|m| (AppEventKind::Msg, *m)).collect();
    assert_eq!(got, want);
    // The engine published nothing.
    assert_eq!(
        e.metrics(0).publications_total.get() + e.metrics(1).publications_total.get(),
        0
    );
}

/// A subscribe whose `Join` to the topic's owner the fabric drops (its sender's bytes in flight
/// are over budget) fails the topic at once with `SERVER_BUSY` instead of waiting for an
/// acknowledgement that never comes; the next subscribe, once the fabric has room, succeeds and
/// receives the topic's publications.
#[test]
fn a_subscribe_whose_join_the_fabric_drops_fails_with_server_busy() {
    let mut cfg = config(2);
    cfg.presence.enabled = true;
    cfg.presence.max_data_size = 64 * 1024;
    // At least twice the largest message, the configuration's floor; an eighth goes to ring
    // slots, the rest (at most 256 KiB) bounds the bytes in flight.
    cfg.limits.max_message_size = 128 * 1024;
    cfg.limits.fabric_memory_per_shard = 256 * 1024;
    let mut e = Engine::new(cfg);
    let topic = topic_owned_by("room:busy", 1, 2);
    let elsewhere = topic_owned_by("room:other", 1, 2);
    let alice = connected(&mut e, 0, "alice");
    let bob = connected(&mut e, 0, "bob");
    let carol = connected(&mut e, 1, "carol");
    // In one turn of shard 0, before the owner has taken anything: two publications take
    // 200 KiB of the budget, and alice's `Join` (carrying 60 KiB of presence data) does not fit.
    let pad = "x".repeat(100 * 1024);
    for _ in 0..2 {
        publish(&mut e, alice, &elsewhere, "e", json!({ "pad": pad }), false);
    }
    let data = json!({ "pad": "y".repeat(60 * 1024) });
    join_presence(&mut e, alice, &topic, data);
    e.settle();
    assert_eq!(
        texts(&e.recv(alice)),
        [format!(
            r#"{{"c":"WSE","t":"subscription_update","p":{{"action":"subscribe","success":false,"success_topics":[],"failed_topics":[{{"topic":"{topic}","reason":"SERVER_BUSY"}}]}},"v":1}}"#
        )
        .as_str()]
    );
    assert_eq!(e.metrics(0).dropped(DropReason::FabricOverflow).get(), 1);
    // The owner took the publications: later subscribes on the same shard go through.
    subscribe(&mut e, alice, &[&topic]);
    subscribe(&mut e, bob, &[&topic]);
    e.settle();
    for c in [alice, bob] {
        // Presence events of the two joins come too; only the acknowledgement matters here.
        let frames = e.recv_json(c);
        let acks: Vec<&Value> = frames
            .iter()
            .filter(|f| f["t"] == "subscription_update")
            .collect();
        assert_eq!(acks.len(), 1, "{frames:?}");
        assert_eq!(acks[0]["p"]["success_topics"], json!([topic]), "{frames:?}");
    }
    publish(&mut e, carol, &topic, "hello", json!({ "n": 1 }), false);
    e.settle();
    for c in [alice, bob] {
        let frames = e.recv_json(c);
        assert!(
            frames.iter().any(|f| f["t"] == "hello" && f["p"]["n"] == 1),
            "{frames:?}"
        );
    }
    assert_eq!(e.metrics(0).dropped(DropReason::FabricOverflow).get(), 1);
}
