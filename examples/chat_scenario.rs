//! The chat scenario both example backends are tested with (`examples/README.md`): two users
//! join a room, talk, list it, misbehave and leave, checked from their side of the wire.
//! Included by `examples/embedded-chat/tests/chat.rs` and `tests/examples.rs`.

use std::time::Duration;

use serde_json::{Value, json};
use wse_client::{Client, Event};

const T: Duration = Duration::from_secs(10);

/// A connected chat user: the client, its user id as the server sees it, and what it received
/// but was not asked for yet — a presence notice and the backend's answer race each other (the
/// notice goes out while the backend is still subscribing).
pub struct User {
    pub client: Client,
    pub user_id: String,
    unread: Vec<Event>,
}

impl User {
    pub fn new(client: Client, user_id: impl Into<String>) -> Self {
        User {
            client,
            user_id: user_id.into(),
            unread: Vec::new(),
        }
    }

    async fn send(&mut self, t: &str, p: Value) {
        self.client
            .send_json(&json!({"t": t, "p": p}))
            .await
            .unwrap();
    }

    /// The first unread message of type `t`; a `chat_error` while another type is awaited fails
    /// the test with its message.
    async fn next(&mut self, t: &str) -> Event {
        loop {
            if let Some(i) = self.unread.iter().position(|e| e.t == t) {
                return self.unread.remove(i);
            }
            if let Some(err) = self.unread.iter().find(|e| e.t == "chat_error") {
                panic!("awaiting {t}, got chat_error {}", err.p);
            }
            let ev = self
                .client
                .recv_timeout(T)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("no {t} within {T:?}"));
            self.unread.push(ev);
        }
    }
}

/// Runs the scenario with two fresh users of a chat backend.
pub async fn run(mut ann: User, mut bob: User) {
    let (ann_id, bob_id) = (json!(ann.user_id), json!(bob.user_id));

    ann.send("join", json!({"room": "lobby", "name": "Ann"}))
        .await;
    assert_eq!(ann.next("joined").await.p["room"], "lobby");
    let ev = ann.next("presence_join").await;
    assert_eq!(
        (&ev.p["user_id"], &ev.p["data"]),
        (&ann_id, &json!({"name": "Ann"}))
    );

    bob.send("join", json!({"room": "lobby", "name": "Bob"}))
        .await;
    assert_eq!(bob.next("joined").await.p["room"], "lobby");
    let ev = ann.next("presence_join").await;
    assert_eq!(
        (&ev.p["user_id"], &ev.p["data"]),
        (&bob_id, &json!({"name": "Bob"})),
        "ann sees bob arrive"
    );

    bob.send("say", json!({"room": "lobby", "text": "hi all"}))
        .await;
    let said = json!({"room": "lobby", "from": "Bob", "text": "hi all"});
    assert_eq!(ann.next("chat").await.p, said);
    assert_eq!(
        bob.next("chat").await.p,
        said,
        "the sender hears itself too"
    );

    ann.send("who", json!({"room": "lobby"})).await;
    let mut members: Vec<Value> = ann.next("who").await.p["members"]
        .as_array()
        .expect("members")
        .clone();
    members.sort_by_key(|m| m["name"].to_string());
    assert_eq!(
        members,
        [
            json!({"user_id": ann_id, "name": "Ann", "connections": 1}),
            json!({"user_id": bob_id, "name": "Bob", "connections": 1}),
        ]
    );

    // Refusals: a bad room, speaking where one has not joined, an unknown type.
    ann.send("join", json!({"room": "no spaces"})).await;
    let err = ann.next("chat_error").await;
    assert!(
        err.p["message"].as_str().unwrap().contains("room names"),
        "{}",
        err.p
    );
    ann.send("say", json!({"room": "other", "text": "x"})).await;
    assert_eq!(
        ann.next("chat_error").await.p["message"],
        "join other first"
    );
    ann.send("dance", json!({"room": "lobby"})).await;
    let err = ann.next("chat_error").await;
    assert!(
        err.p["message"].as_str().unwrap().contains("dance"),
        "{}",
        err.p
    );

    bob.send("leave", json!({"room": "lobby"})).await;
    assert_eq!(bob.next("left").await.p["room"], "lobby");
    assert_eq!(ann.next("presence_leave").await.p["user_id"], bob_id);
    bob.send("say", json!({"room": "lobby", "text": "ghost"}))
        .await;
    assert_eq!(
        bob.next("chat_error").await.p["message"],
        "join lobby first"
    );
    // Nothing of bob's reached the room after he left (ann's stream is in publication order,
    // so a chat from him would precede this one).
    ann.send("say", json!({"room": "lobby", "text": "bye"}))
        .await;
    assert_eq!(ann.next("chat").await.p["text"], "bye");
}
