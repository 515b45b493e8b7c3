//! Message recovery (protocol.md §5) end to end: stamps, replay on request, its ordering against
//! live publications, and every way a replay is refused.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Wse, publisher_token, token};
use wse_client::{Client, Connector, Event};

const T: Duration = Duration::from_secs(15);

fn recovering(args: &[&str]) -> Wse {
    let mut all = vec!["--cores", "2", "--recovery-enabled", "true"];
    all.extend_from_slice(args);
    Wse::start(&all)
}

async fn client(wse: &Wse, sub: &str) -> Client {
    Connector::new(wse.url())
        .token(token(sub, json!({})))
        .connect()
        .await
        .unwrap()
}

async fn publisher(wse: &Wse) -> Client {
    Connector::new(wse.url())
        .token(publisher_token("pub"))
        .connect()
        .await
        .unwrap()
}

/// Publishes `seqs` on `topic` and waits until the last is sequenced.
async fn publish_range(p: &mut Client, topic: &str, seqs: std::ops::Range<u64>) {
    for seq in seqs.clone() {
        p.publish(topic, "m", json!({"seq": seq})).await.unwrap();
    }
    let ack = p.publish_acked(topic, "sync", json!({})).await.unwrap();
    assert_eq!(ack.t, "publish_ack", "{:?}", ack.raw);
}

/// Subscribes with a recovery position and returns (the frames before the acknowledgement, the
/// acknowledgement).
async fn recover(c: &mut Client, topic: &str, epoch: &str, offset: u64) -> (Vec<Event>, Event) {
    let p = json!({"action":"subscribe","topics":[topic],"recover":true,"recovery":{topic: {"epoch": epoch, "offset": offset}}});
    c.send_json(&json!({"c":"WSE","t":"subscription_update","p":p}))
        .await
        .unwrap();
    let mut before = Vec::new();
    loop {
        let ev = c.recv().await.unwrap();
        if ev.t == "subscription_update" {
            return (before, ev);
        }
        before.push(ev);
    }
}

/// The offsets of the stamped publications among `events`.
fn offsets(events: &[Event]) -> Vec<u64> {
    events.iter().filter_map(|e| e.offset).collect()
}

#[tokio::test]
async fn publications_are_stamped_and_replayed_exactly_on_every_shard() {
    let wse = recovering(&[]);
    let mut live = client(&wse, "live").await;
    let ack = live.subscribe(&["feed"]).await.unwrap();
    assert_eq!(ack.p["success"], true);
    assert_eq!(
        live.server_ready().p["details"]["features"]["recovery"],
        true
    );
    let mut p = publisher(&wse).await;
    publish_range(&mut p, "feed", 0..10).await;
    let mut live_frames = Vec::new();
    while live_frames.len() < 10 {
        let ev = live.recv().await.unwrap();
        if ev.t == "m" {
            live_frames.push(ev);
        }
    }
    // Stamps first, offsets from 1, one epoch.
    let epoch = live_frames[0].epoch.clone().unwrap();
    assert_eq!(epoch.len(), 8);
    let first = live_frames[0].text.clone().unwrap();
    assert!(
        first.starts_with(&format!(
            r#"{{"tp":"feed","e":"{epoch}","o":1,"c":"U","t":"m","p":{{"seq":0}}"#
        )),
        "{first}"
    );
    assert_eq!(offsets(&live_frames), (1..=10).collect::<Vec<_>>());

    // Recoverers on both shards get exactly what they missed, byte-identical to the live copies.
    let mut shards = HashSet::new();
    let mut held = Vec::new();
    // Connections spread over the shards once one holds more than a few beyond the other.
    for i in 0..40 {
        if shards.len() == 2 && i >= 6 {
            break;
        }
        let mut r = client(&wse, &format!("r{i}")).await;
        shards.insert(r.connection_id()[..2].to_owned());
        let (frames, ack) = recover(&mut r, "feed", &epoch, 4).await;
        // 5..=10, then the sync publication (11).
        assert_eq!(offsets(&frames), (5..=11).collect::<Vec<_>>());
        let texts: Vec<_> = frames
            .iter()
            .filter(|e| e.t == "m")
            .map(|e| e.text.clone().unwrap())
            .collect();
        let expected: Vec<_> = live_frames[4..]
            .iter()
            .map(|e| e.text.clone().unwrap())
            .collect();
        assert_eq!(texts, expected, "replayed frames differ from the live ones");
        let info = &ack.p["recovery"]["feed"];
        assert_eq!(info["epoch"], epoch);
        assert_eq!(info["offset"], 11, "the sync publication is offset 11");
        assert_eq!(info["recovered"], true);
        assert_eq!(info["count"], 7);
        // Idempotent: asking again for the same range gives the same answer.
        let (again, ack) = recover(&mut r, "feed", &epoch, 4).await;
        assert_eq!(offsets(&again), offsets(&frames));
        assert_eq!(ack.p["recovery"]["feed"]["count"], 7);
        held.push(r);
    }
    assert_eq!(shards.len(), 2, "recoverers did not land on both shards");
}

#[tokio::test]
async fn a_changed_epoch_or_too_large_a_gap_answers_the_current_position() {
    let wse = recovering(&["--recovery-max-messages", "5"]);
    let mut p = publisher(&wse).await;
    publish_range(&mut p, "t", 0..20).await;
    let mut c = client(&wse, "c").await;
    let (frames, ack) = recover(&mut c, "t", "00000000", 3).await;
    assert!(
        frames.iter().all(|e| e.t != "m"),
        "nothing replayed from another epoch"
    );
    let info = &ack.p["recovery"]["t"];
    assert_eq!(info["recovered"], false);
    assert_eq!(info["offset"], 21);
    assert_eq!(info["count"], 0);
    let epoch = info["epoch"].as_str().unwrap().to_owned();
    // The right epoch but a gap over recovery.max_messages.
    let (_, ack) = recover(&mut c, "t", &epoch, 10).await;
    assert_eq!(ack.p["recovery"]["t"]["recovered"], false);
    let (frames, ack) = recover(&mut c, "t", &epoch, 16).await;
    assert_eq!(ack.p["recovery"]["t"]["recovered"], true);
    // 17..=20 and the sync publication (21).
    assert_eq!(offsets(&frames), (17..=21).collect::<Vec<_>>());
    // The client re-baselines and carries on: the next publication is the next offset.
    publish_range(&mut p, "t", 20..21).await;
    let ev = c.recv_until(|e| e.t == "m", T).await.unwrap();
    assert_eq!(ev.offset, Some(22));
}

#[tokio::test]
async fn the_memory_budget_evicts_the_oldest_history() {
    // 1 MiB over 2 shards: 512 KiB of history per shard; 100 publications of 20 KiB overrun it.
    let wse = recovering(&[
        "--recovery-memory-budget",
        "1048576",
        "--recovery-buffer-size",
        "1024",
        "--recovery-max-messages",
        "1024",
    ]);
    let mut p = publisher(&wse).await;
    let pad = "x".repeat(20 * 1024);
    for seq in 0..100 {
        p.publish("big", "m", json!({"seq": seq, "pad": pad}))
            .await
            .unwrap();
    }
    p.publish_acked("big", "m", json!({"seq": 100}))
        .await
        .unwrap();
    let mut c = client(&wse, "c").await;
    let (_, ack) = recover(&mut c, "big", "00000000", 0).await;
    let epoch = ack.p["recovery"]["big"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, ack) = recover(&mut c, "big", &epoch, 0).await;
    assert_eq!(
        ack.p["recovery"]["big"]["recovered"], false,
        "the oldest publications were overwritten"
    );
    let (frames, ack) = recover(&mut c, "big", &epoch, 96).await;
    assert_eq!(ack.p["recovery"]["big"]["recovered"], true);
    assert_eq!(offsets(&frames), (97..=101).collect::<Vec<_>>());
}

#[tokio::test]
async fn history_older_than_the_ttl_is_not_replayed() {
    let wse = recovering(&["--recovery-ttl", "1s"]);
    let mut p = publisher(&wse).await;
    publish_range(&mut p, "old", 0..3).await;
    let mut c = client(&wse, "c").await;
    let (frames, ack) = recover(&mut c, "old", "00000000", 0).await;
    assert!(frames.is_empty());
    let epoch = ack.p["recovery"]["old"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let (frames, _) = recover(&mut c, "old", &epoch, 0).await;
    assert_eq!(
        offsets(&frames),
        vec![1, 2, 3, 4],
        "three and the sync publication"
    );
    // The TTL is the event here: wait it out (second granularity).
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (frames, ack) = recover(&mut c, "old", &epoch, 0).await;
    assert!(frames.is_empty());
    assert_eq!(ack.p["recovery"]["old"]["recovered"], false);
}

#[tokio::test]
async fn recovery_respects_the_subscribe_acl() {
    let wse = recovering(&[]);
    let mut p = publisher(&wse).await;
    publish_range(&mut p, "secret", 0..5).await;
    let tok = token("limited", json!({"wse_topics": {"allow": ["public:*"]}}));
    let mut c = Connector::new(wse.url())
        .token(tok)
        .connect()
        .await
        .unwrap();
    let (frames, ack) = recover(&mut c, "secret", "00000000", 0).await;
    assert!(frames.is_empty(), "history leaked past the ACL: {frames:?}");
    assert_eq!(ack.p["success"], false);
    assert_eq!(ack.p["failed_topics"][0]["reason"], "FORBIDDEN");
    assert!(
        ack.p
            .get("recovery")
            .is_none_or(|r| r.get("secret").is_none())
    );
}

#[tokio::test]
async fn an_evicted_slow_consumer_reconnects_and_recovers_everything() {
    const MESSAGES: u64 = 3000;
    let wse = recovering(&[
        "--max-outbound-queue-bytes",
        "65536",
        "--recovery-buffer-size",
        "4096",
        "--recovery-max-messages",
        "4096",
        "--recovery-memory-budget",
        "67108864",
        "--close-timeout",
        "30s",
    ]);
    let mut slow = client(&wse, "slow").await;
    slow.subscribe(&["firehose"]).await.unwrap();
    let mut fast = client(&wse, "fast").await;
    fast.subscribe(&["firehose"]).await.unwrap();
    let mut p = publisher(&wse).await;
    let pad = "x".repeat(4096);
    for chunk in 0..MESSAGES / 50 {
        for i in 0..50 {
            p.publish("firehose", "m", json!({"seq": chunk * 50 + i, "pad": pad}))
                .await
                .unwrap();
        }
        for _ in 0..50 {
            fast.recv_until(|e| e.t == "m", T).await.unwrap();
        }
    }
    let info = slow.expect_close(T).await.unwrap();
    assert_eq!(info.code, 4413);
    let got = offsets(&info.events_before);
    let (last, epoch) = (
        *got.last().unwrap(),
        info.events_before[0].epoch.clone().unwrap(),
    );
    assert_eq!(got, (1..=last).collect::<Vec<_>>());
    // Reconnect and recover from the last offset received.
    let mut back = client(&wse, "slow").await;
    let (replayed, ack) = recover(&mut back, "firehose", &epoch, last).await;
    assert_eq!(
        ack.p["recovery"]["firehose"]["recovered"], true,
        "{:?}",
        ack.p
    );
    let mut all = got;
    all.extend(offsets(&replayed));
    assert_eq!(
        all,
        (1..=MESSAGES).collect::<Vec<_>>(),
        "lost or duplicated across the eviction"
    );
    let seqs: Vec<Value> = replayed.iter().map(|e| e.p["seq"].clone()).collect();
    assert_eq!(seqs.first(), Some(&json!(last)));
}
