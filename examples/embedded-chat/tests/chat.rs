//! The embedded chat end to end: the engine and the chat in this process, real clients.

#[path = "../../chat_scenario.rs"]
mod chat_scenario;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use chat_scenario::User;
use wse_client::Connector;
use wse_shards::Server;

#[tokio::test]
async fn join_say_who_leave() {
    let chat = Chat::start();
    chat_scenario::run(chat.user().await, chat.user().await).await;
    chat.stop();
}

/// Whatever a client sends, the backend thread goes on (a panic would end it, and the chat with
/// it): odd messages are answered with `chat_error` or ignored, and the chat still works.
#[tokio::test]
async fn odd_messages_do_not_stop_the_chat() {
    let chat = Chat::start();
    let mut eve = Connector::new(chat.url.clone()).connect().await.unwrap();
    let nested = |n| format!("{}{}", "[".repeat(n), "]".repeat(n));
    for odd in [
        // Past the engine's depth limit: refused there, never reaches the backend.
        format!(
            r#"{{"t":"say","p":{{"room":"lobby","text":{}}}}}"#,
            nested(5000)
        ),
        // Within it: reaches the backend.
        format!(
            r#"{{"t":"join","p":{{"room":"elsewhere","name":{}}}}}"#,
            nested(60)
        ),
        "not json".to_owned(),
        "[1,2]".to_owned(),
        r#"{"t":["join"],"p":{"room":"lobby"}}"#.to_owned(),
        r#"{"t":"join","p":"lobby"}"#.to_owned(),
        r#"{"t":"say","p":{"room":"lobby","text":{"x":1}}}"#.to_owned(),
        r#"{"t":"join","p":{"room":"\u0000\ud800"}}"#.to_owned(),
    ] {
        eve.send_text(odd).await.unwrap();
    }
    eve.send_binary(vec![0xff, 0x00, 0x9f]).await.unwrap();
    // The backend answers one connection's messages in order: this answer comes after the others.
    eve.send_text(r#"{"t":"dance","p":{"room":"probe"}}"#)
        .await
        .unwrap();
    let probe = eve
        .recv_until(
            |e| e.t == "chat_error" && e.p["message"].as_str().unwrap().contains("dance"),
            Duration::from_secs(10),
        )
        .await;
    assert!(probe.is_ok(), "no answer to the probe: {probe:?}");
    assert!(!chat.backend.is_finished(), "the backend thread ended");
    chat_scenario::run(chat.user().await, chat.user().await).await;
    chat.stop();
}

/// The engine, the backend thread, and the clients' URL.
struct Chat {
    server: Arc<Server>,
    url: String,
    stop: Arc<AtomicBool>,
    backend: JoinHandle<()>,
}

impl Chat {
    fn start() -> Chat {
        let server = Arc::new(
            wse_example_embedded_chat::start("127.0.0.1:0".parse().unwrap(), 2)
                .expect("engine starts"),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let backend = {
            let (server, stop) = (server.clone(), stop.clone());
            std::thread::spawn(move || wse_example_embedded_chat::serve(&server, &stop))
        };
        let url = format!("ws://{}/wse", server.local_addr());
        Chat {
            server,
            url,
            stop,
            backend,
        }
    }

    /// A chat user; authentication is off, so each connection is its own user.
    async fn user(&self) -> User {
        let client = Connector::new(self.url.clone()).connect().await.unwrap();
        let id = client.connection_id().to_owned();
        User::new(client, id)
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.backend.join().unwrap();
        assert!(self.server.stop(Duration::from_secs(2)));
    }
}
