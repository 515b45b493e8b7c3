//! The engine embedded in-process, driven by the Rust client over loopback.

use std::time::Duration;

use serde_json::json;
use wse_client::Connector;
use wse_shards::{Config, Server};

fn config(cores: usize) -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.cores = cores;
    cfg.server.drain_timeout = Duration::from_secs(2);
    cfg.control.enabled = false;
    cfg.auth.default_publish = vec!["*".into()];
    cfg
}

#[tokio::test(flavor = "current_thread")]
async fn publish_reaches_subscribers_on_every_shard() {
    let server = Server::start(config(2)).unwrap();
    let url = format!("ws://{}/wse", server.local_addr());
    let mut subs = Vec::new();
    for _ in 0..8 {
        let mut c = Connector::new(&url).connect().await.unwrap();
        let ack = c.subscribe(&["news"]).await.unwrap();
        assert_eq!(ack.p["success"], true, "{:?}", ack.raw);
        subs.push(c);
    }
    let mut publisher = Connector::new(&url).connect().await.unwrap();
    let ack = publisher
        .publish_acked("news", "headline", json!({"n": 1}))
        .await
        .unwrap();
    assert_eq!(ack.t, "publish_ack", "{:?}", ack.raw);
    for c in &mut subs {
        let ev = c
            .recv_until(|e| e.t == "headline", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(ev.p["n"], 1);
    }
    let pong = publisher.ping().await.unwrap();
    assert_eq!(pong.t, "PONG");
    assert!(server.stop(Duration::from_secs(2)));
}
