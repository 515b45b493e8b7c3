//! The shards' side of the cluster core, with the test playing the core on its fabric endpoint:
//! a topic's owner advertises this node's interest once (first plain subscriber on any shard,
//! its own included) and withdraws it once (the last left); subscriptions are acknowledged only
//! once the core confirms; a publication made here goes to the core as one entry; one from
//! another node reaches every local subscriber and never goes back to the core.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;

use wse_shards::config::ClusterSecurity;
use wse_shards::fabric::FabricMsg;

use crate::harness::{Client, Engine, Frame, config, topic_owned_by};

const SHARDS: usize = 3;
const OWNER: usize = 1;

/// A 3-shard engine whose configuration enables the cluster (nothing listens: the test is the
/// core).
fn clustered() -> Engine {
    let mut cfg = config(SHARDS);
    cfg.auth.default_queue_groups = vec!["*".into()];
    cfg.cluster.enabled = true;
    cfg.cluster.security = ClusterSecurity::None;
    cfg.cluster.listen = "127.0.0.1:9999".parse().unwrap();
    Engine::new(cfg)
}

fn connected(e: &mut Engine, shard: usize, user: &str) -> Client {
    let c = e.connect(shard, user);
    assert_eq!(e.recv(c).len(), 1, "server_ready");
    c
}

fn subscribe(e: &mut Engine, c: Client, topic: &str) {
    e.send_json(
        c,
        &json!({"c":"WSE","t":"subscription_update","p":{"action":"subscribe","topics":[topic]}}),
    );
}

fn unsubscribe(e: &mut Engine, c: Client, topic: &str) {
    e.send_json(
        c,
        &json!({"c":"WSE","t":"subscription_update","p":{"action":"unsubscribe","topics":[topic]}}),
    );
}

fn texts(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(|f| f.text().to_owned()).collect()
}

fn sub_ack(topic: &str) -> String {
    format!(
        r#"{{"c":"WSE","t":"subscription_update","p":{{"action":"subscribe","success":true,"success_topics":["{topic}"],"failed_topics":[]}},"v":1}}"#
    )
}

/// The interest entries the core got: (shard, topic, ticket, on).
fn interest(got: &[(usize, FabricMsg)]) -> Vec<(usize, String, u64, bool)> {
    got.iter()
        .filter_map(|(from, m)| match m {
            FabricMsg::ClusterInterest {
                topic,
                group: None,
                ticket,
                on,
            } => Some((*from, topic.to_string(), *ticket, *on)),
            _ => None,
        })
        .collect()
}

/// The publications the core got: (shard, topic, body).
fn published(got: &[(usize, FabricMsg)]) -> Vec<(usize, String, String)> {
    got.iter()
        .filter_map(|(from, m)| match m {
            FabricMsg::ClusterPublish { topic, body } => Some((
                *from,
                topic.to_string(),
                String::from_utf8(body.to_vec()).unwrap(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn interest_is_advertised_once_and_subscriptions_wait_for_the_confirmation() {
    let mut e = clustered();
    let topic = topic_owned_by("c", OWNER, SHARDS);
    // One subscriber on the owner's shard, two on another.
    let subs = [
        connected(&mut e, OWNER, "a"),
        connected(&mut e, 0, "b"),
        connected(&mut e, 0, "c"),
    ];
    for &s in &subs {
        subscribe(&mut e, s, &topic);
    }
    e.settle();
    let got = e.cluster_receive();
    let adverts = interest(&got);
    assert_eq!(
        adverts.len(),
        1,
        "one advert per node and topic: {adverts:?}"
    );
    let (from, t, ticket, on) = adverts[0].clone();
    assert_eq!((from, t.as_str(), on), (OWNER, topic.as_str(), true));
    for &s in &subs {
        assert!(
            e.recv(s).is_empty(),
            "acknowledged before the other nodes confirmed"
        );
    }
    // A publication made meanwhile goes to the core, and to nobody here yet (no subscription
    // is acknowledged).
    let publisher = connected(&mut e, 2, "p");
    e.send_json(
        publisher,
        &json!({"c":"WSE","t":"publish","p":{"topic":topic,"event":"early","data":0}}),
    );
    e.settle();
    assert_eq!(published(&e.cluster_receive()).len(), 1);
    for &s in &subs {
        assert!(e.recv(s).is_empty());
    }
    e.cluster_send(
        OWNER,
        FabricMsg::ClusterInterestAcked {
            topic: Arc::from(topic.as_str()),
            group: None,
            ticket,
        },
    );
    e.settle();
    for &s in &subs {
        assert_eq!(texts(&e.recv(s)), [sub_ack(&topic)]);
    }
    // A later subscriber needs no new advert and is acknowledged at once.
    let late = connected(&mut e, 2, "d");
    subscribe(&mut e, late, &topic);
    e.settle();
    assert_eq!(texts(&e.recv(late)), [sub_ack(&topic)]);
    assert!(interest(&e.cluster_receive()).is_empty());
    // The last subscriber to leave withdraws it, once.
    for &s in subs.iter().chain([&late]) {
        unsubscribe(&mut e, s, &topic);
        e.settle();
    }
    let adverts = interest(&e.cluster_receive());
    assert_eq!(adverts.len(), 1, "{adverts:?}");
    assert_eq!((adverts[0].0, adverts[0].3), (OWNER, false));
}

#[test]
fn publications_cross_the_core_once_each_way_and_never_come_back() {
    let mut e = clustered();
    let topic = topic_owned_by("d", OWNER, SHARDS);
    let subs: Vec<Client> = (0..SHARDS)
        .map(|s| connected(&mut e, s, &format!("u{s}")))
        .collect();
    for &s in &subs {
        subscribe(&mut e, s, &topic);
    }
    e.settle();
    let (_, _, ticket, _) = interest(&e.cluster_receive())[0].clone();
    e.cluster_send(
        OWNER,
        FabricMsg::ClusterInterestAcked {
            topic: Arc::from(topic.as_str()),
            group: None,
            ticket,
        },
    );
    e.settle();
    for &s in &subs {
        assert_eq!(texts(&e.recv(s)), [sub_ack(&topic)]);
    }
    // Made here: every local subscriber once, the core once (whatever the number of peers).
    let publisher = connected(&mut e, 0, "p");
    e.send_json(
        publisher,
        &json!({"c":"WSE","t":"publish","p":{"topic":topic,"event":"here","data":1}}),
    );
    e.settle();
    let body = r#"{"c":"U","t":"here","p":1,"v":1}"#;
    assert_eq!(
        published(&e.cluster_receive()),
        [(OWNER, topic.clone(), body.to_owned())]
    );
    for &s in &subs {
        assert_eq!(texts(&e.recv(s)), [body]);
    }
    // From another node, in its order: every local subscriber, in that order; nothing back to
    // the core.
    for i in 0..3 {
        e.cluster_send(
            OWNER,
            FabricMsg::PublishLocal {
                topic: Arc::from(topic.as_str()),
                body: Bytes::from(format!(r#"{{"c":"U","t":"remote","p":{i},"v":1}}"#)),
            },
        );
    }
    e.settle();
    assert!(
        e.cluster_receive().is_empty(),
        "re-forwarded to the cluster"
    );
    let want: Vec<String> = (0..3)
        .map(|i| format!(r#"{{"c":"U","t":"remote","p":{i},"v":1}}"#))
        .collect();
    for &s in &subs {
        assert_eq!(texts(&e.recv(s)), want);
    }
    assert!(e.recv(publisher).is_empty());
}

#[test]
fn without_the_cluster_nothing_goes_to_the_core() {
    let mut e = Engine::new(config(SHARDS));
    let topic = topic_owned_by("n", OWNER, SHARDS);
    let sub = connected(&mut e, 0, "s");
    subscribe(&mut e, sub, &topic);
    e.settle();
    assert_eq!(texts(&e.recv(sub)), [sub_ack(&topic)]);
    e.send_json(
        sub,
        &json!({"c":"WSE","t":"publish","p":{"topic":topic,"event":"x","data":1}}),
    );
    e.settle();
    assert_eq!(e.recv(sub).len(), 1);
    assert!(e.cluster_receive().is_empty());
}

#[test]
fn queue_groups_are_advertised_per_group_and_a_peer_pick_reaches_one_member() {
    let mut e = clustered();
    let topic = topic_owned_by("g", OWNER, SHARDS);
    let members: Vec<Client> = (0..SHARDS)
        .map(|s| connected(&mut e, s, &format!("m{s}")))
        .collect();
    let join = json!({"c":"WSE","t":"subscription_update",
        "p":{"action":"subscribe","topics":[topic],"queue_group":"workers"}});
    for &m in &members {
        e.send_json(m, &join);
    }
    e.settle();
    let got = e.cluster_receive();
    let adverts: Vec<(usize, Option<String>, u64, bool)> = got
        .iter()
        .filter_map(|(from, m)| match m {
            FabricMsg::ClusterInterest {
                group, ticket, on, ..
            } => Some((*from, group.as_ref().map(|g| g.to_string()), *ticket, *on)),
            _ => None,
        })
        .collect();
    // One advert, for the group: members are not plain subscribers.
    assert_eq!(adverts.len(), 1, "{got:?}");
    let (from, group, ticket, on) = adverts[0].clone();
    assert_eq!((from, group.as_deref(), on), (OWNER, Some("workers"), true));
    for &m in &members {
        assert!(e.recv(m).is_empty(), "acknowledged before the confirmation");
    }
    e.cluster_send(
        OWNER,
        FabricMsg::ClusterInterestAcked {
            topic: Arc::from(topic.as_str()),
            group: Some(Arc::from("workers")),
            ticket,
        },
    );
    e.settle();
    for &m in &members {
        assert_eq!(e.recv(m).len(), 1, "the acknowledgement");
    }
    // A peer picked this node for the group: one member each time.
    for i in 0..6 {
        e.cluster_send(
            OWNER,
            FabricMsg::PublishGroup {
                group: Box::new((Arc::from(topic.as_str()), Arc::from("workers"))),
                body: Bytes::from(format!(r#"{{"c":"U","t":"job","p":{i},"v":1}}"#)),
            },
        );
    }
    // A peer's plain publication is for plain subscribers only (the group had its own pick).
    e.cluster_send(
        OWNER,
        FabricMsg::PublishLocal {
            topic: Arc::from(topic.as_str()),
            body: Bytes::from_static(br#"{"c":"U","t":"plain","p":0,"v":1}"#),
        },
    );
    e.settle();
    let mut jobs = Vec::new();
    for &m in &members {
        for t in texts(&e.recv(m)) {
            jobs.push(t);
        }
    }
    jobs.sort();
    let want: Vec<String> = (0..6)
        .map(|i| format!(r#"{{"c":"U","t":"job","p":{i},"v":1}}"#))
        .collect();
    assert_eq!(jobs, want);
    assert!(e.cluster_receive().is_empty());
    // The last member leaving withdraws the group's advert.
    let leave = json!({"c":"WSE","t":"subscription_update",
        "p":{"action":"unsubscribe","topics":[topic]}});
    for &m in &members {
        e.send_json(m, &leave);
        e.settle();
    }
    let off: Vec<bool> = e
        .cluster_receive()
        .iter()
        .filter_map(|(_, m)| match m {
            FabricMsg::ClusterInterest { group, on, .. } if group.is_some() => Some(*on),
            _ => None,
        })
        .collect();
    assert_eq!(off, [false]);
}

/// A recovering subscriber whose join waits for the other nodes' confirmation: its replay is
/// read when the answer goes, so the publications sequenced while it waited (which its shard
/// drops as made before the subscription) are in the replay: no gap.
#[test]
fn a_parked_recovery_replays_what_was_published_while_it_waited() {
    let mut cfg = config(2);
    cfg.cluster.enabled = true;
    cfg.cluster.security = ClusterSecurity::None;
    cfg.cluster.listen = "127.0.0.1:9999".parse().unwrap();
    cfg.recovery.enabled = true;
    cfg.recovery.memory_budget = 1 << 20;
    cfg.recovery.max_topics = 64;
    let mut e = Engine::new(cfg);
    let topic = topic_owned_by("r", 0, 2);
    let publisher = connected(&mut e, 0, "p");
    let publish = |e: &mut Engine, seq: u64| {
        e.send_json(
            publisher,
            &json!({"c":"WSE","t":"publish","p":{"topic":topic,"event":"m","data":seq,"ack":true}}),
        );
        e.settle();
        e.recv(publisher)[0].json()["p"]["epoch"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let epoch = publish(&mut e, 1);
    publish(&mut e, 2);
    publish(&mut e, 3);
    // Recovering from offset 1 on the other shard: the node's first interest in the topic.
    let r = connected(&mut e, 1, "r");
    let p = json!({"action":"subscribe","topics":[topic],"recover":true,
        "recovery":{topic.as_str(): {"epoch": epoch, "offset": 1}}});
    e.send_json(r, &json!({"c":"WSE","t":"subscription_update","p":p}));
    e.settle();
    let (_, _, ticket, _) = interest(&e.cluster_receive())[0].clone();
    // Made while the join waits (here, and on another node).
    publish(&mut e, 4);
    e.cluster_send(
        0,
        FabricMsg::PublishLocal {
            topic: Arc::from(topic.as_str()),
            body: Bytes::from_static(br#"{"c":"U","t":"m","p":5,"v":1}"#),
        },
    );
    e.settle();
    assert!(e.recv(r).is_empty());
    e.cluster_send(
        0,
        FabricMsg::ClusterInterestAcked {
            topic: Arc::from(topic.as_str()),
            group: None,
            ticket,
        },
    );
    e.settle();
    publish(&mut e, 6);
    let got = e.recv(r);
    let offsets: Vec<u64> = got.iter().filter_map(|f| f.json()["o"].as_u64()).collect();
    assert_eq!(offsets, (2..=6).collect::<Vec<_>>(), "{:?}", texts(&got));
    let data: Vec<u64> = got.iter().filter_map(|f| f.json()["p"].as_u64()).collect();
    assert_eq!(data, (2..=6).collect::<Vec<_>>());
}
