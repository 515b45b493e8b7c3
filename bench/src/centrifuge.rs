//! The Centrifuge client protocol v2 as the load generator speaks it (JSON, and protobuf with
//! the `centrifuge-protobuf` subprotocol): the few commands it sends (`connect`, `subscribe`,
//! the pong), splitting a server message into its replies and pushes, and reading a reply's id
//! and error code.
//!
//! Never: touches sockets or WebSocket framing ([`crate::conn`] does), parses pushes (a
//! publication's data is the publisher's JSON, embedded verbatim in both encodings, so the
//! benchmark stamp is found in a push by the same substring scan as in a WSE message).
//!
//! JSON is written and read by hand (compact, `id` first, as the server writes it); protobuf
//! uses the server engine's message definitions, which the load generator already links.

use std::ops::ControlFlow;

use prost::Message as _;
use serde::{Deserialize, Serialize};
use wse_shards::centrifuge::proto::{Command, ConnectRequest, Reply, SubscribeRequest};

/// The subprotocol that selects the protobuf encoding at the upgrade.
pub const PROTOBUF_SUBPROTOCOL: &str = "centrifuge-protobuf";

/// Protobuf field tag byte of `Reply.id` (field 1, varint): present on replies, absent on
/// pushes and pings (id 0 is not written).
const PROTOBUF_REPLY_ID_TAG: u8 = 0x08;

/// The Centrifuge encoding a connection uses.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Text frames, one JSON object per line.
    #[default]
    Json,
    /// Binary frames, varint-length-delimited protobuf messages.
    Protobuf,
}

/// One server message inside a WebSocket message.
#[derive(Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// The server's ping (`{}`, or an empty protobuf `Reply`): answered with [`Format::pong`].
    Ping,
    /// A reply or a push, its bytes as received.
    Message(&'a [u8]),
}

/// What a reply says: its command's id and, when it failed, the error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHead {
    pub id: u32,
    pub error: Option<u32>,
}

impl Format {
    /// The `Sec-WebSocket-Protocol` to offer at the upgrade (`None`: JSON, the default).
    pub fn subprotocol(self) -> Option<&'static str> {
        match self {
            Format::Json => None,
            Format::Protobuf => Some(PROTOBUF_SUBPROTOCOL),
        }
    }

    /// Whether messages go in binary frames.
    pub fn binary(self) -> bool {
        self == Format::Protobuf
    }

    /// The answer to the server's ping: an empty command.
    pub fn pong(self) -> &'static [u8] {
        match self {
            Format::Json => b"{}",
            Format::Protobuf => &[0],
        }
    }

    /// `connect` with `token` as command `id`.
    pub fn connect(self, id: u32, token: &str) -> Vec<u8> {
        match self {
            // A JWT is base64url and dots: nothing to escape.
            Format::Json => {
                format!(r#"{{"id":{id},"connect":{{"token":"{token}"}}}}"#).into_bytes()
            }
            Format::Protobuf => Command {
                id,
                connect: Some(ConnectRequest {
                    token: token.to_owned(),
                    ..ConnectRequest::default()
                }),
                ..Command::default()
            }
            .encode_length_delimited_to_vec(),
        }
    }

    /// One `subscribe` per channel, in one message, with ids `first_id..`.
    pub fn subscribe(self, first_id: u32, channels: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        for (id, channel) in (first_id..).zip(channels) {
            match self {
                Format::Json => {
                    if !out.is_empty() {
                        out.push(b'\n');
                    }
                    let channel = serde_json::to_string(channel).expect("strings serialise");
                    out.extend_from_slice(
                        format!(r#"{{"id":{id},"subscribe":{{"channel":{channel}}}}}"#).as_bytes(),
                    );
                }
                Format::Protobuf => Command {
                    id,
                    subscribe: Some(SubscribeRequest {
                        channel: channel.clone(),
                        ..SubscribeRequest::default()
                    }),
                    ..Command::default()
                }
                .encode_length_delimited(&mut out)
                .expect("a Vec grows"),
            }
        }
        out
    }

    /// Hands each server message in the WebSocket message `data` to `f`, in order, until `f`
    /// breaks.
    ///
    /// # Errors
    /// A protobuf length prefix that is malformed or runs past the message.
    pub fn for_each<'a>(
        self,
        data: &'a [u8],
        mut f: impl FnMut(Item<'a>) -> ControlFlow<()>,
    ) -> Result<(), String> {
        match self {
            Format::Json => {
                for line in data.split(|&b| b == b'\n') {
                    let item = match line {
                        b"" => continue,
                        b"{}" => Item::Ping,
                        m => Item::Message(m),
                    };
                    if f(item).is_break() {
                        break;
                    }
                }
            }
            Format::Protobuf => {
                let mut rest = data;
                while !rest.is_empty() {
                    let len = prost::encoding::decode_varint(&mut rest)
                        .map_err(|e| format!("bad protobuf length: {e}"))?;
                    let len = usize::try_from(len)
                        .ok()
                        .filter(|&l| l <= rest.len())
                        .ok_or("protobuf message runs past its frame")?;
                    let (m, tail) = rest.split_at(len);
                    rest = tail;
                    let item = if m.is_empty() {
                        Item::Ping
                    } else {
                        Item::Message(m)
                    };
                    if f(item).is_break() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The id and error code of a reply; `None` for a push (or anything unreadable).
    pub fn reply_head(self, m: &[u8]) -> Option<ReplyHead> {
        match self {
            Format::Json => {
                let rest = m.strip_prefix(br#"{"id":"#)?;
                let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                let id = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
                let error = rest[digits..]
                    .strip_prefix(br#","error":{"code":"#)
                    .and_then(|e| {
                        let n = e.iter().take_while(|b| b.is_ascii_digit()).count();
                        std::str::from_utf8(&e[..n]).ok()?.parse().ok()
                    });
                let is_error = rest[digits..].starts_with(br#","error":"#);
                Some(ReplyHead {
                    id,
                    // An error whose code cannot be read is still an error.
                    error: if is_error {
                        Some(error.unwrap_or(0))
                    } else {
                        None
                    },
                })
            }
            Format::Protobuf => {
                if m.first() != Some(&PROTOBUF_REPLY_ID_TAG) {
                    return None;
                }
                let reply = Reply::decode(m).ok()?;
                Some(ReplyHead {
                    id: reply.id,
                    error: reply.error.map(|e| e.code),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    fn items(format: Format, data: &[u8]) -> Vec<Item<'_>> {
        let mut out = Vec::new();
        format
            .for_each(data, |i| {
                out.push(i);
                ControlFlow::Continue(())
            })
            .unwrap();
        out
    }

    #[test]
    fn json_commands_and_replies() {
        assert_eq!(
            Format::Json.connect(1, "a.b.c"),
            br#"{"id":1,"connect":{"token":"a.b.c"}}"#
        );
        assert_eq!(
            Format::Json.subscribe(2, &["x.0".into(), "x.1".into()]),
            b"{\"id\":2,\"subscribe\":{\"channel\":\"x.0\"}}\n{\"id\":3,\"subscribe\":{\"channel\":\"x.1\"}}"
        );
        let msg = b"{\"id\":1,\"connect\":{\"client\":\"c\"}}\n{}\n{\"id\":2,\"error\":{\"code\":103,\"message\":\"permission denied\"}}\n{\"push\":{\"channel\":\"x\",\"pub\":{\"data\":{\"bench\":[1,0,0,1,5],\"pad\":\"\"}}}}";
        let got = items(Format::Json, msg);
        assert_eq!(got.len(), 4);
        assert_eq!(got[1], Item::Ping);
        let Item::Message(ok) = got[0] else { panic!() };
        assert_eq!(
            Format::Json.reply_head(ok),
            Some(ReplyHead { id: 1, error: None })
        );
        let Item::Message(err) = got[2] else { panic!() };
        assert_eq!(
            Format::Json.reply_head(err),
            Some(ReplyHead {
                id: 2,
                error: Some(103)
            })
        );
        let Item::Message(push) = got[3] else {
            panic!()
        };
        assert_eq!(Format::Json.reply_head(push), None);
        assert_eq!(wire::parse_stamp(push).unwrap().scheduled_ns, 5);
    }

    #[test]
    fn protobuf_round_trips_through_the_engine_codec() {
        use wse_shards::centrifuge::codec::{Commands, Format as EngineFormat, encode, join};
        use wse_shards::centrifuge::proto::{Error, Publication, Push};

        // What we send, the engine reads.
        let mut sent = Format::Protobuf.connect(1, "tok");
        sent.extend(Format::Protobuf.subscribe(2, &["a".into()]));
        let cmds: Vec<_> = Commands::new(EngineFormat::Protobuf, &sent)
            .map(Result::unwrap)
            .collect();
        assert_eq!(cmds[0].connect.as_ref().unwrap().token, "tok");
        assert_eq!(cmds[1].id, 2);
        assert_eq!(cmds[1].subscribe.as_ref().unwrap().channel, "a");

        // What the engine writes, we read.
        let data = br#"{"bench":[3,0,1,7,9],"pad":""}"#;
        let push = Reply {
            push: Some(Push {
                channel: "a".into(),
                publication: Some(Publication {
                    data: data.to_vec().into(),
                    ..Publication::default()
                }),
                ..Push::default()
            }),
            ..Reply::default()
        };
        let error = Reply {
            id: 2,
            error: Some(Error {
                code: 106,
                ..Error::default()
            }),
            ..Reply::default()
        };
        let parts =
            [&push, &Reply::default(), &error].map(|r| encode(EngineFormat::Protobuf, r).unwrap());
        let msg = join(EngineFormat::Protobuf, &parts);
        let got = items(Format::Protobuf, &msg);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], Item::Ping);
        let Item::Message(p) = got[0] else { panic!() };
        assert_eq!(Format::Protobuf.reply_head(p), None);
        assert_eq!(wire::parse_stamp(p).unwrap().seq, 7);
        let Item::Message(e) = got[2] else { panic!() };
        assert_eq!(
            Format::Protobuf.reply_head(e),
            Some(ReplyHead {
                id: 2,
                error: Some(106)
            })
        );
        assert!(
            Format::Protobuf
                .for_each(&[5, 1], |_| ControlFlow::Continue(()))
                .is_err()
        );
    }
}
