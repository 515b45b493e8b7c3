//! Application events: what clients did that the application's backend should hear about —
//! connections coming and going, messages the server does not handle itself, presence changes.
//!
//! Owns: the event type, its kinds (named as the upstream `RustWSEServer.drain_inbound` names
//! them) and its JSON form for the event stream. Never: queues or routes events — each shard
//! keeps its own bounded queue (`shard`), and `Server::drain_inbound` collects from them.
//!
//! Order: the events of one connection all come from the shard that serves it and leave that
//! shard in the order they happened: `connect` first, `disconnect` last. Presence events are
//! decided by the topic's owner shard but reported by the connection's shard, between the two
//! (`shard::presence_events`); each names the connection that joined or, for `presence_leave`,
//! the one whose departure ended the user's membership.

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::conn::ConnId;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AppEventKind {
    /// A connection completed the upgrade with authentication off. Payload: `{}`.
    Connect,
    /// A connection completed the upgrade with a verified token. Payload: the token's standard
    /// claims that were present (`sub`, `iss`, `aud`, `exp`, `iat`, `nbf`, `jti`), as JSON.
    AuthConnect,
    /// A client message of a type the server does not handle itself. Payload: the message (JSON,
    /// after `C:`/`M:` decoding).
    Msg,
    /// A Centrifuge client's `rpc`, for the backend to answer (`POST
    /// /api/v1/connections/{id}/rpc_reply`). Payload: `{"request","method","data"}`.
    Rpc,
    /// A text message that is not JSON. Payload: the text. (The client also gets
    /// `INVALID_MESSAGE`, as the protocol requires.)
    Raw,
    /// A binary message that is neither JSON nor a `C:`/`M:` encoding. Payload: the bytes.
    /// (The client also gets `INVALID_MESSAGE`.)
    Bin,
    /// A connection left (closed by either side, failed, evicted). Payload: `{}`.
    Disconnect,
    /// A user's first connection joined a topic's presence. Payload:
    /// `{"topic","user_id","data"}`; the connection is the one that joined.
    PresenceJoin,
    /// A user's last connection left a topic's presence. Payload: `{"topic","user_id","data"}`;
    /// no connection (the user is gone from the topic, whichever connection went last).
    PresenceLeave,
}

impl AppEventKind {
    /// The name the event stream and upstream's `drain_inbound` use.
    pub fn name(self) -> &'static str {
        match self {
            AppEventKind::Connect => "connect",
            AppEventKind::AuthConnect => "auth_connect",
            AppEventKind::Msg => "msg",
            AppEventKind::Rpc => "rpc",
            AppEventKind::Raw => "raw",
            AppEventKind::Bin => "bin",
            AppEventKind::Disconnect => "disconnect",
            AppEventKind::PresenceJoin => "presence_join",
            AppEventKind::PresenceLeave => "presence_leave",
        }
    }
}

/// One application event.
#[derive(Clone, Debug)]
pub struct AppEvent {
    /// What happened (the event's `type`).
    pub kind: AppEventKind,
    /// The shard that produced it: the connection's, or the topic owner's for presence.
    pub shard: u16,
    /// The connection it is about (every event a shard reports names one).
    pub conn: Option<ConnId>,
    /// The user (JWT `sub`; the connection id when authentication is off).
    pub user: Box<str>,
    /// See [`AppEventKind`]: JSON for every kind but `raw` (UTF-8 text) and `bin` (bytes).
    pub payload: Bytes,
}

impl AppEvent {
    /// What the event holds on to, for the queue bounds.
    pub fn size(&self) -> usize {
        self.payload.len() + self.user.len() + std::mem::size_of::<Self>()
    }

    /// The key that keeps one client's events together (on one event-stream consumer): the
    /// connection id (every event the shards report has one; a hash of the payload otherwise).
    pub fn routing_key(&self) -> u64 {
        match self.conn {
            Some(c) => c.as_u64(),
            None => {
                // FNV-1a over the payload (it names the topic): stable, and cheap.
                self.payload.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
                })
            }
        }
    }

    /// The event as the stream sends it:
    /// `{"type":"msg","shard":0,"connection_id":"..","user_id":"..","payload":..}`.
    /// `raw` payloads are JSON strings; `bin` payloads are base64 strings (standard alphabet).
    /// Written in one allocation of the exact size: a 1 MB payload makes a 1 to 6 MB event, and
    /// a growing buffer would take twice that.
    pub fn to_json(&self) -> String {
        match self.kind {
            AppEventKind::Raw => {
                let text = String::from_utf8_lossy(&self.payload);
                self.write_json(escaped_len(&text), &*text)
            }
            AppEventKind::Bin => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(&self.payload);
                self.write_json(encoded.len() + 2, &encoded)
            }
            _ => {
                let payload = std::str::from_utf8(&self.payload)
                    .ok()
                    .and_then(|s| serde_json::from_str::<&RawValue>(s).ok())
                    .unwrap_or_else(|| raw("{}"));
                self.write_json(payload.get().len(), payload)
            }
        }
    }

    /// The envelope around `payload`, whose JSON is `payload_len` bytes long.
    fn write_json<P: Serialize + ?Sized>(&self, payload_len: usize, payload: &P) -> String {
        #[derive(Serialize)]
        struct Out<'a, P: ?Sized> {
            #[serde(rename = "type")]
            kind: &'static str,
            shard: u16,
            connection_id: Option<String>,
            user_id: &'a str,
            payload: &'a P,
        }
        // The envelope's keys, a shard number, a connection id and the user, escaped at worst.
        let envelope = 96 + 6 * self.user.len();
        let mut out = Vec::with_capacity(payload_len + envelope);
        serde_json::to_writer(
            &mut out,
            &Out {
                kind: self.kind.name(),
                shard: self.shard,
                connection_id: self.conn.map(|c| c.to_string()),
                user_id: &self.user,
                payload,
            },
        )
        .expect("an event serialises");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }
}

/// The length of `text` as a JSON string, quotes included, as serde_json escapes it.
fn escaped_len(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

fn raw(json: &str) -> &RawValue {
    serde_json::from_str(json).expect("built as JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: AppEventKind, payload: &'static [u8]) -> AppEvent {
        AppEvent {
            kind,
            shard: 1,
            conn: Some(ConnId::new(1, 7, 3)),
            user: "ann".into(),
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn json_form_per_kind() {
        let msg = event(AppEventKind::Msg, br#"{"t":"chat","p":{"x":1}}"#);
        assert_eq!(
            msg.to_json(),
            r#"{"type":"msg","shard":1,"connection_id":"0100000700000003","user_id":"ann","payload":{"t":"chat","p":{"x":1}}}"#
        );
        let raw = event(AppEventKind::Raw, b"hello \"you\"");
        assert!(raw.to_json().ends_with(r#""payload":"hello \"you\""}"#));
        let bin = event(AppEventKind::Bin, &[0, 1, 2, 255]);
        assert!(bin.to_json().ends_with(r#""payload":"AAEC/w=="}"#));
        let mut leave = event(AppEventKind::PresenceLeave, br#"{"topic":"t"}"#);
        leave.conn = None;
        assert!(leave.to_json().contains(r#""connection_id":null"#));
    }

    #[test]
    fn to_json_is_allocated_at_its_exact_size() {
        let text = "a\"b\\c\n\u{1}\u{1f}é\u{7f}".repeat(1000);
        assert_eq!(
            escaped_len(&text),
            serde_json::to_string(&text).unwrap().len()
        );
        for (kind, payload) in [
            (AppEventKind::Raw, text.into_bytes()),
            (AppEventKind::Msg, br#"{"t":"m","p":[1,2,3]}"#.to_vec()),
            (AppEventKind::Bin, vec![7u8; 1000]),
        ] {
            let mut ev = event(kind, b"");
            ev.payload = Bytes::from(payload);
            let json = ev.to_json();
            assert!(json.capacity() - json.len() <= 96 + 6 * 3, "{kind:?}");
            serde_json::from_str::<serde_json::Value>(&json).unwrap();
        }
    }

    #[test]
    fn routing_key_is_the_connection_or_the_topic() {
        let a = event(AppEventKind::Msg, b"{}");
        assert_eq!(a.routing_key(), ConnId::new(1, 7, 3).as_u64());
        let mut l1 = event(AppEventKind::PresenceLeave, br#"{"topic":"a"}"#);
        l1.conn = None;
        let l2 = l1.clone();
        assert_eq!(l1.routing_key(), l2.routing_key());
    }
}
