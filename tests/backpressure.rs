//! Slow consumers: a subscriber that stops reading is evicted with 4413; the others get every
//! message, in order.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Wse, publisher_token, token};
use wse_client::Connector;

#[tokio::test]
async fn slow_consumer_is_evicted_with_4413_without_affecting_others() {
    // Enough data to fill the stalled client's socket buffers (several MB on loopback) and then
    // the server's 64 KiB queue for it.
    const MESSAGES: usize = 5000;
    const PAD: usize = 4096;
    let wse = Wse::start(&[
        "--cores",
        "2",
        "--max-outbound-queue-bytes",
        "65536",
        "--close-timeout",
        "30s",
    ]);
    let mut slow = Connector::new(wse.url())
        .token(token("slow", json!({})))
        .connect()
        .await
        .unwrap();
    slow.subscribe(&["firehose"]).await.unwrap();
    let mut fast = Connector::new(wse.url())
        .token(token("fast", json!({})))
        .connect()
        .await
        .unwrap();
    fast.subscribe(&["firehose"]).await.unwrap();

    // The publisher goes at the fast subscriber's pace (a consumer that keeps up is never
    // evicted), which is far faster than the stalled one's zero.
    let mut p = Connector::new(wse.url())
        .token(publisher_token("pub"))
        .connect()
        .await
        .unwrap();
    let pad = "x".repeat(PAD);
    const CHUNK: usize = 50;
    for chunk in 0..MESSAGES / CHUNK {
        for i in 0..CHUNK {
            let seq = chunk * CHUNK + i;
            p.publish("firehose", "m", json!({"seq": seq, "pad": pad}))
                .await
                .unwrap();
        }
        for i in 0..CHUNK {
            let ev = fast
                .recv_until(|e| e.t == "m", Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(ev.p["seq"], chunk * CHUNK + i);
        }
    }
    assert_eq!(p.ping().await.unwrap().t, "PONG", "publisher unaffected");
    assert_eq!(
        fast.ping().await.unwrap().t,
        "PONG",
        "fast subscriber unaffected"
    );

    // The slow one now reads what was buffered for it: an in-order prefix, then 4413.
    let info = slow.expect_close(Duration::from_secs(30)).await.unwrap();
    assert_eq!(info.code, 4413, "{}", info.reason);
    let seqs: Vec<u64> = info
        .events_before
        .iter()
        .filter(|e| e.t == "m")
        .map(|e| e.p["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.len() < MESSAGES, "nothing was dropped");
    assert_eq!(
        seqs,
        (0..seqs.len() as u64).collect::<Vec<_>>(),
        "the delivered prefix has gaps"
    );
    assert_eq!(
        wse.metric("wse_dropped_total", "reason=\"slow_consumer\"")
            .await,
        1.0
    );
    assert_eq!(wse.metric("wse_closes_total", "code=\"4413\"").await, 1.0);
}
