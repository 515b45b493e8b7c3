//! A chat backend with the wse-server engine embedded: the application and the engine in one
//! process, talking through [`wse_shards::Server`] — no HTTP, no event-stream socket.
//!
//! The protocol is the one in `examples/README.md` (`join`, `say`, `who`, `leave`), the same as
//! the Python example's, which drives a standalone server over its HTTP API instead.
//!
//! Shape: one thread pulls application events with [`Server::drain_inbound`] and handles them
//! one at a time ([`Chat::handle`]), calling the engine API with [`wse_shards::block_on`] (each
//! call reaches the shard that owns the connection or topic through the fabric; none takes a
//! global lock). A real backend with slow work (a database) would hand events to a pool; the
//! per-connection order [`Server::drain_inbound`] guarantees is what keeps a client's
//! messages in sequence.
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! let server = wse_example_embedded_chat::start("127.0.0.1:5007".parse().unwrap(), 2).unwrap();
//! wse_example_embedded_chat::serve(&server, &AtomicBool::new(false));
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use wse_shards::command::AppSubscribe;
use wse_shards::{AppEvent, AppEventKind, ConnId, Server, StartError, block_on};

/// Events taken from the engine at once.
const EVENTS_PER_POLL: usize = 256;
/// Longest wait for events before `serve` looks at its stop flag again.
const POLL_WAIT: Duration = Duration::from_millis(50);
/// Room names: 1 to this many of `A-Z a-z 0-9 _ -`.
const ROOM_NAME_MAX: usize = 64;
/// Display names are cut to this many characters.
const DISPLAY_NAME_MAX: usize = 64;

/// Starts the engine for the chat: WebSocket on `listen`, `cores` shards, presence on
/// (`who` and the join/leave notices need it). Authentication stays as
/// [`wse_shards::Config::default`] has it: off, every connection is its own user.
///
/// # Errors
/// As [`Server::start`] (the address is taken, the configuration is invalid).
pub fn start(listen: SocketAddr, cores: usize) -> Result<Server, StartError> {
    Server::builder()
        .listen(listen)
        .cores(cores)
        .configure(|cfg| cfg.presence.enabled = true)
        .start()
}

/// Handles the chat's events until `stop` is set.
pub fn serve(server: &Server, stop: &AtomicBool) {
    let mut chat = Chat::default();
    while !stop.load(Ordering::Relaxed) {
        for event in server.drain_inbound(EVENTS_PER_POLL, POLL_WAIT) {
            chat.handle(server, &event);
        }
    }
}

/// The backend's own state: who is called what and sits in which rooms. Entries go when their
/// connection's `disconnect` event comes, so it holds no more than the live connections.
#[derive(Debug, Default)]
pub struct Chat {
    members: HashMap<ConnId, Member>,
}

#[derive(Debug, Default)]
struct Member {
    name: Option<String>,
    rooms: HashSet<String>,
}

impl Chat {
    /// Handles one application event.
    pub fn handle(&mut self, server: &Server, event: &AppEvent) {
        let Some(conn) = event.conn else {
            return; // every event the server reports names its connection
        };
        match event.kind {
            AppEventKind::Disconnect => {
                self.members.remove(&conn);
            }
            AppEventKind::Msg => {
                let message: Value = serde_json::from_slice(&event.payload).unwrap_or(Value::Null);
                let kind = message["t"].as_str().unwrap_or("");
                let p = &message["p"];
                let reply = match self.on_message(server, conn, &event.user, kind, p) {
                    Ok(Some(reply)) => reply,
                    Ok(None) => return,
                    Err(message) => json!({"t": "chat_error", "p": {"message": message}}),
                };
                // The client may have gone meanwhile; its disconnect event will clean up.
                let _ = block_on(server.send_event(conn, &reply.to_string()));
            }
            _ => {}
        }
    }

    /// One chat message: `Ok(Some(reply))` to answer it, `Err(why)` to refuse it.
    fn on_message(
        &mut self,
        server: &Server,
        conn: ConnId,
        user: &str,
        kind: &str,
        p: &Value,
    ) -> Result<Option<Value>, String> {
        let room = room_name(p)?;
        let topic = format!("chat.{room}");
        match kind {
            "join" => {
                let name = p["name"]
                    .as_str()
                    .map(|n| n.chars().take(DISPLAY_NAME_MAX).collect::<String>())
                    .filter(|n| !n.is_empty());
                let shown = name.clone().unwrap_or_else(|| user.to_owned());
                let sub = AppSubscribe {
                    topics: vec![topic.clone()],
                    presence: Some(Bytes::from(json!({ "name": shown }).to_string())),
                    ..AppSubscribe::default()
                };
                let outcome = block_on(server.subscribe_connection(conn, sub))
                    .map_err(|e| format!("cannot join: {e}"))?;
                if let Some(failed) = outcome.failed_topics.first() {
                    return Err(format!("cannot join {room}: {}", failed.reason));
                }
                let member = self.members.entry(conn).or_default();
                member.name = name;
                member.rooms.insert(room.to_owned());
                Ok(Some(json!({"t": "joined", "p": {"room": room}})))
            }
            "say" => {
                let member = self.members.get(&conn);
                if !member.is_some_and(|m| m.rooms.contains(room)) {
                    return Err(format!("join {room} first"));
                }
                let from = member.and_then(|m| m.name.as_deref()).unwrap_or(user);
                let text = p["text"].as_str().ok_or("say needs a text")?;
                let data = json!({"room": room, "from": from, "text": text}).to_string();
                let data = serde_json::value::RawValue::from_string(data).expect("JSON");
                server
                    .publish(&topic, "chat", &data)
                    .map_err(|e| format!("not sent: {e}"))?;
                Ok(None)
            }
            "who" => {
                let members = block_on(server.presence(&topic)).map_err(|e| e.to_string())?;
                let members: Vec<Value> = members
                    .into_iter()
                    .map(|m| {
                        let data: Value = serde_json::from_str(&m.data).unwrap_or(Value::Null);
                        json!({"user_id": m.user_id, "name": data["name"],
                            "connections": m.connections})
                    })
                    .collect();
                Ok(Some(
                    json!({"t": "who", "p": {"room": room, "members": members}}),
                ))
            }
            "leave" => {
                block_on(server.unsubscribe_connection(conn, Some(vec![topic])))
                    .map_err(|e| e.to_string())?;
                if let Some(m) = self.members.get_mut(&conn) {
                    m.rooms.remove(room);
                }
                Ok(Some(json!({"t": "left", "p": {"room": room}})))
            }
            other => Err(format!("unknown message type {other:?}")),
        }
    }
}

/// The `room` of a message, checked.
fn room_name(p: &Value) -> Result<&str, String> {
    let room = p["room"].as_str().ok_or("a room is required")?;
    let ok = !room.is_empty()
        && room.len() <= ROOM_NAME_MAX
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(room)
    } else {
        Err(format!(
            "room names are 1 to {ROOM_NAME_MAX} of A-Z a-z 0-9 _ -"
        ))
    }
}
