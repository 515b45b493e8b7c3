//! The Centrifuge client protocol served by the shard (`/connection/websocket`), with the exact
//! frames each connection receives: the dialect chosen at the upgrade, connect with a token,
//! `{}` pings, subscribe acknowledged only after the topic owner's confirmation, and one topic
//! space — a publication reaches WSE and Centrifuge (JSON and protobuf) subscribers of the
//! topic alike, each in its own format, from either kind of publisher.

use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use serde_json::{Value, json};
use wse_shards::centrifuge::NamespaceConfig;
use wse_shards::centrifuge::RpcError;
use wse_shards::centrifuge::proto::Reply;
use wse_shards::centrifuge::session::RPC_PENDING_MAX;
use wse_shards::codec::OpCode;
use wse_shards::command::{Command, CommandError};
use wse_shards::metrics::DropReason;
use wse_shards::protocol::SERVER_VERSION;
use wse_shards::{AppEventKind, Config, ConnId};

use crate::harness::{Client, Engine, Frame, SECRET, WALL_START_MS, config, topic_owned_by};

/// A configuration with the `room` namespace open to clients (subscribe and publish).
fn centrifuge_config(shards: usize) -> Config {
    let mut cfg = config(shards);
    cfg.centrifuge.namespaces = vec![NamespaceConfig {
        name: "room".into(),
        allow_subscribe_for_client: true,
        allow_publish_for_client: true,
        ..Default::default()
    }];
    cfg.validate().unwrap();
    cfg
}

/// A connection token for `user` that expires an hour after the virtual wall clock's start
/// (still in the future for the verifier, which reads the real clock).
fn connection_token(user: &str) -> String {
    connection_token_with(user, json!({}))
}

/// As [`connection_token`], with `extra` claims added.
fn connection_token_with(user: &str, extra: Value) -> String {
    let mut claims = json!({"sub": user, "exp": WALL_START_MS / 1000 + 3600});
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Upgrades a socket on `shard` to the Centrifuge endpoint, offering `protocol`.
fn upgrade(e: &mut Engine, shard: usize, protocol: Option<&str>) -> Client {
    let c = e.accept(shard);
    let offer = protocol.map_or(String::new(), |p| {
        format!("Sec-WebSocket-Protocol: {p}\r\n")
    });
    let request = format!(
        "GET /connection/websocket HTTP/1.1\r\nHost: harness\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    e.send_raw(c, request.as_bytes());
    e.settle();
    c
}

/// A JSON Centrifuge connection on `shard`, connected as `user`; returns it and its client id.
fn connect_json(e: &mut Engine, shard: usize, user: &str) -> (Client, String) {
    connect_json_token(e, shard, &connection_token(user))
}

/// As [`connect_json`], with this connection token.
fn connect_json_token(e: &mut Engine, shard: usize, token: &str) -> (Client, String) {
    let c = upgrade(e, shard, None);
    let response = e.upgrade_response(c).unwrap().to_owned();
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    assert!(!response.contains("Sec-WebSocket-Protocol"), "{response}");
    let connect = json!({"id": 1, "connect": {"token": token}});
    e.send(c, &connect.to_string());
    e.settle();
    let frames = e.recv(c);
    assert_eq!(frames.len(), 1, "{frames:?}");
    let client = frames[0].json()["connect"]["client"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(client.len(), 16, "the connection id is the client id");
    assert_eq!(
        frames[0].text(),
        format!(
            "{{\"id\":1,\"connect\":{{\"client\":\"{client}\",\"version\":\"{SERVER_VERSION}\",\
             \"expires\":true,\"ttl\":3600,\"ping\":25,\"pong\":true}}}}"
        )
    );
    (c, client)
}

/// A WSE connection on `shard` subscribed to `topic`, its frames so far taken.
fn wse_subscriber(e: &mut Engine, shard: usize, user: &str, topic: &str) -> Client {
    let w = e.connect(shard, user);
    e.send_json(
        w,
        &json!({"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":[topic]}}),
    );
    e.settle();
    let frames = e.recv(w);
    assert_eq!(
        frames.len(),
        2,
        "server_ready and the acknowledgement: {frames:?}"
    );
    assert_eq!(frames[1].json()["p"]["success_topics"], json!([topic]));
    w
}

#[test]
fn a_publication_reaches_wse_and_centrifuge_subscribers_each_in_its_format() {
    let mut e = Engine::new(centrifuge_config(3));
    // The topic lives on shard 0; the subscribers on the two others, so every hop crosses the
    // fabric (interest, confirmation, delivery).
    let topic = topic_owned_by("room:main", 0, 3);
    let (cf, _) = connect_json(&mut e, 1, "alice");
    let w = wse_subscriber(&mut e, 2, "bob", &topic);

    // The subscribe is answered only once the owner confirmed the shard's interest.
    e.send(
        cf,
        &json!({"id": 2, "subscribe": {"channel": topic}}).to_string(),
    );
    e.turn(1);
    assert_eq!(
        e.recv(cf),
        [],
        "acknowledged before the owner's confirmation"
    );
    e.settle();
    assert_eq!(
        e.recv(cf),
        [Frame::Text(r#"{"id":2,"subscribe":{}}"#.into())]
    );

    // A WSE publication: WSE frame to the WSE subscriber, a Centrifuge push to the other.
    e.send_json(
        w,
        &json!({"c":"WSE","t":"publish","p":{"topic":topic,"event":"chat","data":{"n":1}}}),
    );
    e.settle();
    assert_eq!(
        e.recv(w),
        [Frame::Text(
            r#"{"c":"U","t":"chat","p":{"n":1},"v":1}"#.into()
        )]
    );
    assert_eq!(
        e.recv(cf),
        [Frame::Text(format!(
            r#"{{"push":{{"channel":"{topic}","pub":{{"data":{{"n":1}}}}}}}}"#
        ))]
    );

    // A Centrifuge publication: replied once the owner sequenced it, delivered to both
    // (the publisher too, being subscribed), as the `publication` event for WSE clients.
    e.send(
        cf,
        &json!({"id": 3, "publish": {"channel": topic, "data": {"n": 2}}}).to_string(),
    );
    e.settle();
    assert_eq!(
        e.recv(w),
        [Frame::Text(
            r#"{"c":"U","t":"publication","p":{"n":2},"v":1}"#.into()
        )]
    );
    // The push arrived while the reply waited for the owner: it goes out behind the reply
    // (replies and pushes leave in the order the session queued them).
    assert_eq!(
        e.recv(cf),
        [
            Frame::Text(r#"{"id":3,"publish":{}}"#.into()),
            Frame::Text(format!(
                r#"{{"push":{{"channel":"{topic}","pub":{{"data":{{"n":2}}}}}}}}"#
            )),
        ]
    );

    // Unsubscribed: nothing more arrives.
    e.send(
        cf,
        &json!({"id": 4, "unsubscribe": {"channel": topic}}).to_string(),
    );
    e.settle();
    assert_eq!(
        e.recv(cf),
        [Frame::Text(r#"{"id":4,"unsubscribe":{}}"#.into())]
    );
    e.send_json(
        w,
        &json!({"c":"WSE","t":"publish","p":{"topic":topic,"event":"chat","data":{"n":3}}}),
    );
    e.settle();
    assert_eq!(e.recv(w).len(), 1);
    assert_eq!(e.recv(cf), []);
}

#[test]
fn protobuf_subscribers_get_binary_pushes() {
    let mut e = Engine::new(centrifuge_config(2));
    let topic = topic_owned_by("room:p", 1, 2);
    let c = upgrade(&mut e, 0, Some("centrifuge-protobuf"));
    let response = e.upgrade_response(c).unwrap().to_owned();
    assert!(
        response.contains("\r\nSec-WebSocket-Protocol: centrifuge-protobuf"),
        "{response}"
    );
    // Command{id 1, connect (4): ConnectRequest{token (1)}}, varint-delimited; then a
    // subscribe (6): SubscribeRequest{channel (1)}.
    let token = connection_token("carol");
    let mut connect = vec![0x0a, token.len() as u8];
    connect.extend_from_slice(token.as_bytes());
    let mut cmd = vec![0x08, 0x01, 0x22, connect.len() as u8];
    cmd.extend_from_slice(&connect);
    let mut sub = vec![0x0a, topic.len() as u8];
    sub.extend_from_slice(topic.as_bytes());
    let mut cmd2 = vec![0x08, 0x02, 0x2a, sub.len() as u8];
    cmd2.extend_from_slice(&sub);
    let mut message = Vec::new();
    for c in [cmd, cmd2] {
        prost::encoding::encode_varint(c.len() as u64, &mut message);
        message.extend_from_slice(&c);
    }
    e.send_frame(c, OpCode::Binary, &message);
    e.settle();
    let frames = e.recv(c);
    assert_eq!(frames.len(), 2, "{frames:?}");
    let decode = |f: &Frame| match f {
        Frame::Binary(b) => Reply::decode_length_delimited(&b[..]).unwrap(),
        other => panic!("not binary: {other:?}"),
    };
    let connected = decode(&frames[0]);
    assert_eq!(connected.id, 1);
    assert!(connected.connect.unwrap().pong);
    let subscribed = decode(&frames[1]);
    assert_eq!((subscribed.id, subscribed.subscribe.is_some()), (2, true));

    let w = e.connect(0, "dave");
    e.recv(w);
    e.send_json(
        w,
        &json!({"c":"WSE","t":"publish","p":{"topic":topic,"event":"chat","data":{"n":1}}}),
    );
    e.settle();
    let frames = e.recv(c);
    assert_eq!(frames.len(), 1, "{frames:?}");
    let push = decode(&frames[0]).push.unwrap();
    assert_eq!(push.channel, topic);
    assert_eq!(&push.publication.unwrap().data[..], br#"{"n":1}"#);
}

#[test]
fn pings_go_out_on_schedule_and_a_missed_pong_closes_with_3012() {
    let mut e = Engine::new(centrifuge_config(1));
    let (c, _) = connect_json(&mut e, 0, "alice");
    e.advance(Duration::from_secs(25));
    assert_eq!(e.recv(c), [Frame::Text("{}".into())]);
    e.send(c, "{}");
    e.advance(Duration::from_secs(25));
    assert_eq!(e.recv(c), [Frame::Text("{}".into())]);
    // No pong this time: closed with Centrifuge's code, a plain-word reason.
    e.advance(Duration::from_secs(8));
    assert_eq!(e.recv(c), [Frame::Close(Some((3012, "no pong".into())))]);
}

#[test]
fn a_bad_token_closes_with_3500_and_a_wse_token_path_still_speaks_wse() {
    let mut e = Engine::new(centrifuge_config(1));
    let c = upgrade(&mut e, 0, None);
    e.send(c, r#"{"id":1,"connect":{"token":"not.a.jwt"}}"#);
    e.settle();
    assert_eq!(
        e.recv(c),
        [Frame::Close(Some((3500, "invalid token".into())))]
    );
    // Any other path is the WSE protocol, as before.
    let w = e.connect(0, "bob");
    assert_eq!(e.recv(w)[0].t().as_deref(), Some("server_ready"));
}

/// [`centrifuge_config`] with recovery on and a history in the `room` namespace.
fn history_config(shards: usize) -> Config {
    let mut cfg = centrifuge_config(shards);
    cfg.recovery.enabled = true;
    cfg.centrifuge.namespaces[0].history_size = 10;
    cfg.centrifuge.namespaces[0].history_ttl = Duration::from_secs(300);
    cfg.centrifuge.namespaces[0].allow_history_for_client = true;
    // A namespace whose streams keep only 3 publications (the ring holds more).
    cfg.centrifuge.namespaces.push(NamespaceConfig {
        name: "small".into(),
        history_size: 3,
        history_ttl: Duration::from_secs(300),
        allow_subscribe_for_client: true,
        allow_history_for_client: true,
        ..Default::default()
    });
    cfg.validate().unwrap();
    cfg
}

fn wse_publish(e: &mut Engine, w: Client, topic: &str, n: u64) {
    e.send_json(
        w,
        &json!({"c":"WSE","t":"publish","p":{"topic":topic,"event":"chat","data":{"n":n}}}),
    );
    e.settle();
}

#[test]
fn a_recoverable_subscription_is_positioned_and_recovers_what_it_missed_from_the_ring() {
    let mut e = Engine::new(history_config(2));
    let topic = topic_owned_by("room:h", 1, 2);
    let w = e.connect(0, "bob");
    e.recv(w);
    let (cf, _) = connect_json(&mut e, 0, "alice");
    e.send(
        cf,
        &json!({"id": 2, "subscribe": {"channel": topic, "recoverable": true}}).to_string(),
    );
    e.settle();
    // The stream's position comes from the owner's ring: epoch, offset 0 (nothing yet).
    let reply = e.recv(cf)[0].json();
    let epoch = reply["subscribe"]["epoch"].as_str().unwrap().to_owned();
    assert_eq!(epoch.len(), 8);
    assert_eq!(
        reply,
        json!({"id": 2, "subscribe": {"recoverable": true, "positioned": true, "epoch": epoch}})
    );
    wse_publish(&mut e, w, &topic, 1);
    assert_eq!(
        e.recv(cf),
        [Frame::Text(format!(
            r#"{{"push":{{"channel":"{topic}","pub":{{"data":{{"n":1}},"offset":1}}}}}}"#
        ))]
    );

    // Away while two more are published; back, it recovers exactly those, in the reply.
    e.disconnect(cf);
    e.settle();
    wse_publish(&mut e, w, &topic, 2);
    wse_publish(&mut e, w, &topic, 3);
    let (back, _) = connect_json(&mut e, 0, "alice");
    let recover = json!({"id": 2, "subscribe": {
        "channel": topic, "recoverable": true, "recover": true, "epoch": epoch, "offset": 1}});
    e.send(back, &recover.to_string());
    e.settle();
    assert_eq!(
        e.recv(back)[0].json(),
        json!({"id": 2, "subscribe": {
            "recoverable": true, "positioned": true, "epoch": epoch, "offset": 1,
            "was_recovering": true, "recovered": true,
            "publications": [{"data": {"n": 2}, "offset": 2}, {"data": {"n": 3}, "offset": 3}]}})
    );
    wse_publish(&mut e, w, &topic, 4);
    assert_eq!(e.recv(back).len(), 1, "live again, once");

    // A position from another epoch is not recovered.
    let (other, _) = connect_json(&mut e, 0, "alice");
    let stale = json!({"id": 2, "subscribe": {
        "channel": topic, "recoverable": true, "recover": true, "epoch": "00000bad", "offset": 1}});
    e.send(other, &stale.to_string());
    e.settle();
    let reply = e.recv(other)[0].json();
    assert_eq!(reply["subscribe"]["was_recovering"], json!(true));
    assert_eq!(
        reply["subscribe"]["recovered"],
        Value::Null,
        "false is omitted"
    );
    assert_eq!(
        reply["subscribe"]["offset"],
        json!(4),
        "positioned at the top"
    );
}

#[test]
fn history_reads_the_owners_ring_with_limit_since_and_reverse() {
    let mut e = Engine::new(history_config(2));
    let topic = topic_owned_by("room:r", 1, 2);
    let w = e.connect(0, "bob");
    e.recv(w);
    for n in 1..=5 {
        wse_publish(&mut e, w, &topic, n);
    }
    let (cf, _) = connect_json(&mut e, 0, "alice");
    let history = |e: &mut Engine, id: u32, request: Value| -> Value {
        let mut command = json!({"id": id, "history": request});
        command["history"]["channel"] = json!(topic);
        e.send(cf, &command.to_string());
        e.settle();
        let frames = e.recv(cf);
        assert_eq!(frames.len(), 1, "{frames:?}");
        frames[0].json()
    };
    let pubs = |ns: &[u64]| -> Value {
        ns.iter()
            .map(|n| json!({"data": {"n": n}, "offset": n}))
            .collect()
    };
    let all = history(&mut e, 3, json!({"limit": -1}));
    let epoch = all["history"]["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        all,
        json!({"id": 3, "history": {"publications": pubs(&[1, 2, 3, 4, 5]), "epoch": epoch, "offset": 5}})
    );
    assert_eq!(
        history(&mut e, 4, json!({"limit": 2}))["history"]["publications"],
        pubs(&[1, 2])
    );
    assert_eq!(
        history(&mut e, 5, json!({"limit": 2, "reverse": true}))["history"]["publications"],
        pubs(&[5, 4])
    );
    assert_eq!(
        history(
            &mut e,
            6,
            json!({"limit": -1, "since": {"offset": 3, "epoch": epoch}})
        )["history"]["publications"],
        pubs(&[4, 5])
    );
    // Limit 0: only the stream's top.
    assert_eq!(
        history(&mut e, 7, json!({"limit": 0})),
        json!({"id": 7, "history": {"epoch": epoch, "offset": 5}})
    );
    // A position in another epoch: 112.
    assert_eq!(
        history(
            &mut e,
            8,
            json!({"limit": -1, "since": {"offset": 3, "epoch": "00000bad"}})
        ),
        json!({"id": 8, "error": {"code": 112, "message": "unrecoverable position"}})
    );
}

#[test]
fn past_the_rate_limit_a_centrifuge_connection_is_closed_with_3013() {
    let mut cfg = centrifuge_config(1);
    cfg.protocol.rate_limit_capacity = 3;
    cfg.protocol.rate_limit_refill = 1;
    let mut e = Engine::new(cfg);
    let (c, _) = connect_json(&mut e, 0, "alice");
    // The connect took one token; two more commands pass, the third message is over.
    for id in 2..=3 {
        e.send(c, &json!({"id": id, "ping": {}}).to_string());
    }
    e.settle();
    assert_eq!(e.recv(c).len(), 2);
    e.send(c, &json!({"id": 4, "ping": {}}).to_string());
    e.settle();
    assert_eq!(
        e.recv(c),
        [Frame::Close(Some((3013, "too many requests".into())))]
    );
}

/// A Centrifuge subscriber that stops reading is closed with Centrifuge's 3008 after an
/// in-order prefix, as a WSE one is with 4413.
#[test]
fn a_slow_centrifuge_consumer_is_closed_with_3008() {
    let mut cfg = centrifuge_config(2);
    cfg.limits.max_outbound_queue_bytes = 64 * 1024;
    let mut e = Engine::new(cfg);
    let topic = topic_owned_by("room:fire", 1, 2);
    let (slow, _) = connect_json(&mut e, 0, "slow");
    e.send(
        slow,
        &json!({"id": 2, "subscribe": {"channel": topic}}).to_string(),
    );
    e.settle();
    assert_eq!(e.recv(slow).len(), 1);
    let publisher = e.connect(1, "pub");
    e.recv(publisher);
    e.set_socket_capacity(slow, 16 * 1024);
    e.set_reading(slow, false);
    let pad = "x".repeat(4096);
    for seq in 0..100u64 {
        e.send_json(
            publisher,
            &json!({"c":"WSE","t":"publish","p":{"topic":topic,"event":"m","data":{"seq":seq,"pad":pad}}}),
        );
        e.settle();
    }
    e.set_reading(slow, true);
    e.settle();
    let frames = e.recv(slow);
    let (close, data) = frames.split_last().unwrap();
    assert_eq!(close, &Frame::Close(Some((3008, "slow".into()))));
    let seqs: Vec<u64> = data
        .iter()
        .map(|f| f.json()["push"]["pub"]["data"]["seq"].as_u64().unwrap())
        .collect();
    assert!(!seqs.is_empty() && seqs.len() < 100, "{}", seqs.len());
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(e.metrics(0).closes(3008).get(), 1);
}

#[test]
fn a_namespaces_history_size_bounds_history_and_recovery() {
    let mut e = Engine::new(history_config(2));
    let topic = topic_owned_by("small:s", 1, 2);
    let w = e.connect(0, "bob");
    e.recv(w);
    for n in 1..=5 {
        wse_publish(&mut e, w, &topic, n);
    }
    let (cf, _) = connect_json(&mut e, 0, "alice");
    let ask = |e: &mut Engine, command: Value| -> Value {
        e.send(cf, &command.to_string());
        e.settle();
        let frames = e.recv(cf);
        assert_eq!(frames.len(), 1, "{frames:?}");
        frames[0].json()
    };
    let all = ask(
        &mut e,
        json!({"id": 2, "history": {"channel": topic, "limit": -1}}),
    );
    let offsets: Vec<u64> = all["history"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [3, 4, 5], "{all}");
    let epoch = all["history"]["epoch"].as_str().unwrap().to_owned();
    let since_1 = json!({"id": 3, "history": {"channel": topic, "limit": -1,
                         "since": {"offset": 1, "epoch": epoch}}});
    assert_eq!(ask(&mut e, since_1)["error"]["code"], json!(112));
    // Four missed is more than the stream keeps: not recovered; two is fine.
    let recover = |id: u32, offset: u64| {
        json!({"id": id, "subscribe": {"channel": topic, "recoverable": true, "recover": true,
               "epoch": epoch, "offset": offset}})
    };
    let reply = ask(&mut e, recover(4, 1));
    assert_eq!(reply["subscribe"]["was_recovering"], json!(true));
    assert_eq!(reply["subscribe"]["recovered"], Value::Null, "{reply}");
    let (other, _) = connect_json(&mut e, 0, "alice");
    e.send(other, &recover(2, 3).to_string());
    e.settle();
    let reply = e.recv(other)[0].json();
    assert_eq!(reply["subscribe"]["recovered"], json!(true), "{reply}");
    assert_eq!(
        reply["subscribe"]["publications"].as_array().unwrap().len(),
        2
    );
}

/// A publication the fabric drops (its sender's bytes in flight are over budget) is never
/// sequenced: the Centrifuge publisher gets error 100 for it instead of a reply that never
/// comes.
#[test]
fn a_publication_the_fabric_drops_is_answered_with_error_100() {
    let mut cfg = centrifuge_config(2);
    // At least twice the largest message, the configuration's floor; an eighth goes to ring
    // slots, the rest bounds the bytes in flight.
    cfg.limits.max_message_size = 128 * 1024;
    cfg.limits.fabric_memory_per_shard = 256 * 1024;
    let mut e = Engine::new(cfg);
    let topic = topic_owned_by("room:big", 1, 2);
    let (c, _) = connect_json(&mut e, 0, "alice");
    let pad = "x".repeat(100 * 1024);
    // Three in one go, before the owner has taken anything: the third finds the budget spent.
    for id in [2, 3, 4] {
        e.send(
            c,
            &json!({"id": id, "publish": {"channel": topic, "data": {"pad": pad}}}).to_string(),
        );
    }
    e.settle();
    assert_eq!(
        e.recv(c),
        [
            Frame::Text(r#"{"id":2,"publish":{}}"#.into()),
            Frame::Text(r#"{"id":3,"publish":{}}"#.into()),
            Frame::Text(
                r#"{"id":4,"error":{"code":100,"message":"internal server error","temporary":true}}"#
                    .into()
            ),
        ]
    );
    assert_eq!(e.metrics(0).dropped(DropReason::FabricOverflow).get(), 1);
}

/// `room` with presence open to clients, and `quiet` without presence.
fn presence_config(shards: usize, presence_enabled: bool) -> Config {
    let mut cfg = centrifuge_config(shards);
    cfg.presence.enabled = presence_enabled;
    cfg.centrifuge.namespaces[0].presence = true;
    cfg.centrifuge.namespaces[0].allow_presence_for_client = true;
    cfg.centrifuge.namespaces.push(NamespaceConfig {
        name: "quiet".into(),
        allow_subscribe_for_client: true,
        allow_presence_for_client: true,
        ..Default::default()
    });
    cfg.validate().unwrap();
    cfg
}

/// Sends one command on `c` and returns its single reply, as text.
fn ask(e: &mut Engine, c: Client, command: Value) -> String {
    e.send(c, &command.to_string());
    e.settle();
    let frames = e.recv(c);
    assert_eq!(frames.len(), 1, "{frames:?}");
    frames[0].text().to_owned()
}

#[test]
fn presence_lists_each_members_connection_across_shards() {
    let mut e = Engine::new(presence_config(3, true));
    let topic = topic_owned_by("room:p", 0, 3);
    let (asker, _) = connect_json(&mut e, 1, "carol");
    let presence = |e: &mut Engine, id: u32| -> Value {
        let reply = ask(e, asker, json!({"id": id, "presence": {"channel": topic}}));
        serde_json::from_str(&reply).unwrap()
    };
    assert_eq!(
        presence(&mut e, 2),
        json!({"id": 2, "presence": {"presence": {}}})
    );
    // Alice twice, once with connection info (shards 1 and 2); Bob as a WSE subscriber.
    let token = connection_token_with("alice", json!({"info": {"name": "Alice"}}));
    let (a1, a1_id) = connect_json_token(&mut e, 1, &token);
    let (a2, a2_id) = connect_json(&mut e, 2, "alice");
    for c in [a1, a2] {
        assert_eq!(
            ask(&mut e, c, json!({"id": 2, "subscribe": {"channel": topic}})),
            r#"{"id":2,"subscribe":{}}"#
        );
    }
    let w = e.connect(2, "bob");
    e.send_json(
        w,
        &json!({"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":[topic]}}),
    );
    e.settle();
    let wse_id = e.recv(w)[0].json()["p"]["details"]["connection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        presence(&mut e, 3),
        json!({"id": 3, "presence": {"presence": {
            a1_id.clone(): {"user": "alice", "client": a1_id, "conn_info": {"name": "Alice"}},
            a2_id.clone(): {"user": "alice", "client": a2_id},
            wse_id.clone(): {"user": "bob", "client": wse_id},
        }}})
    );
    // Leaving, by unsubscribe and by a closed connection.
    assert_eq!(
        ask(
            &mut e,
            a1,
            json!({"id": 3, "unsubscribe": {"channel": topic}})
        ),
        r#"{"id":3,"unsubscribe":{}}"#
    );
    e.disconnect(w);
    e.settle();
    assert_eq!(
        presence(&mut e, 4),
        json!({"id": 4, "presence": {"presence": {a2_id.clone(): {"user": "alice", "client": a2_id}}}})
    );
}

#[test]
fn presence_stats_counts_the_owners_members_across_shards() {
    let mut e = Engine::new(presence_config(3, true));
    // The topic lives on shard 0; its members and the asker elsewhere, so the request and the
    // answer cross the fabric.
    let topic = topic_owned_by("room:p", 0, 3);
    let stats = |e: &mut Engine, c: Client, id: u32| {
        ask(
            e,
            c,
            json!({"id": id, "presence_stats": {"channel": topic}}),
        )
    };
    let (asker, _) = connect_json(&mut e, 1, "carol");
    assert_eq!(
        stats(&mut e, asker, 2),
        r#"{"id":2,"presence_stats":{}}"#,
        "no member yet (zero counts are left out, as Centrifugo's JSON does)"
    );
    // Alice twice (shards 1 and 2), Bob once (shard 2).
    let mut members = Vec::new();
    for (shard, user) in [(1, "alice"), (2, "alice"), (2, "bob")] {
        let (c, _) = connect_json(&mut e, shard, user);
        assert_eq!(
            ask(&mut e, c, json!({"id": 2, "subscribe": {"channel": topic}})),
            r#"{"id":2,"subscribe":{}}"#
        );
        members.push(c);
    }
    assert_eq!(
        stats(&mut e, asker, 3),
        r#"{"id":3,"presence_stats":{"num_clients":3,"num_users":2}}"#
    );
    // An unsubscribe and a closed connection leave.
    assert_eq!(
        ask(
            &mut e,
            members[1],
            json!({"id": 3, "unsubscribe": {"channel": topic}})
        ),
        r#"{"id":3,"unsubscribe":{}}"#
    );
    e.disconnect(members[2]);
    e.settle();
    assert_eq!(
        stats(&mut e, asker, 4),
        r#"{"id":4,"presence_stats":{"num_clients":1,"num_users":1}}"#
    );
    // A namespace without presence: 108, as in Centrifugo.
    let quiet = topic_owned_by("quiet:p", 0, 3);
    assert_eq!(
        ask(
            &mut e,
            asker,
            json!({"id": 5, "presence_stats": {"channel": quiet}})
        ),
        r#"{"id":5,"error":{"code":108,"message":"not available"}}"#
    );
}

#[test]
fn without_presence_enabled_presence_stats_is_not_available() {
    let mut e = Engine::new(presence_config(2, false));
    let topic = topic_owned_by("room:p", 1, 2);
    let (c, _) = connect_json(&mut e, 0, "alice");
    assert_eq!(
        ask(&mut e, c, json!({"id": 2, "subscribe": {"channel": topic}})),
        r#"{"id":2,"subscribe":{}}"#
    );
    assert_eq!(
        ask(
            &mut e,
            c,
            json!({"id": 3, "presence_stats": {"channel": topic}})
        ),
        r#"{"id":3,"error":{"code":108,"message":"not available"}}"#
    );
}

#[test]
fn a_presence_stats_request_the_fabric_drops_is_answered_with_error_100() {
    let mut cfg = presence_config(2, true);
    // As in the publication's test above: a small fabric budget, spent by publications.
    cfg.limits.max_message_size = 128 * 1024;
    cfg.limits.fabric_memory_per_shard = 256 * 1024;
    let mut e = Engine::new(cfg);
    let small = topic_owned_by("room:s", 1, 2);
    // The request's charge grows with its channel's name: 200 bytes, more than the room any
    // publication to `small` below leaves unspent.
    let long = topic_owned_by(&format!("room:{}", "l".repeat(190)), 1, 2);
    let (c, _) = connect_json(&mut e, 0, "alice");
    // Publications of halving size, all before the owner takes anything: whatever each leaves
    // of the budget, the next smaller one fills, down to a 1-byte pad.
    let pads: Vec<usize> = [100 * 1024, 100 * 1024]
        .into_iter()
        .chain((0..=14).rev().map(|p| 1 << p))
        .collect();
    for (id, pad) in (2..).zip(&pads) {
        e.send(
            c,
            &json!({"id": id, "publish": {"channel": small, "data": {"pad": "x".repeat(*pad)}}})
                .to_string(),
        );
    }
    let id = 2 + pads.len();
    e.send(
        c,
        &json!({"id": id, "presence_stats": {"channel": long}}).to_string(),
    );
    e.settle();
    let replies = e.recv(c);
    assert_eq!(replies.len(), pads.len() + 1, "{replies:?}");
    assert_eq!(
        replies.last().unwrap().text(),
        format!(
            r#"{{"id":{id},"error":{{"code":100,"message":"internal server error","temporary":true}}}}"#
        )
    );
    // Once the fabric has room again, the same request is answered.
    e.send(
        c,
        &json!({"id": id + 1, "presence_stats": {"channel": long}}).to_string(),
    );
    e.settle();
    assert_eq!(
        e.recv(c),
        [Frame::Text(format!(
            r#"{{"id":{},"presence_stats":{{}}}}"#,
            id + 1
        ))]
    );
}

#[test]
fn join_and_leave_pushes_reach_the_subscribers_that_asked_for_them() {
    let mut cfg = presence_config(3, true);
    cfg.centrifuge.namespaces[0].join_leave = true;
    cfg.validate().unwrap();
    let mut e = Engine::new(cfg);
    let topic = topic_owned_by("room:j", 0, 3);
    let push = |joined: bool, info: &str| {
        let kind = if joined { "join" } else { "leave" };
        Frame::Text(format!(
            r#"{{"push":{{"channel":"{topic}","{kind}":{{"info":{info}}}}}}}"#
        ))
    };
    // Alice asks for join/leave pushes: her own join comes right after her subscribe's reply.
    let token = connection_token_with("alice", json!({"info": {"name": "Alice"}}));
    let (a, a_id) = connect_json_token(&mut e, 1, &token);
    e.send(
        a,
        &json!({"id": 2, "subscribe": {"channel": topic, "join_leave": true}}).to_string(),
    );
    e.settle();
    let alice = format!(r#"{{"user":"alice","client":"{a_id}","conn_info":{{"name":"Alice"}}}}"#);
    assert_eq!(
        e.recv(a),
        [
            Frame::Text(r#"{"id":2,"subscribe":{}}"#.into()),
            push(true, &alice)
        ]
    );
    // Bob (no join/leave asked) on another shard: Alice hears him join and leave; he hears
    // nothing but his reply.
    let (b, b_id) = connect_json(&mut e, 2, "bob");
    assert_eq!(
        ask(&mut e, b, json!({"id": 2, "subscribe": {"channel": topic}})),
        r#"{"id":2,"subscribe":{}}"#
    );
    let bob = format!(r#"{{"user":"bob","client":"{b_id}"}}"#);
    assert_eq!(e.recv(a), [push(true, &bob)]);
    assert_eq!(
        ask(
            &mut e,
            b,
            json!({"id": 3, "unsubscribe": {"channel": topic}})
        ),
        r#"{"id":3,"unsubscribe":{}}"#
    );
    assert_eq!(e.recv(a), [push(false, &bob)]);
    // A WSE subscriber is a member too, and its connection closing is a leave.
    let w = e.connect(2, "carol");
    e.send_json(
        w,
        &json!({"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":[topic]}}),
    );
    e.settle();
    let w_id = e.recv(w)[0].json()["p"]["details"]["connection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let carol = format!(r#"{{"user":"carol","client":"{w_id}"}}"#);
    assert_eq!(e.recv(a), [push(true, &carol)]);
    e.disconnect(w);
    e.settle();
    assert_eq!(e.recv(a), [push(false, &carol)]);
}

/// The backend's reply to `c`'s rpc number `request` through the control plane's command.
fn rpc_reply(
    e: &mut Engine,
    client: &str,
    request: u64,
    result: Result<&str, (u32, &str)>,
) -> Result<(), CommandError> {
    let conn = ConnId::parse(client).unwrap();
    let result = result
        .map(|data| Bytes::from(data.to_owned()))
        .map_err(|(code, message)| RpcError {
            code,
            message: message.to_owned(),
        });
    e.command(0, |reply| Command::RpcReply {
        conn,
        request,
        result,
        reply,
    })
}

/// The last application event of shard 0, as the event stream sends it.
fn last_event(e: &Engine) -> Value {
    serde_json::from_str(&e.shard(0).app_events().back().unwrap().to_json()).unwrap()
}

#[test]
fn an_rpc_goes_to_the_backend_as_an_event_and_its_reply_to_the_client() {
    let mut e = Engine::new(centrifuge_config(1));
    let (c, client) = connect_json(&mut e, 0, "alice");
    // No application reads the events: Centrifugo's answer without an RPC proxy.
    e.send(c, r#"{"id":2,"rpc":{"method":"sum","data":{"a":1}}}"#);
    e.settle();
    let frames: Vec<String> = e.recv(c).iter().map(|f| f.text().to_owned()).collect();
    assert_eq!(
        frames,
        [r#"{"id":2,"error":{"code":108,"message":"not available"}}"#]
    );

    e.set_rpc_handler(true);
    e.send(c, r#"{"id":3,"rpc":{"method":"sum","data":{"a":1,"b":2}}}"#);
    e.settle();
    assert!(e.recv(c).is_empty(), "the reply waits for the backend");
    let event = last_event(&e);
    assert_eq!(
        event,
        json!({"type": "rpc", "shard": 0, "connection_id": client, "user_id": "alice",
            "payload": {"request": event["payload"]["request"], "method": "sum",
                "data": {"a": 1, "b": 2}}})
    );
    let request = event["payload"]["request"].as_u64().unwrap();
    // A reply for a call that does not wait is the backend's error, not the client's.
    assert_eq!(
        rpc_reply(&mut e, &client, request + 100, Ok("{}")),
        Err(CommandError::UnknownRequest)
    );
    assert_eq!(
        rpc_reply(&mut e, &client, request, Ok(r#"{"sum":3}"#)),
        Ok(())
    );
    let frames: Vec<String> = e.recv(c).iter().map(|f| f.text().to_owned()).collect();
    assert_eq!(frames, [r#"{"id":3,"rpc":{"data":{"sum":3}}}"#]);
    assert_eq!(
        rpc_reply(&mut e, &client, request, Ok("{}")),
        Err(CommandError::UnknownRequest),
        "answered once"
    );

    // The backend's error reaches the client as it is; a call without data has `null`.
    e.send(c, r#"{"id":4,"rpc":{"method":"fail"}}"#);
    e.settle();
    let event = last_event(&e);
    assert_eq!(event["payload"]["method"], "fail");
    assert_eq!(event["payload"]["data"], Value::Null);
    let request = event["payload"]["request"].as_u64().unwrap();
    assert_eq!(
        rpc_reply(&mut e, &client, request, Err((1001, "no such thing"))),
        Ok(())
    );
    let frames: Vec<String> = e.recv(c).iter().map(|f| f.text().to_owned()).collect();
    assert_eq!(
        frames,
        [r#"{"id":4,"error":{"code":1001,"message":"no such thing"}}"#]
    );
}

#[test]
fn an_rpc_the_backend_does_not_answer_in_time_gets_error_100() {
    let mut e = Engine::new(centrifuge_config(1));
    e.set_rpc_handler(true);
    let (c, client) = connect_json(&mut e, 0, "alice");
    e.send(c, r#"{"id":2,"rpc":{"method":"slow","data":{}}}"#);
    e.settle();
    let request = last_event(&e)["payload"]["request"].as_u64().unwrap();
    // Other replies are not held back behind the waiting call.
    e.send(c, r#"{"id":3,"ping":{}}"#);
    e.settle();
    let frames: Vec<String> = e.recv(c).iter().map(|f| f.text().to_owned()).collect();
    assert_eq!(frames, [r#"{"id":3,"ping":{}}"#]);
    let timeout = centrifuge_config(1).centrifuge.rpc_timeout;
    e.advance(timeout - Duration::from_millis(100));
    assert!(e.recv(c).is_empty(), "not yet");
    e.advance(Duration::from_millis(200));
    let frames: Vec<String> = e.recv(c).iter().map(|f| f.text().to_owned()).collect();
    assert_eq!(
        frames,
        [r#"{"id":2,"error":{"code":100,"message":"internal server error","temporary":true}}"#]
    );
    assert_eq!(
        rpc_reply(&mut e, &client, request, Ok("{}")),
        Err(CommandError::UnknownRequest),
        "too late"
    );
    assert!(e.recv(c).is_empty());
}

#[test]
fn past_rpc_pending_max_an_rpc_gets_error_106() {
    let mut e = Engine::new(centrifuge_config(1));
    e.set_rpc_handler(true);
    let (c, client) = connect_json(&mut e, 0, "alice");
    let commands: Vec<String> = (0..=RPC_PENDING_MAX as u32)
        .map(|i| format!(r#"{{"id":{},"rpc":{{"method":"m"}}}}"#, i + 2))
        .collect();
    e.send(c, &commands.join("\n"));
    e.settle();
    let over = RPC_PENDING_MAX + 2;
    let frames: Vec<String> = e.recv(c).iter().map(|f| f.text().to_owned()).collect();
    assert_eq!(
        frames,
        [format!(
            r#"{{"id":{over},"error":{{"code":106,"message":"limit exceeded"}}}}"#
        )]
    );
    let rpcs: Vec<u64> = e
        .shard(0)
        .app_events()
        .iter()
        .filter(|ev| ev.kind == AppEventKind::Rpc)
        .map(|ev| {
            serde_json::from_slice::<Value>(&ev.payload).unwrap()["request"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(rpcs.len(), RPC_PENDING_MAX);
    // One answered makes room for one more.
    assert_eq!(rpc_reply(&mut e, &client, rpcs[0], Ok("1")), Ok(()));
    e.send(c, r#"{"id":9999,"rpc":{"method":"m"}}"#);
    e.settle();
    let frames: Vec<String> = e.recv(c).iter().map(|f| f.text().to_owned()).collect();
    assert_eq!(frames, [r#"{"id":2,"rpc":{"data":1}}"#]);
    assert_eq!(
        e.shard(0).app_events().back().unwrap().kind,
        AppEventKind::Rpc
    );
}
