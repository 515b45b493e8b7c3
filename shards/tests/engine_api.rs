//! The engine API embedded in-process: commands routed to connections' shards, answers gathered
//! from every shard, and the application events collected from them.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use wse_client::{Client, Connector, Encoding, Error};
use wse_shards::command::AppSubscribe;
use wse_shards::{AppEvent, AppEventKind, CommandError, Config, ConnId, Payload, Server};

const SECRET: &str = "engine-api-test-secret-0123456789abcdef";
const T: Duration = Duration::from_secs(10);

fn server(cores: usize, f: impl FnOnce(&mut Config)) -> Server {
    Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .cores(cores)
        .configure(|cfg| {
            cfg.server.drain_timeout = Duration::from_secs(1);
            cfg.control.enabled = false;
            cfg.auth.enabled = true;
            cfg.auth.secret = Some(SECRET.into());
            cfg.auth.default_publish = vec!["*".into()];
            f(cfg);
        })
        .start()
        .unwrap()
}

fn token(sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "iat": now, "exp": now + 3600, "iss": "tests"}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn connect(server: &Server, user: &str) -> (Client, ConnId) {
    let url = format!("ws://{}/wse", server.local_addr());
    let c = Connector::new(url)
        .token(token(user))
        .connect()
        .await
        .unwrap();
    let id = ConnId::parse(c.connection_id()).unwrap();
    (c, id)
}

/// Collects events until `done` holds for the list (or fails after `T`).
async fn events_until(server: &Server, done: impl Fn(&[AppEvent]) -> bool) -> Vec<AppEvent> {
    let mut got = Vec::new();
    tokio::time::timeout(T, async {
        while !done(&got) {
            got.extend(server.next_inbound(64).await);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("events so far: {got:?}"));
    got
}

fn kinds(events: &[AppEvent], conn: ConnId) -> Vec<AppEventKind> {
    events
        .iter()
        .filter(|e| e.conn == Some(conn))
        .map(|e| e.kind)
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn sends_reach_the_connection_in_every_form() {
    let server = server(2, |_| {});
    let (mut c, id) = connect(&server, "ann").await;
    let (mut m, mid) = {
        let url = format!("ws://{}/wse", server.local_addr());
        let c = Connector::new(url)
            .token(token("ann"))
            .query("format", "msgpack")
            .connect()
            .await
            .unwrap();
        let id = ConnId::parse(c.connection_id()).unwrap();
        (c, id)
    };

    let sent = server
        .send(id, r#"{"c":"U","t":"plain","p":1}"#)
        .await
        .unwrap();
    assert!(sent.bytes > 0 && !sent.duplicate);
    let ev = c.recv().await.unwrap();
    assert_eq!(
        (ev.t.as_str(), &ev.p, ev.binary),
        ("plain", &json!(1), false)
    );

    server
        .send_bytes(id, br#"{"t":"bin","p":2}"#)
        .await
        .unwrap();
    let ev = c.recv().await.unwrap();
    assert_eq!((ev.t.as_str(), ev.binary), ("bin", true));

    let event = r#"{"t":"note","p":{"x":1},"id":"n-1","corr":"k"}"#;
    server.send_event(id, event).await.unwrap();
    let ev = c.recv().await.unwrap();
    assert_eq!(ev.t, "note");
    assert_eq!(ev.raw["id"], "n-1");
    assert_eq!(ev.raw["corr"], "k");
    assert_eq!(ev.raw["seq"], 2, "server_ready was seq 1");
    assert!(ev.raw["ts"].as_str().unwrap().ends_with('Z'));
    // The same id again: nothing is sent.
    let again = server.send_event(id, event).await.unwrap();
    assert!(again.duplicate);
    server
        .send_event(id, r#"{"t":"note2","p":{"big":"x"}}"#)
        .await
        .unwrap();
    let ev = c.recv().await.unwrap();
    assert_eq!((ev.t.as_str(), &ev.raw["seq"]), ("note2", &json!(3)));

    // Over the compression threshold: C: + zlib; on a msgpack connection: M:.
    let big = json!({"t": "big", "p": {"pad": "y".repeat(4000)}}).to_string();
    server.send_event(id, &big).await.unwrap();
    let ev = c.recv().await.unwrap();
    assert_eq!(ev.t, "big");
    assert_eq!(ev.encoding, Encoding::Zlib);
    server.send_event(mid, r#"{"t":"packed"}"#).await.unwrap();
    let ev = m.recv().await.unwrap();
    assert_eq!((ev.t.as_str(), ev.encoding), ("packed", Encoding::MsgPack));

    // Errors are typed.
    assert_eq!(
        server.send_event(id, r#"{"p":1}"#).await.unwrap_err(),
        CommandError::InvalidEvent("needs a non-empty string 't'")
    );
    let gone = ConnId::parse("00ffffff00000fff").unwrap();
    assert_eq!(
        server.send(gone, "x").await.unwrap_err(),
        CommandError::UnknownConnection
    );
    let foreign = ConnId::parse("7f00000100000001").unwrap();
    assert_eq!(
        server.send(foreign, "x").await.unwrap_err(),
        CommandError::UnknownConnection
    );

    // Disconnect with a code of the application's choice.
    assert_eq!(
        server.disconnect(id, 1001, "no").await.unwrap_err(),
        CommandError::InvalidCloseCode(1001)
    );
    server.disconnect(id, 4321, "bye").await.unwrap();
    match c.recv().await {
        Err(Error::Closed { code, .. }) => assert_eq!(code, 4321),
        other => panic!("expected a close, got {other:?}"),
    }
    assert_eq!(
        server.send(id, "x").await.unwrap_err(),
        CommandError::UnknownConnection
    );
    assert!(server.stop(Duration::from_secs(2)));
}

#[tokio::test(flavor = "current_thread")]
async fn events_arrive_in_order_per_connection_with_every_kind() {
    let server = server(2, |cfg| cfg.presence.enabled = true);
    let (mut c, id) = connect(&server, "bob").await;
    c.send_json(&json!({"t": "chat", "p": {"n": 1}}))
        .await
        .unwrap();
    c.send_text("not json at all").await.unwrap();
    c.send_binary(vec![0u8, 159, 146, 150]).await.unwrap();
    // The client hears about its mistakes; the application gets the messages anyway.
    for _ in 0..2 {
        assert_eq!(c.recv().await.unwrap().code(), Some("INVALID_MESSAGE"));
    }
    let ack = c
        .subscribe_with(json!({"action":"subscribe","topics":["room"],"presence":{"s":1}}))
        .await
        .unwrap();
    assert_eq!(ack.p["success"], true, "{:?}", ack.raw);
    c.close(1000, "done").await.unwrap();
    let events = events_until(&server, |evs| {
        evs.iter().any(|e| e.kind == AppEventKind::PresenceLeave)
            && kinds(evs, id).contains(&AppEventKind::Disconnect)
    })
    .await;
    // The connection's events all come from its shard, in order, its presence events (decided
    // by the topic's owner shard) between its connect and its disconnect.
    assert_eq!(
        kinds(&events, id),
        [
            AppEventKind::AuthConnect,
            AppEventKind::Msg,
            AppEventKind::Raw,
            AppEventKind::Bin,
            AppEventKind::PresenceJoin,
            AppEventKind::PresenceLeave,
            AppEventKind::Disconnect,
        ]
    );
    let by_kind = |k| events.iter().find(|e| e.kind == k).unwrap();
    let claims: Value =
        serde_json::from_slice(&by_kind(AppEventKind::AuthConnect).payload).unwrap();
    assert_eq!(
        (claims["sub"].as_str(), claims["iss"].as_str()),
        (Some("bob"), Some("tests"))
    );
    let msg: Value = serde_json::from_slice(&by_kind(AppEventKind::Msg).payload).unwrap();
    assert_eq!(msg, json!({"t": "chat", "p": {"n": 1}}));
    assert_eq!(&by_kind(AppEventKind::Raw).payload[..], b"not json at all");
    assert_eq!(
        &by_kind(AppEventKind::Bin).payload[..],
        &[0u8, 159, 146, 150]
    );
    let join: Value = serde_json::from_slice(&by_kind(AppEventKind::PresenceJoin).payload).unwrap();
    assert_eq!(
        join,
        json!({"topic": "room", "user_id": "bob", "data": {"s": 1}})
    );
    assert_eq!(by_kind(AppEventKind::PresenceJoin).conn, Some(id));
    assert_eq!(by_kind(AppEventKind::PresenceLeave).conn, Some(id));
    assert!(events.iter().all(|e| &*e.user == "bob"));
    assert!(server.stop(Duration::from_secs(2)));
}

/// Connects `user` until connections sit on both shards (the kernel and the balancer decide).
async fn spread(server: &Server, user: &str) -> Vec<(Client, ConnId)> {
    let mut conns = Vec::new();
    let mut shards = HashSet::new();
    while shards.len() < 2 {
        assert!(
            conns.len() < 40,
            "connections never spread over both shards"
        );
        let (c, id) = connect(server, user).await;
        shards.insert(id.shard());
        conns.push((c, id));
    }
    conns
}

#[tokio::test(flavor = "current_thread")]
async fn subscriptions_acls_counts_and_fan_outs_across_shards() {
    let server = server(2, |cfg| cfg.recovery.enabled = true);
    let mut carol = spread(&server, "carol").await;
    let (mut dave, dave_id) = connect(&server, "dave").await;

    // The application subscribes every carol connection; publications reach them.
    for (_, id) in &carol {
        let sub = AppSubscribe {
            topics: vec!["news".into(), "bad\u{1}".into()],
            ..Default::default()
        };
        let out = server.subscribe_connection(*id, sub).await.unwrap();
        assert_eq!(out.success_topics, ["news"]);
        assert_eq!(out.failed_topics[0].topic, "bad\u{1}");
    }
    assert_eq!(
        server.get_topic_subscriber_count("news").await.unwrap(),
        carol.len()
    );
    let msg =
        serde_json::value::RawValue::from_string(r#"{"c":"U","t":"n","p":1}"#.into()).unwrap();
    server.broadcast("news", &msg).unwrap();
    for (c, _) in &mut carol {
        let ev = c.recv_until(|e| e.t == "n", T).await.unwrap();
        assert_eq!((ev.offset, ev.topic.as_deref()), (Some(1), Some("news")));
    }

    // Recovery through the API: a second publication, then a subscribe from offset 1 replays it.
    server.broadcast_local("news", &msg).unwrap();
    let epoch = {
        let (c, _) = &mut carol[0];
        let ev = c.recv_until(|e| e.t == "n", T).await.unwrap();
        u32::from_str_radix(ev.epoch.as_deref().unwrap(), 16).unwrap()
    };
    let out = server
        .subscribe_with_recovery(dave_id, &["news".into()], Some(epoch), 1)
        .await
        .unwrap();
    assert_eq!(out.recovery[0].1.count, 1);
    let ev = dave.recv_until(|e| e.t == "n", T).await.unwrap();
    assert_eq!(ev.offset, Some(2));

    // An ACL that denies the topic drops the subscription; a later subscribe is refused.
    let dropped = server
        .set_topic_acl(dave_id, None, vec!["ne*".into()])
        .await
        .unwrap();
    assert_eq!(dropped, ["news"]);
    let out = server
        .subscribe_connection(
            dave_id,
            AppSubscribe {
                topics: vec!["news".into(), "other".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.success_topics, ["other"]);
    assert_eq!(out.failed_topics[0].reason, "FORBIDDEN");
    let left = server.unsubscribe_connection(dave_id, None).await.unwrap();
    assert_eq!(left, ["other"]);

    // Listing, counting, sending to a user on every shard, and to everyone.
    let listed = server.get_connections().await.unwrap();
    assert_eq!(listed.len(), carol.len() + 1);
    assert_eq!(server.get_connection_count(), carol.len() + 1);
    assert!(
        listed
            .iter()
            .any(|c| c.id == dave_id && c.user_id == "dave")
    );
    let n = server
        .send_user("carol", Payload::Text(r#"{"t":"to_carol"}"#.into()))
        .await
        .unwrap();
    assert_eq!(n, carol.len());
    for (c, _) in &mut carol {
        c.recv_until(|e| e.t == "to_carol", T).await.unwrap();
    }
    assert_eq!(
        server
            .send_user("nobody", Payload::Text("x".into()))
            .await
            .unwrap(),
        0
    );
    let n = server
        .broadcast_all(Payload::Text(r#"{"t":"everyone"}"#.into()))
        .await
        .unwrap();
    assert_eq!(n, carol.len() + 1);
    dave.recv_until(|e| e.t == "everyone", T).await.unwrap();

    // Drain: every connection gets the code; the server stops.
    assert!(server.is_running());
    assert!(
        server
            .drain(4300, "maintenance", Duration::from_secs(1))
            .unwrap()
    );
    assert!(!server.is_running());
    match dave.recv_until(|_| false, T).await {
        Err(Error::Closed { code, .. }) => assert_eq!(code, 4300),
        other => panic!("expected a close, got {other:?}"),
    }
    assert_eq!(
        server.send(dave_id, "x").await.unwrap_err(),
        CommandError::NotRunning
    );
    assert!(server.stop(Duration::from_secs(1)));
}

#[test]
fn drain_inbound_blocks_until_events_or_the_timeout() {
    let server = server(2, |_| {});
    let started = std::time::Instant::now();
    assert!(
        server
            .drain_inbound(10, Duration::from_millis(100))
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(100));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_c, id) = rt.block_on(connect(&server, "erin"));
    let events = server.drain_inbound(10, T);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].kind, events[0].conn),
        (AppEventKind::AuthConnect, Some(id))
    );
    assert!(server.stop(Duration::from_secs(2)));
}

#[tokio::test(flavor = "current_thread")]
async fn queue_groups_are_bounded_per_topic_and_take_no_part_in_presence() {
    use wse_shards::queue_groups::QUEUE_GROUPS_PER_TOPIC_MAX;
    let server = server(2, |cfg| {
        cfg.presence.enabled = true;
        cfg.auth.default_queue_groups = vec!["*".into()];
    });
    let join = |id: ConnId, group: String| {
        let sub = AppSubscribe {
            topics: vec!["busy".into()],
            queue_group: Some(group.into()),
            ..Default::default()
        };
        server.subscribe_connection(id, sub)
    };
    let mut conns = Vec::new();
    for i in 0..=QUEUE_GROUPS_PER_TOPIC_MAX {
        let (c, id) = connect(&server, &format!("q{i}")).await;
        let out = join(id, format!("g{i}")).await.unwrap();
        if i < QUEUE_GROUPS_PER_TOPIC_MAX {
            assert_eq!(out.success_topics, ["busy"], "{out:?}");
        } else {
            assert!(out.success_topics.is_empty(), "{out:?}");
            assert_eq!(out.failed_topics[0].reason, "QUEUE_GROUP_LIMIT");
        }
        conns.push((c, id));
    }
    // The refused member is not counted anywhere; members are not presence members.
    let subs = server.get_topic_subscribers("busy").await.unwrap();
    assert_eq!(subs.count, QUEUE_GROUPS_PER_TOPIC_MAX);
    assert_eq!(subs.queue_groups.len(), QUEUE_GROUPS_PER_TOPIC_MAX);
    assert_eq!(server.presence_stats("busy").await.unwrap(), (0, 0));

    // A group that goes frees its place.
    let (_, first) = conns[0];
    let left = server.unsubscribe_connection(first, None).await.unwrap();
    assert_eq!(left, ["busy"]);
    let (_, last) = conns[QUEUE_GROUPS_PER_TOPIC_MAX];
    let out = join(last, "late".into()).await.unwrap();
    assert_eq!(out.success_topics, ["busy"], "{out:?}");
    let subs = server.get_topic_subscribers("busy").await.unwrap();
    assert!(
        subs.queue_groups
            .iter()
            .any(|(g, n)| g == "late" && *n == 1)
    );
    assert!(!subs.queue_groups.iter().any(|(g, _)| g == "g0"));
    assert!(server.stop(Duration::from_secs(2)));
}

/// Upstream's Python behaviours the package asks of the engine: `broadcast_text` sends text that
/// is not a JSON object as it is (numbered and kept for recovery, never stamped) and stamps
/// objects; `binary_event_frames` puts JSON events in binary frames; `disconnect_without_status`
/// sends a close frame without code, which the client reports as 1005.
#[tokio::test(flavor = "current_thread")]
async fn plain_text_broadcasts_binary_events_and_a_close_without_status() {
    let server = server(2, |cfg| {
        cfg.recovery.enabled = true;
        cfg.protocol.binary_event_frames = true;
    });
    let (mut ann, ann_id) = connect(&server, "ann").await;
    let sub = AppSubscribe {
        topics: vec!["feed".into()],
        ..Default::default()
    };
    server.subscribe_connection(ann_id, sub).await.unwrap();

    server.broadcast_text("feed", "plain 1").unwrap();
    server
        .broadcast_text("feed", r#"  {"t":"obj","p":{}} "#)
        .unwrap();
    server.broadcast_text("feed", "[1,2]").unwrap();
    server.broadcast_text("feed", "{}").unwrap();
    assert_eq!(
        server.broadcast_text("feed", "{not json").unwrap_err(),
        wse_shards::PublishError::NotAnObject
    );
    // Not WSE messages: the client reports them as such and stays usable.
    assert!(matches!(ann.recv().await, Err(Error::Protocol(_))));
    let obj = ann.recv().await.unwrap();
    let e = obj.epoch.as_deref().unwrap();
    assert_eq!(
        obj.text.as_deref().unwrap(),
        format!(r#"{{"tp":"feed","e":"{e}","o":2,"t":"obj","p":{{}}}}"#)
    );
    assert!(matches!(ann.recv().await, Err(Error::Protocol(_))));
    // `{}` stamped is still JSON (no comma before the closing brace), with no `t` for the
    // client to take it as a WSE message.
    match ann.recv().await {
        Err(Error::Protocol(why)) => {
            assert!(
                why.ends_with(&format!(r#"{{"tp":"feed","e":"{e}","o":4}}"#)),
                "{why}"
            );
        }
        other => panic!("expected the stamped empty object, got {other:?}"),
    }

    // A client that saw offset 0 recovers all four, the plain ones as they were sent.
    let (mut bob, bob_id) = connect(&server, "bob").await;
    let epoch = u32::from_str_radix(obj.epoch.as_deref().unwrap(), 16).unwrap();
    let out = server
        .subscribe_with_recovery(bob_id, &["feed".into()], Some(epoch), 0)
        .await
        .unwrap();
    assert_eq!(out.recovery[0].1.count, 4);
    assert!(matches!(bob.recv().await, Err(Error::Protocol(_))));
    assert_eq!(bob.recv().await.unwrap().offset, Some(2));

    server
        .send_event(ann_id, r#"{"t":"note","p":{"x":1}}"#)
        .await
        .unwrap();
    let ev = ann.recv().await.unwrap();
    assert_eq!(
        (ev.t.as_str(), ev.binary, ev.encoding),
        ("note", true, Encoding::BinaryJson)
    );

    server.disconnect_without_status(ann_id).await.unwrap();
    match ann.recv().await {
        Err(Error::Closed { code, reason, .. }) => assert_eq!((code, reason.as_str()), (1005, "")),
        other => panic!("expected a close, got {other:?}"),
    }
    assert!(server.stop(Duration::from_secs(2)));
}
