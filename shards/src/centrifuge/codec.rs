//! Framing of the two Centrifuge encodings, sans-IO: a WebSocket message in, commands out (one
//! at a time, so that each is handled before the next is read); replies and pushes in, message
//! bytes out.
//!
//! - **JSON** (text frames): one command per line, `\n`-separated, in order; blank lines are
//!   skipped. Each line is depth-checked against [`JSON_DEPTH_MAX`] before it is parsed (the
//!   `bytes` fields are kept as raw JSON, which serde does not depth-check, and relayed). Keys
//!   may come in any order (`id` last, as centrifuge-js writes it); unknown keys are ignored.
//! - **Protobuf** (binary frames, subprotocol `centrifuge-protobuf`): each message is preceded
//!   by its length as a varint. The ping is an empty Reply (one `0x00` byte), the pong an empty
//!   Command.
//!
//! Owns: the split and the encodings. Never: decides what a command means. The message as a
//! whole is bounded by `limits.max_message_size` (the WebSocket codec), and the number of
//! commands in it by [`COMMANDS_PER_MESSAGE_MAX`].

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;

use super::proto::{Command, Reply};
use crate::protocol::{JSON_DEPTH_MAX, nests_deeper_than};

/// Most commands one WebSocket message may carry; past it the connection is closed with 3501
/// (after the earlier ones were handled). centrifuge-js sends a connect and every pending
/// subscribe in one message, and a connection has at most `centrifuge.channel_limit` (128 by
/// default) channels, so this leaves room for a large limit while bounding the work and the
/// replies one message can cause.
pub const COMMANDS_PER_MESSAGE_MAX: usize = 1024;

/// The connection's encoding, chosen at the upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// JSON lines in text frames (the default).
    Json,
    /// Varint-delimited protobuf in binary frames (`centrifuge-protobuf`).
    Protobuf,
}

/// The WebSocket subprotocol that selects [`Format::Protobuf`].
pub const PROTOBUF_SUBPROTOCOL: &str = "centrifuge-protobuf";
/// The WebSocket subprotocol that names [`Format::Json`] (the default without one).
pub const JSON_SUBPROTOCOL: &str = "centrifuge-json";

impl Format {
    /// Whether messages in this encoding go in binary frames.
    pub fn is_binary(self) -> bool {
        self == Self::Protobuf
    }
}

/// Why a message could not be read; the connection is closed with 3501.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A JSON line nests deeper than [`JSON_DEPTH_MAX`].
    #[error("command nests deeper than {JSON_DEPTH_MAX} levels")]
    TooDeep,
    /// Not a JSON command object.
    #[error("malformed JSON command")]
    BadJson,
    /// A varint length that runs past the message, or a protobuf message that does not decode.
    #[error("malformed protobuf command")]
    BadProtobuf,
    /// More than [`COMMANDS_PER_MESSAGE_MAX`] commands in one message.
    #[error("more than {COMMANDS_PER_MESSAGE_MAX} commands in one message")]
    TooManyCommands,
}

/// The commands of one WebSocket message, decoded one at a time, in order.
pub struct Commands<'a> {
    format: Format,
    rest: &'a [u8],
    count: usize,
    failed: bool,
}

impl<'a> Commands<'a> {
    /// Reads `message` in `format`.
    pub fn new(format: Format, message: &'a [u8]) -> Self {
        Self {
            format,
            rest: message,
            count: 0,
            failed: false,
        }
    }
}

impl Iterator for Commands<'_> {
    type Item = Result<Command, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = match self.format {
            Format::Json => self.next_json()?,
            Format::Protobuf => self.next_protobuf()?,
        };
        self.count += 1;
        let item = if self.count > COMMANDS_PER_MESSAGE_MAX {
            Err(DecodeError::TooManyCommands)
        } else {
            item
        };
        self.failed = item.is_err();
        Some(item)
    }
}

impl Commands<'_> {
    fn next_json(&mut self) -> Option<Result<Command, DecodeError>> {
        loop {
            if self.rest.is_empty() {
                return None;
            }
            let (line, rest) = match self.rest.iter().position(|&b| b == b'\n') {
                Some(at) => (&self.rest[..at], &self.rest[at + 1..]),
                None => (self.rest, &[][..]),
            };
            self.rest = rest;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if nests_deeper_than(line, JSON_DEPTH_MAX) {
                return Some(Err(DecodeError::TooDeep));
            }
            return Some(serde_json::from_slice(line).map_err(|_| DecodeError::BadJson));
        }
    }

    fn next_protobuf(&mut self) -> Option<Result<Command, DecodeError>> {
        if self.rest.is_empty() {
            return None;
        }
        let mut buf = self.rest;
        let Ok(len) = prost::encoding::decode_varint(&mut buf) else {
            return Some(Err(DecodeError::BadProtobuf));
        };
        let Some(body) = usize::try_from(len).ok().and_then(|len| buf.get(..len)) else {
            return Some(Err(DecodeError::BadProtobuf));
        };
        self.rest = &buf[body.len()..];
        // prost bounds its own recursion (100 nested messages), so a deep tags filter is an error,
        // not a stack overflow.
        Some(Command::decode(body).map_err(|_| DecodeError::BadProtobuf))
    }
}

/// Encodes one reply or push as a complete WebSocket message in `format`.
///
/// # Errors
/// Only in JSON, when a `bytes` field does not hold JSON text (the session never lets such
/// data in; the caller closes with 3506, as Centrifuge does for binary data to a JSON client).
pub fn encode(format: Format, reply: &Reply) -> Result<Bytes, EncodeError> {
    match format {
        Format::Json => serde_json::to_vec(reply)
            .map(Bytes::from)
            .map_err(|_| EncodeError::NotJson),
        Format::Protobuf => {
            let len = reply.encoded_len();
            let mut out =
                BytesMut::with_capacity(len + prost::encoding::encoded_len_varint(len as u64));
            prost::encoding::encode_varint(len as u64, &mut out);
            reply
                .encode(&mut out)
                .expect("the buffer was sized for the message");
            Ok(out.freeze())
        }
    }
}

/// Appends `messages` (each encoded by [`encode`]) into one WebSocket message: JSON lines
/// joined with `\n`, protobuf messages back to back.
pub fn join(format: Format, messages: &[Bytes]) -> Bytes {
    let total: usize = messages.iter().map(Bytes::len).sum::<usize>() + messages.len();
    let mut out = BytesMut::with_capacity(total);
    for (i, m) in messages.iter().enumerate() {
        if i > 0 && format == Format::Json {
            out.put_u8(b'\n');
        }
        out.put_slice(m);
    }
    out.freeze()
}

/// A field that the JSON encoding cannot carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A `bytes` field is not JSON text.
    #[error("data is not JSON")]
    NotJson,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::centrifuge::proto::{ConnectResult, Publication, Push};

    fn json_commands(message: &str) -> Vec<Result<Command, DecodeError>> {
        Commands::new(Format::Json, message.as_bytes()).collect()
    }

    #[test]
    fn json_lines_in_order_with_id_anywhere() {
        // centrifuge-js 5.7.4's first message (spec §1.9), id after the body.
        let message = "{\"connect\":{\"token\":\"t\",\"name\":\"js\"},\"id\":1}\n\
                       {\"subscribe\":{\"channel\":\"room:main\",\"flag\":1},\"id\":2}\n";
        let commands: Vec<Command> = json_commands(message)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(commands.len(), 2);
        assert_eq!(commands[0].id, 1);
        let connect = commands[0].connect.as_ref().unwrap();
        assert_eq!((connect.token.as_str(), connect.name.as_str()), ("t", "js"));
        assert_eq!(commands[1].id, 2);
        let sub = commands[1].subscribe.as_ref().unwrap();
        assert_eq!((sub.channel.as_str(), sub.flag), ("room:main", 1));
    }

    #[test]
    fn python_spacing_and_raw_json_data() {
        let c = json_commands(
            "{\"id\": 3, \"publish\": {\"channel\": \"room:main\", \"data\": {\"text\": \"hi\", \"n\": [1, 2]}}}",
        );
        let publish = c[0].as_ref().unwrap().publish.clone().unwrap();
        assert_eq!(&publish.data[..], b"{\"text\": \"hi\", \"n\": [1, 2]}");
    }

    #[test]
    fn empty_object_is_the_pong_and_blank_lines_are_skipped() {
        let c = json_commands("{}\n\n  \n");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].as_ref().unwrap(), &Command::default());
    }

    #[test]
    fn a_bad_line_stops_the_message_after_the_good_ones() {
        let c = json_commands("{\"id\":1,\"ping\":{}}\nnot json\n{\"id\":2,\"ping\":{}}");
        assert_eq!(c.len(), 2);
        assert!(c[0].is_ok());
        assert_eq!(c[1], Err(DecodeError::BadJson));
        let deep = format!(
            "{{\"id\":1,\"send\":{{\"data\":{}1{}}}}}",
            "[".repeat(JSON_DEPTH_MAX),
            "]".repeat(JSON_DEPTH_MAX)
        );
        assert_eq!(json_commands(&deep), [Err(DecodeError::TooDeep)]);
        assert_eq!(
            json_commands("{\"id\":4294967296,\"ping\":{}}"),
            [Err(DecodeError::BadJson)]
        );
    }

    #[test]
    fn the_number_of_commands_per_message_is_bounded() {
        let message = "{}\n".repeat(COMMANDS_PER_MESSAGE_MAX + 5);
        let c = json_commands(&message);
        assert_eq!(c.len(), COMMANDS_PER_MESSAGE_MAX + 1);
        assert_eq!(c.last().unwrap(), &Err(DecodeError::TooManyCommands));
    }

    #[test]
    fn protobuf_is_varint_delimited_with_the_published_field_numbers() {
        // Command{id: 1 (field 1), connect (field 4): {token: "t" (1), name: "python" (4)}},
        // then the pong (an empty command), written out by hand from client.proto.
        let connect = [
            0x0a, 0x01, b't', 0x22, 0x06, b'p', b'y', b't', b'h', b'o', b'n',
        ];
        let mut command = vec![0x08, 0x01, 0x22, connect.len() as u8];
        command.extend_from_slice(&connect);
        let mut message = vec![command.len() as u8];
        message.extend_from_slice(&command);
        message.push(0x00);
        let c: Vec<_> = Commands::new(Format::Protobuf, &message).collect();
        assert_eq!(c.len(), 2);
        let first = c[0].as_ref().unwrap();
        assert_eq!(first.id, 1);
        let req = first.connect.as_ref().unwrap();
        assert_eq!((req.token.as_str(), req.name.as_str()), ("t", "python"));
        assert_eq!(c[1].as_ref().unwrap(), &Command::default());

        let truncated = [0x05, 0x08];
        let c: Vec<_> = Commands::new(Format::Protobuf, &truncated).collect();
        assert_eq!(c, [Err(DecodeError::BadProtobuf)]);
    }

    #[test]
    fn replies_encode_byte_exact() {
        let reply = Reply {
            id: 1,
            connect: Some(ConnectResult {
                client: "c1".into(),
                version: "0.1.0".into(),
                ping: 25,
                pong: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            &encode(Format::Json, &reply).unwrap()[..],
            br#"{"id":1,"connect":{"client":"c1","version":"0.1.0","ping":25,"pong":true}}"#
        );
        // Reply{id 1 (field 1), connect (field 5): {client (1), version (2), ping (7), pong (8)}}
        let inner = [
            0x0a, 0x02, b'c', b'1', 0x12, 0x05, b'0', b'.', b'1', b'.', b'0', 0x38, 25, 0x40, 1,
        ];
        let mut want = vec![
            2 + 2 + inner.len() as u8,
            0x08,
            0x01,
            0x2a,
            inner.len() as u8,
        ];
        want.extend_from_slice(&inner);
        assert_eq!(&encode(Format::Protobuf, &reply).unwrap()[..], &want[..]);

        // The ping: an empty reply.
        assert_eq!(&encode(Format::Json, &Reply::default()).unwrap()[..], b"{}");
        assert_eq!(
            &encode(Format::Protobuf, &Reply::default()).unwrap()[..],
            [0]
        );
    }

    #[test]
    fn publication_push_embeds_data_as_json() {
        let reply = Reply {
            push: Some(Push {
                channel: "room:main".into(),
                publication: Some(Publication {
                    data: Bytes::from_static(b"{\"text\":\"hi\"}"),
                    offset: 7,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            &encode(Format::Json, &reply).unwrap()[..],
            br#"{"push":{"channel":"room:main","pub":{"data":{"text":"hi"},"offset":7}}}"#
        );
        let mut binary = reply.clone();
        binary
            .push
            .as_mut()
            .unwrap()
            .publication
            .as_mut()
            .unwrap()
            .data = Bytes::from_static(&[0xff, 0x00]);
        assert_eq!(encode(Format::Json, &binary), Err(EncodeError::NotJson));
        let encoded = encode(Format::Protobuf, &binary).unwrap();
        let mut body = &encoded[..];
        let len = prost::encoding::decode_varint(&mut body).unwrap();
        assert_eq!(len as usize, body.len());
        assert_eq!(Reply::decode(body).unwrap(), binary);
    }

    #[test]
    fn joined_messages() {
        let a = Bytes::from_static(b"{\"id\":1}");
        let b = Bytes::from_static(b"{}");
        assert_eq!(
            &join(Format::Json, &[a.clone(), b.clone()])[..],
            b"{\"id\":1}\n{}"
        );
        assert_eq!(&join(Format::Protobuf, &[a, b])[..], b"{\"id\":1}{}");
    }
}
