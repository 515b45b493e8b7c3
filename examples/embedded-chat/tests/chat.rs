//! The embedded chat end to end: the engine and the chat in this process, real clients.

#[path = "../../chat_scenario.rs"]
mod chat_scenario;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chat_scenario::User;
use wse_client::Connector;

#[tokio::test]
async fn join_say_who_leave() {
    let server = Arc::new(
        wse_example_embedded_chat::start("127.0.0.1:0".parse().unwrap(), 2).expect("engine starts"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let backend = {
        let (server, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || wse_example_embedded_chat::serve(&server, &stop))
    };
    let url = format!("ws://{}/wse", server.local_addr());
    let mut users = Vec::new();
    for _ in 0..2 {
        let client = Connector::new(url.clone()).connect().await.unwrap();
        // Authentication is off: each connection is its own user.
        let id = client.connection_id().to_owned();
        users.push(User::new(client, id));
    }
    let bob = users.pop().unwrap();
    chat_scenario::run(users.pop().unwrap(), bob).await;

    stop.store(true, Ordering::Relaxed);
    backend.join().unwrap();
    assert!(server.stop(Duration::from_secs(1)));
}
