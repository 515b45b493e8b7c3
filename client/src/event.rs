//! Decoded server messages and the wire decoder.

use std::io::Read;

use serde_json::Value;

use crate::error::{Error, Result};

/// Largest decompressed size accepted for a `C:` (zlib) frame.
pub const MAX_DECOMPRESSED: usize = 64 << 20;

/// How the frame that carried an [`Event`] was encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// A text frame holding JSON (possibly with a legacy `WSE`/`S`/`U` prefix).
    #[default]
    Text,
    /// A binary frame holding UTF-8 JSON.
    BinaryJson,
    /// A binary frame `C:` + zlib-compressed JSON.
    Zlib,
    /// A binary frame that is a bare zlib stream (first byte `0x78`), as the Python client accepts.
    RawZlib,
    /// A binary frame `M:` + MessagePack.
    MsgPack,
}

/// One WSE message received from the server.
///
/// A `batch` message is unpacked: each of its messages becomes one `Event` (with
/// [`batched`](Self::batched) set), in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    /// Category: the legacy text prefix (`WSE`, `S`, `U`) when there was one, else the `c` field.
    pub c: Option<String>,
    /// Message type (the `t` field).
    pub t: String,
    /// Payload (the `p` field; `Null` when absent).
    pub p: Value,
    /// The whole decoded JSON object.
    pub raw: Value,
    /// The exact JSON text of the frame: set for text frames (prefix included) and for binary frames
    /// carrying JSON text (after `C:` decompression). `None` for MessagePack frames and batch members.
    pub text: Option<String>,
    /// Whether the frame was a binary WebSocket frame.
    pub binary: bool,
    /// How the frame was encoded.
    pub encoding: Encoding,
    /// Whether this event was unpacked from a `batch` message.
    pub batched: bool,
    /// Size of the WebSocket frame payload that carried this event, in bytes (before decompression).
    pub frame_len: usize,
    /// Recovery stamp `tp`: the topic of a stamped publication.
    pub topic: Option<String>,
    /// Recovery stamp `e`: the topic history's epoch.
    pub epoch: Option<String>,
    /// Recovery stamp `o`: the publication's offset in the topic.
    pub offset: Option<u64>,
}

impl Event {
    /// `p.code` as a string, e.g. `"AUTH_FAILED"` for an `error` event.
    pub fn code(&self) -> Option<&str> {
        self.p.get("code").and_then(Value::as_str)
    }

    /// Whether this is an `error` event.
    pub fn is_error(&self) -> bool {
        self.t == "error"
    }

    /// The frame text when there is one, else the decoded JSON re-serialised (for messages in
    /// assertions and logs).
    pub fn describe(&self) -> String {
        match &self.text {
            Some(text) => text.clone(),
            None => self.raw.to_string(),
        }
    }
}

/// Frame-level facts shared by every event decoded from one frame.
#[derive(Clone, Copy)]
struct FrameInfo {
    binary: bool,
    encoding: Encoding,
    frame_len: usize,
}

/// Decodes a text frame into its events (one, or several for a `batch`; none for an empty batch).
///
/// Accepts plain JSON objects and the legacy prefixes `WSE{`, `S{`, `U{` (the prefix becomes the
/// category). Anything else is an [`Error::Protocol`].
pub fn decode_text(text: &str) -> Result<Vec<Event>> {
    let info = FrameInfo {
        binary: false,
        encoding: Encoding::Text,
        frame_len: text.len(),
    };
    decode_json_text(text, info)
}

/// Decodes a binary frame into its events.
///
/// `C:` + zlib, `M:` + MessagePack, a bare zlib stream, else UTF-8 JSON (legacy prefixes
/// accepted). `E:` (encrypted) frames are not supported and give an [`Error::Protocol`].
pub fn decode_binary(data: &[u8]) -> Result<Vec<Event>> {
    let frame_len = data.len();
    let info = |encoding| FrameInfo {
        binary: true,
        encoding,
        frame_len,
    };
    if let Some(rest) = data.strip_prefix(b"C:") {
        let text = inflate(rest)?;
        return decode_json_text(&text, info(Encoding::Zlib));
    }
    if let Some(rest) = data.strip_prefix(b"M:") {
        let value: Value = rmp_serde::from_slice(rest)
            .map_err(|e| Error::Protocol(format!("invalid MessagePack in M: frame: {e}")))?;
        return events_from_value(value, None, None, info(Encoding::MsgPack));
    }
    if data.starts_with(b"E:") {
        return Err(Error::Protocol(
            "received an encrypted (E:) frame; encryption is not supported by this client".into(),
        ));
    }
    if data.len() >= 2 && data[0] == 0x78 && matches!(data[1], 0x01 | 0x5E | 0x9C | 0xDA) {
        let text = inflate(data)?;
        return decode_json_text(&text, info(Encoding::RawZlib));
    }
    let text = std::str::from_utf8(data).map_err(|e| {
        Error::Protocol(format!(
            "binary frame is neither C:, M: nor UTF-8 JSON ({e}); first bytes {:?}",
            &data[..data.len().min(32)]
        ))
    })?;
    decode_json_text(text, info(Encoding::BinaryJson))
}

fn inflate(data: &[u8]) -> Result<String> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data)
        .take(MAX_DECOMPRESSED as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::Protocol(format!("corrupt zlib frame: {e}")))?;
    if out.len() > MAX_DECOMPRESSED {
        return Err(Error::Protocol(format!(
            "zlib frame decompresses to more than {MAX_DECOMPRESSED} bytes"
        )));
    }
    String::from_utf8(out)
        .map_err(|e| Error::Protocol(format!("zlib frame does not hold UTF-8 text: {e}")))
}

fn decode_json_text(text: &str, info: FrameInfo) -> Result<Vec<Event>> {
    let (category, json) = strip_prefix(text);
    let value: Value = serde_json::from_str(json)
        .map_err(|e| Error::Protocol(format!("invalid JSON ({e}) in frame: {}", snippet(text))))?;
    events_from_value(value, category, Some(text), info)
}

fn strip_prefix(text: &str) -> (Option<&'static str>, &str) {
    if text.starts_with("WSE{") {
        (Some("WSE"), &text[3..])
    } else if text.starts_with("S{") {
        (Some("S"), &text[1..])
    } else if text.starts_with("U{") {
        (Some("U"), &text[1..])
    } else {
        (None, text)
    }
}

fn snippet(text: &str) -> String {
    const MAX: usize = 300;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

fn events_from_value(
    value: Value,
    category: Option<&str>,
    text: Option<&str>,
    info: FrameInfo,
) -> Result<Vec<Event>> {
    let mut out = Vec::new();
    push_events(value, category, text, info, false, 0, &mut out)?;
    Ok(out)
}

fn push_events(
    value: Value,
    category: Option<&str>,
    text: Option<&str>,
    info: FrameInfo,
    batched: bool,
    depth: usize,
    out: &mut Vec<Event>,
) -> Result<()> {
    let describe = || text.map_or_else(|| snippet(&value.to_string()), snippet);
    let Some(obj) = value.as_object() else {
        return Err(Error::Protocol(format!(
            "message is not a JSON object: {}",
            describe()
        )));
    };
    let t = match obj.get("t") {
        Some(Value::String(t)) => t.clone(),
        Some(_) => {
            return Err(Error::Protocol(format!(
                "message field `t` is not a string: {}",
                describe()
            )));
        }
        None => {
            return Err(Error::Protocol(format!(
                "message has no `t` field: {}",
                describe()
            )));
        }
    };
    let p = obj.get("p").cloned().unwrap_or(Value::Null);

    if t == "batch"
        && let Some(messages) = p.get("messages")
    {
        let Value::Array(messages) = messages else {
            return Err(Error::Protocol(format!(
                "batch `p.messages` is not an array: {}",
                describe()
            )));
        };
        if depth >= 8 {
            return Err(Error::Protocol("batches nested too deeply".into()));
        }
        for message in messages {
            push_events(message.clone(), category, None, info, true, depth + 1, out)?;
        }
        return Ok(());
    }

    let c = match (category, obj.get("c")) {
        (Some(prefix), _) => Some(prefix.to_owned()),
        (None, Some(Value::String(c))) => Some(c.clone()),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(Error::Protocol(format!(
                "message field `c` is not a string: {}",
                describe()
            )));
        }
    };
    let topic = match obj.get("tp") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(Error::Protocol(format!(
                "stamp `tp` is not a string: {}",
                describe()
            )));
        }
    };
    let epoch = match obj.get("e") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(Error::Protocol(format!(
                "stamp `e` is not a string: {}",
                describe()
            )));
        }
    };
    let offset = match obj.get("o") {
        None => None,
        Some(o) => Some(o.as_u64().ok_or_else(|| {
            Error::Protocol(format!(
                "stamp `o` is not a non-negative integer: {}",
                describe()
            ))
        })?),
    };
    out.push(Event {
        c,
        t,
        p,
        text: if batched {
            None
        } else {
            text.map(str::to_owned)
        },
        binary: info.binary,
        encoding: info.encoding,
        batched,
        frame_len: info.frame_len,
        topic,
        epoch,
        offset,
        raw: value,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Write;

    fn one(events: Vec<Event>) -> Event {
        assert_eq!(events.len(), 1, "{events:?}");
        events.into_iter().next().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn text_json() {
        let text =
            r#"{"c":"WSE","t":"server_ready","p":{"details":{"connection_id":"abc"}},"v":1}"#;
        let ev = one(decode_text(text).unwrap());
        assert_eq!(ev.c.as_deref(), Some("WSE"));
        assert_eq!(ev.t, "server_ready");
        assert_eq!(ev.p["details"]["connection_id"], "abc");
        assert_eq!(ev.raw["v"], 1);
        assert_eq!(ev.text.as_deref(), Some(text));
        assert!(!ev.binary);
        assert_eq!(ev.encoding, Encoding::Text);
        assert!(!ev.batched);
        assert_eq!(ev.frame_len, text.len());
        assert_eq!((ev.topic, ev.epoch, ev.offset), (None, None, None));
    }

    #[test]
    fn text_without_c_or_p() {
        let ev = one(decode_text(r#"{"t":"tick"}"#).unwrap());
        assert_eq!(ev.c, None);
        assert_eq!(ev.t, "tick");
        assert_eq!(ev.p, Value::Null);
    }

    #[test]
    fn legacy_prefixes() {
        let ev = one(decode_text(r#"WSE{"t":"PONG","p":{"x":1}}"#).unwrap());
        assert_eq!(ev.c.as_deref(), Some("WSE"));
        assert_eq!(ev.t, "PONG");
        assert_eq!(ev.p["x"], 1);
        assert_eq!(ev.text.as_deref(), Some(r#"WSE{"t":"PONG","p":{"x":1}}"#));

        // The prefix wins over a `c` field.
        let ev = one(decode_text(r#"S{"c":"U","t":"snapshot","p":{}}"#).unwrap());
        assert_eq!(ev.c.as_deref(), Some("S"));
        assert_eq!(ev.t, "snapshot");

        let ev = one(decode_text(r#"U{"t":"order","p":[1,2]}"#).unwrap());
        assert_eq!(ev.c.as_deref(), Some("U"));
        assert_eq!(ev.p, json!([1, 2]));

        // Prefixes also apply to JSON in binary frames.
        let ev = one(decode_binary(br#"U{"t":"order","p":{}}"#).unwrap());
        assert_eq!(ev.c.as_deref(), Some("U"));
        assert_eq!(ev.encoding, Encoding::BinaryJson);
    }

    #[test]
    fn binary_json() {
        let data = br#"{"c":"U","t":"evt","p":{"a":"b"}}"#;
        let ev = one(decode_binary(data).unwrap());
        assert!(ev.binary);
        assert_eq!(ev.encoding, Encoding::BinaryJson);
        assert_eq!(ev.t, "evt");
        assert_eq!(ev.text.as_deref(), Some(std::str::from_utf8(data).unwrap()));
        assert_eq!(ev.frame_len, data.len());
    }

    #[test]
    fn zlib_c_prefix() {
        let json = r#"{"c":"U","t":"big","p":{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#;
        let mut frame = b"C:".to_vec();
        frame.extend(zlib(json.as_bytes()));
        let ev = one(decode_binary(&frame).unwrap());
        assert_eq!(ev.encoding, Encoding::Zlib);
        assert!(ev.binary);
        assert_eq!(ev.t, "big");
        assert_eq!(ev.text.as_deref(), Some(json));
        assert_eq!(ev.frame_len, frame.len());
    }

    #[test]
    fn raw_zlib() {
        let json = r#"{"t":"z","p":{}}"#;
        let ev = one(decode_binary(&zlib(json.as_bytes())).unwrap());
        assert_eq!(ev.encoding, Encoding::RawZlib);
        assert_eq!(ev.t, "z");
    }

    #[test]
    fn corrupt_zlib_is_an_error() {
        let err = decode_binary(b"C:\x78\x9cnot zlib at all").unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    }

    #[test]
    fn msgpack_m_prefix() {
        let value = json!({"c":"U","t":"mp","p":{"n":5,"s":"x","l":[true,null]},"tp":"t1","e":"0a0b0c0d","o":3});
        let mut frame = b"M:".to_vec();
        frame.extend(rmp_serde::to_vec_named(&value).unwrap());
        let ev = one(decode_binary(&frame).unwrap());
        assert_eq!(ev.encoding, Encoding::MsgPack);
        assert!(ev.binary);
        assert_eq!(ev.text, None);
        assert_eq!(ev.t, "mp");
        assert_eq!(ev.c.as_deref(), Some("U"));
        assert_eq!(ev.p, json!({"n":5,"s":"x","l":[true,null]}));
        assert_eq!(ev.raw, value);
        assert_eq!(ev.topic.as_deref(), Some("t1"));
        assert_eq!(ev.epoch.as_deref(), Some("0a0b0c0d"));
        assert_eq!(ev.offset, Some(3));
    }

    #[test]
    fn batch_is_unpacked_in_order() {
        let text = r#"{"c":"WSE","t":"batch","p":{"messages":[{"c":"U","t":"a","p":{"i":1}},{"t":"b","p":{"i":2},"tp":"x","e":"00000001","o":7},{"t":"batch","p":{"messages":[{"t":"c"}]}}],"count":3},"v":1}"#;
        let evs = decode_text(text).unwrap();
        let types: Vec<_> = evs.iter().map(|e| e.t.as_str()).collect();
        assert_eq!(types, ["a", "b", "c"]);
        assert!(evs.iter().all(|e| e.batched && e.text.is_none()));
        assert_eq!(evs[0].c.as_deref(), Some("U"));
        assert_eq!(evs[0].p["i"], 1);
        assert_eq!(evs[1].c, None);
        assert_eq!(evs[1].offset, Some(7));
        assert_eq!(evs[1].topic.as_deref(), Some("x"));
        assert_eq!(evs[0].frame_len, text.len());

        assert!(
            decode_text(r#"{"t":"batch","p":{"messages":[]}}"#)
                .unwrap()
                .is_empty()
        );
        // A batch message in a compressed frame.
        let mut frame = b"C:".to_vec();
        frame.extend(zlib(
            br#"{"t":"batch","p":{"messages":[{"t":"a"},{"t":"b"}]}}"#,
        ));
        let evs = decode_binary(&frame).unwrap();
        assert_eq!(evs.len(), 2);
        assert!(
            evs.iter()
                .all(|e| e.encoding == Encoding::Zlib && e.batched)
        );
    }

    #[test]
    fn batch_without_messages_is_an_event() {
        let ev = one(decode_text(r#"{"t":"batch","p":{"other":1}}"#).unwrap());
        assert_eq!(ev.t, "batch");
    }

    #[test]
    fn recovery_stamps() {
        let text = r#"{"tp":"prices","e":"deadbeef","o":42,"c":"U","t":"tick","p":{"v":1},"v":1}"#;
        let ev = one(decode_text(text).unwrap());
        assert_eq!(ev.topic.as_deref(), Some("prices"));
        assert_eq!(ev.epoch.as_deref(), Some("deadbeef"));
        assert_eq!(ev.offset, Some(42));
        assert_eq!(ev.t, "tick");

        for bad in [
            r#"{"t":"x","o":-1}"#,
            r#"{"t":"x","o":"5"}"#,
            r#"{"t":"x","o":1.5}"#,
            r#"{"t":"x","e":7}"#,
            r#"{"t":"x","tp":null}"#,
        ] {
            assert!(
                matches!(decode_text(bad), Err(Error::Protocol(_))),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn malformed_messages_are_errors() {
        for bad in [
            "not json",
            "[1,2]",
            r#""str""#,
            r#"{"p":{}}"#,
            r#"{"t":5}"#,
            r#"{"t":"x","c":1}"#,
            r#"{"t":"batch","p":{"messages":{}}}"#,
            r#"{"t":"batch","p":{"messages":[1]}}"#,
            "WSE{not json",
        ] {
            assert!(
                matches!(decode_text(bad), Err(Error::Protocol(_))),
                "{bad:?} should be rejected"
            );
        }
        assert!(matches!(
            decode_binary(b"E:\x00\x01"),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            decode_binary(b"\xff\xfe\x00"),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(decode_binary(b"M:\xc1"), Err(Error::Protocol(_))));
    }

    #[test]
    fn error_event_helpers() {
        let ev = one(decode_text(
            r#"{"c":"WSE","t":"error","p":{"code":"AUTH_FAILED","message":"bad"}}"#,
        )
        .unwrap());
        assert!(ev.is_error());
        assert_eq!(ev.code(), Some("AUTH_FAILED"));
        assert!(ev.describe().contains("AUTH_FAILED"));
    }
}
