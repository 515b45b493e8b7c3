//! Presence (protocol.md §8) end to end: join on a user's first connection in a topic, leave on
//! its last (disconnects included), updates, queries through the control plane, and limits.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::{API_KEY, Wse, token};
use wse_client::{Client, Connector, Event};

const T: Duration = Duration::from_secs(10);

fn presence(args: &[&str]) -> Wse {
    let mut all = vec!["--cores", "2", "--presence-enabled", "true"];
    all.extend_from_slice(args);
    Wse::start(&all)
}

async fn join(wse: &Wse, user: &str, topic: &str, data: Value) -> (Client, Event) {
    let mut c = Connector::new(wse.url())
        .token(token(user, json!({})))
        .connect()
        .await
        .unwrap();
    let ack = c
        .subscribe_with(json!({"action": "subscribe", "topics": [topic], "presence": data}))
        .await
        .unwrap();
    (c, ack)
}

async fn next_presence(c: &mut Client) -> Event {
    c.recv_until(|e| e.t.starts_with("presence_"), T)
        .await
        .unwrap()
}

async fn api(wse: &Wse, path: &str) -> (u16, Value) {
    let (status, body) = wse.http("GET", path, &[("X-API-Key", API_KEY)], "").await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn join_update_and_leave_across_shards() {
    let wse = presence(&[]);
    let (mut watcher, _) = join(&wse, "watcher", "room", json!({"role": "observer"})).await;
    let ev = next_presence(&mut watcher).await;
    assert_eq!(ev.t, "presence_join", "a member sees its own join");
    assert_eq!(
        ev.p,
        json!({"topic": "room", "user_id": "watcher", "data": {"role": "observer"}})
    );

    // Ann connects several times until two of her connections sit on different shards.
    let mut ann = Vec::new();
    let mut fillers = Vec::new();
    let mut shards = HashSet::new();
    for _ in 0..40 {
        let (c, ack) = join(&wse, "ann", "room", json!({"status": "here"})).await;
        assert_eq!(ack.p["success"], true, "{:?}", ack.p);
        shards.insert(c.connection_id()[..2].to_owned());
        ann.push(c);
        if shards.len() == 2 {
            break;
        }
        // Fillers push the kernel's choice past the balancing threshold.
        fillers.push(
            join(&wse, &format!("f{}", ann.len()), "elsewhere", json!({}))
                .await
                .0,
        );
    }
    assert_eq!(
        shards.len(),
        2,
        "ann's connections never spread over both shards"
    );
    // One join for ann, however many connections.
    let ev = next_presence(&mut watcher).await;
    assert_eq!(
        (ev.t.as_str(), &ev.p["user_id"]),
        ("presence_join", &json!("ann"))
    );
    assert_eq!(ev.p["data"], json!({"status": "here"}));
    let (status, stats) = api(&wse, "/api/v1/presence/room/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(
        stats,
        json!({"topic": "room", "users": 2, "connections": 1 + ann.len()})
    );
    let (_, members) = api(&wse, "/api/v1/presence/room").await;
    let ann_member = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user_id"] == "ann")
        .unwrap()
        .clone();
    assert_eq!(ann_member["connections"], ann.len());
    assert_eq!(ann_member["data"], json!({"status": "here"}));

    // New data from any connection reaches the others as presence_update.
    ann[0]
        .send_json(&json!({"c":"WSE","t":"presence_update","p":{"data":{"status":"away"}}}))
        .await
        .unwrap();
    let ev = next_presence(&mut watcher).await;
    assert_eq!(ev.t, "presence_update");
    assert_eq!(ev.p["data"], json!({"status": "away"}));

    // Closing all but one connection sends nothing; the last one — dropped without a close
    // frame — sends presence_leave.
    let last = ann.pop().unwrap();
    for c in ann {
        c.close(1000, "bye").await.unwrap();
    }
    drop(last);
    let ev = next_presence(&mut watcher).await;
    assert_eq!(ev.t, "presence_leave");
    assert_eq!(ev.p["user_id"], "ann");
    assert_eq!(ev.p["data"], json!({"status": "away"}));
    let (_, stats) = api(&wse, "/api/v1/presence/room/stats").await;
    assert_eq!(stats["users"], 1);
    assert_eq!(stats["connections"], 1);
}

#[tokio::test]
async fn unsubscribing_leaves_and_limits_refuse() {
    let wse = presence(&[
        "--presence-max-members",
        "2",
        "--presence-max-data-size",
        "64",
    ]);
    let (mut a, _) = join(&wse, "a", "small", json!({})).await;
    let (_b, _) = join(&wse, "b", "small", json!({})).await;
    let (_c, ack) = join(&wse, "c", "small", json!({})).await;
    assert_eq!(ack.p["success"], false);
    assert_eq!(ack.p["failed_topics"][0]["reason"], "PRESENCE_LIMIT");
    let (_d, ack) = join(&wse, "d", "other", json!({"blob": "x".repeat(100)})).await;
    assert_eq!(
        ack.p["failed_topics"][0]["reason"],
        "PRESENCE_DATA_TOO_LARGE"
    );
    // a sees b join, then leave when b unsubscribes... and c never joined.
    let ev = next_presence(&mut a).await;
    assert_eq!(
        (ev.t.as_str(), &ev.p["user_id"]),
        ("presence_join", &json!("a"))
    );
    let ev = next_presence(&mut a).await;
    assert_eq!(
        (ev.t.as_str(), &ev.p["user_id"]),
        ("presence_join", &json!("b"))
    );
    let mut b = _b;
    b.unsubscribe(&["small"]).await.unwrap();
    let ev = next_presence(&mut a).await;
    assert_eq!(
        (ev.t.as_str(), &ev.p["user_id"]),
        ("presence_leave", &json!("b"))
    );
    let (_, stats) = api(&wse, "/api/v1/presence/small/stats").await;
    assert_eq!(stats["users"], 1);
}

#[tokio::test]
async fn presence_queries_need_presence_on_and_a_key() {
    let wse = Wse::start(&["--cores", "1"]);
    let (status, body) = api(&wse, "/api/v1/presence/room").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "PRESENCE_DISABLED");
    let (status, _) = wse
        .http("GET", "/api/v1/presence/room/stats", &[], "")
        .await;
    assert_eq!(status, 401);
}
