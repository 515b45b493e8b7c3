//! Which client protocol a connection speaks, chosen once, at the upgrade.
//!
//! Owns: the choice — the conformance echo route (`server.echo_path`), the Centrifuge protocol
//! on `centrifuge.path` (JSON, or protobuf when the client offers the `centrifuge-protobuf`
//! subprotocol or asks with `?format=protobuf` / `?cf_protocol=protobuf`), WSE on every other
//! path — and the subprotocol the 101 response must name; and [`Delivery`], one publication
//! in each dialect's wire format, each made at most once. Never: reads input after the
//! upgrade. Adding a protocol adds a variant here, its encoding in [`Delivery`], and its own
//! module beside [`crate::protocol`] and [`crate::centrifuge`]; the shard passes deliveries
//! along without asking which dialect a connection speaks.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::centrifuge::codec::{JSON_SUBPROTOCOL, PROTOBUF_SUBPROTOCOL};
use crate::centrifuge::proto::{ClientInfo, Publication};
use crate::centrifuge::{Format, encode_join_leave, encode_publication};
use crate::codec::{self, OpCode};
use crate::config::Config;
use crate::handshake::{UpgradeRequest, query_param};

/// The WSE event name (`t`) a publication made by a Centrifuge client carries to WSE
/// subscribers: Centrifuge publications have data and no event name (docs/CENTRIFUGO.md).
pub const CENTRIFUGE_PUBLISH_EVENT: &str = "publication";

/// One frame on its way to a shard's connections: the WSE frame every publication starts as
/// (the owner sequences and frames it once, rings keep it), and the same publication in the
/// other dialects, each encoded at most once per shard, when its first subscriber of that
/// dialect takes it. A frame that is not a publication of a topic (a presence event, a
/// per-connection send) exists in WSE only; a Centrifuge join/leave push
/// ([`Delivery::join_leave`]) in Centrifuge only.
pub struct Delivery<'a> {
    topic: Option<&'a str>,
    wse: &'a Bytes,
    /// Per Centrifuge format (JSON, protobuf): not made yet, or made (`None`: not a
    /// publication). Each is (the whole WebSocket frame, its payload).
    centrifuge: [Option<Option<(Bytes, Bytes)>>; 2],
    /// A Centrifuge join (`true`) or leave of this member connection instead of a publication:
    /// no WSE frame; only Centrifuge subscribers that asked for join/leave take it.
    join_leave: Option<(bool, &'a ClientInfo)>,
}

/// The WSE frame of a [`Delivery::join_leave`], which WSE connections never take.
static NO_FRAME: Bytes = Bytes::new();

impl<'a> Delivery<'a> {
    /// `wse`, a whole unmasked WebSocket text frame, for the subscribers of `topic` (`None`:
    /// for one connection, not a topic's subscribers).
    pub fn new(topic: Option<&'a str>, wse: &'a Bytes) -> Self {
        Self {
            topic,
            wse,
            centrifuge: [None, None],
            join_leave: None,
        }
    }

    /// A Centrifuge join (`joined`) or leave push of `client` for the subscribers of `topic`
    /// that asked for join/leave pushes; WSE connections skip it.
    pub fn join_leave(topic: &'a str, joined: bool, client: &'a ClientInfo) -> Self {
        Self {
            topic: Some(topic),
            wse: &NO_FRAME,
            centrifuge: [None, None],
            join_leave: Some((joined, client)),
        }
    }

    /// Whether this is a join/leave push (see [`Delivery::join_leave`]).
    pub fn is_join_leave(&self) -> bool {
        self.join_leave.is_some()
    }

    /// The topic, when the delivery is for a topic's subscribers.
    pub fn topic(&self) -> Option<&'a str> {
        self.topic
    }

    /// The WSE frame.
    pub fn wse(&self) -> &Bytes {
        self.wse
    }

    /// The Centrifuge publication push in `format`: (the whole WebSocket frame, its payload);
    /// `None` when the frame is not a publication of a topic.
    pub fn centrifuge(&mut self, format: Format) -> Option<(Bytes, Bytes)> {
        let i = match format {
            Format::Json => 0,
            Format::Protobuf => 1,
        };
        let (topic, wse, join_leave) = (self.topic, self.wse, self.join_leave);
        self.centrifuge[i]
            .get_or_insert_with(|| {
                let message = match join_leave {
                    Some((joined, client)) => {
                        encode_join_leave(format, topic?, joined, client.clone()).ok()?
                    }
                    None => {
                        let publication = publication_of(wse_payload(wse)?)?;
                        encode_publication(format, topic?, publication).ok()?
                    }
                };
                let op = match format {
                    Format::Json => OpCode::Text,
                    Format::Protobuf => OpCode::Binary,
                };
                let frame = codec::encode_frame(op, &message);
                let payload = frame.slice(frame.len() - message.len()..);
                Some((frame, payload))
            })
            .clone()
    }
}

/// The payload of a whole unmasked frame the server built (its header: 2, 4 or 10 bytes).
fn wse_payload(frame: &[u8]) -> Option<&[u8]> {
    let header = match frame.get(1)? & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    frame.get(header..)
}

/// A WSE publication's text (`{"tp","e","o", "c":"U","t","p"}`, protocol.md §5) as a
/// Centrifuge publication: its data and offset. Other messages (`c` ≠ `U`) are not
/// publications.
pub fn publication_of(text: &[u8]) -> Option<Publication> {
    #[derive(Deserialize)]
    struct Wse<'a> {
        #[serde(borrow)]
        c: &'a str,
        #[serde(borrow)]
        p: Option<&'a RawValue>,
        o: Option<u64>,
    }
    let m: Wse<'_> = serde_json::from_slice(text).ok()?;
    if m.c != "U" {
        return None;
    }
    Some(Publication {
        data: Bytes::copy_from_slice(m.p?.get().as_bytes()),
        offset: m.o.unwrap_or(0),
        ..Default::default()
    })
}

/// A connection's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// RFC 6455 only: data messages echoed (the conformance route).
    Echo,
    /// The WSE protocol (docs/PROTOCOL.md).
    Wse,
    /// The Centrifuge client protocol v2 in this encoding (docs/CENTRIFUGO.md).
    Centrifuge(Format),
}

/// The choice, and the subprotocol to name in the 101 response (`None`: no header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The protocol.
    pub dialect: Dialect,
    /// One of the client's offers, to select in the response.
    pub subprotocol: Option<&'static str>,
}

impl Choice {
    /// What `request` gets under `cfg`.
    pub fn select(request: &UpgradeRequest, cfg: &Config) -> Self {
        let path = request.path.as_str();
        if cfg.server.echo_path.as_deref() == Some(path) {
            return Self {
                dialect: Dialect::Echo,
                subprotocol: None,
            };
        }
        if !(cfg.centrifuge.enabled && cfg.centrifuge.path == path) {
            return Self {
                dialect: Dialect::Wse,
                subprotocol: None,
            };
        }
        let offered = |name: &str| {
            request
                .protocols
                .as_deref()
                .is_some_and(|list| list.split(',').any(|p| p.trim() == name))
        };
        let (format, subprotocol) = if offered(PROTOBUF_SUBPROTOCOL) {
            (Format::Protobuf, Some(PROTOBUF_SUBPROTOCOL))
        } else if offered(JSON_SUBPROTOCOL) {
            (Format::Json, Some(JSON_SUBPROTOCOL))
        } else {
            let asked = request.query.as_deref().is_some_and(|q| {
                ["format", "cf_protocol"]
                    .iter()
                    .any(|name| query_param(q, name).is_some_and(|v| v == "protobuf"))
            });
            let format = if asked {
                Format::Protobuf
            } else {
                Format::Json
            };
            (format, None)
        };
        Self {
            dialect: Dialect::Centrifuge(format),
            subprotocol,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, query: Option<&str>, protocols: Option<&str>) -> UpgradeRequest {
        UpgradeRequest {
            path: path.into(),
            query: query.map(Into::into),
            protocols: protocols.map(Into::into),
            ..UpgradeRequest::default()
        }
    }

    fn choose(path: &str, query: Option<&str>, protocols: Option<&str>) -> Choice {
        let mut cfg = Config::default();
        cfg.server.echo_path = Some("/echo".into());
        Choice::select(&request(path, query, protocols), &cfg)
    }

    #[test]
    fn a_wse_publication_becomes_a_centrifuge_push_once_per_format() {
        let body = crate::protocol::publication(
            "chat",
            &RawValue::from_string("{\"x\":1}".into()).unwrap(),
        );
        let stamped = crate::protocol::stamped("room:main", 0xbeef, 7, &body);
        let wse = codec::encode_frame(OpCode::Text, &stamped);
        let mut d = Delivery::new(Some("room:main"), &wse);
        let (frame, payload) = d.centrifuge(Format::Json).unwrap();
        assert_eq!(
            &payload[..],
            br#"{"push":{"channel":"room:main","pub":{"data":{"x":1},"offset":7}}}"#
        );
        assert_eq!(&frame[..2], &[0x81, payload.len() as u8]);
        // The same buffer the second time: made once.
        let (again, _) = d.centrifuge(Format::Json).unwrap();
        assert_eq!(again.as_ptr(), frame.as_ptr());
        let (proto, _) = d.centrifuge(Format::Protobuf).unwrap();
        assert_eq!(proto[0], 0x82);
        // Not a publication (a presence event), or no topic (a per-connection send).
        let presence =
            codec::encode_frame(OpCode::Text, br#"{"c":"WSE","t":"presence_join","p":{}}"#);
        assert!(
            Delivery::new(Some("t"), &presence)
                .centrifuge(Format::Json)
                .is_none()
        );
        assert!(Delivery::new(None, &wse).centrifuge(Format::Json).is_none());
        // A long frame (16-bit length).
        let big = format!(
            "{{\"c\":\"U\",\"t\":\"e\",\"p\":\"{}\",\"v\":1}}",
            "a".repeat(300)
        );
        let wse = codec::encode_frame(OpCode::Text, big.as_bytes());
        let (_, payload) = Delivery::new(Some("t"), &wse)
            .centrifuge(Format::Json)
            .unwrap();
        assert!(payload.ends_with(b"aaa\"}}}"), "no offset when unstamped");
    }

    #[test]
    fn the_path_picks_the_protocol() {
        assert_eq!(choose("/echo", None, None).dialect, Dialect::Echo);
        assert_eq!(choose("/wse", None, None).dialect, Dialect::Wse);
        assert_eq!(
            choose("/", None, Some("centrifuge-protobuf")).dialect,
            Dialect::Wse
        );
        assert_eq!(
            choose("/connection/websocket", None, None),
            Choice {
                dialect: Dialect::Centrifuge(Format::Json),
                subprotocol: None
            }
        );
        let mut cfg = Config::default();
        cfg.centrifuge.enabled = false;
        let off = Choice::select(&request("/connection/websocket", None, None), &cfg);
        assert_eq!(off.dialect, Dialect::Wse);
    }

    #[test]
    fn the_encoding_comes_from_the_offers_then_the_query() {
        let path = "/connection/websocket";
        assert_eq!(
            choose(path, None, Some("centrifuge-json, centrifuge-protobuf")),
            Choice {
                dialect: Dialect::Centrifuge(Format::Protobuf),
                subprotocol: Some("centrifuge-protobuf")
            }
        );
        assert_eq!(
            choose(path, None, Some("centrifuge-json")),
            Choice {
                dialect: Dialect::Centrifuge(Format::Json),
                subprotocol: Some("centrifuge-json")
            }
        );
        for query in ["format=protobuf", "x=1&cf_protocol=protobuf"] {
            assert_eq!(
                choose(path, Some(query), Some("other")),
                Choice {
                    dialect: Dialect::Centrifuge(Format::Protobuf),
                    subprotocol: None
                },
                "{query}"
            );
        }
        assert_eq!(
            choose(path, Some("format=json"), None).dialect,
            Dialect::Centrifuge(Format::Json)
        );
    }
}
