//! The WSE message decoder: `binary_to_json` (`C:` zlib, `M:` MessagePack, `E:`, raw) and
//! `parse_client_message`, against arbitrary bytes, JSON messages of random types and shapes,
//! compressed and MessagePack encodings of them, zlib bombs, truncated and corrupted streams, and
//! deeply nested input.
//!
//! Bounded memory: whatever `binary_to_json` returns is at most the limit it was given, however
//! far the input inflates.

use std::io::Write;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;
use wse_shards::protocol::{
    ClientMessage, InboundError, MSGPACK_DEPTH_MAX, binary_to_json, parse_client_message,
};

use crate::cases;

/// Decodes one frame as a connection does: checks the output bound, then parses the JSON (and a
/// batch's elements). Returns the decoded JSON when there was one.
fn check_frame(payload: &[u8], max: usize) -> Result<Option<Vec<u8>>, TestCaseError> {
    let json = match binary_to_json(payload, max) {
        Ok(json) => json,
        Err(e) => {
            check_error(&e)?;
            if e == InboundError::EncryptionNotEnabled {
                prop_assert!(payload.starts_with(b"E:"));
            }
            return Ok(None);
        }
    };
    if payload.starts_with(b"C:") || payload.starts_with(b"M:") {
        prop_assert!(
            json.len() <= max,
            "{} bytes decoded past a limit of {max}",
            json.len()
        );
    } else {
        prop_assert_eq!(&json[..], payload, "raw payloads pass through unchanged");
    }
    check_message(&json)?;
    Ok(Some(json.into_owned()))
}

fn check_message(json: &[u8]) -> Result<(), TestCaseError> {
    match parse_client_message(json) {
        Ok(ClientMessage::Batch(items)) => {
            for item in items {
                match parse_client_message(item.get().as_bytes()) {
                    Ok(_) => {}
                    Err(e) => check_error(&e)?,
                }
            }
        }
        Ok(ClientMessage::Subscribe(s)) => {
            for t in &s.topics {
                let _ = wse_shards::protocol::topic_problem(t);
            }
            if let Some(g) = &s.queue_group {
                let _ = wse_shards::protocol::queue_group_problem(g);
            }
        }
        Ok(ClientMessage::Publish { topic, .. }) => {
            let _ = wse_shards::protocol::topic_problem(&topic);
        }
        Ok(_) => {}
        Err(e) => check_error(&e)?,
    }
    Ok(())
}

/// Every error is one of the typed ones, with a WSE code and a message to send.
fn check_error(e: &InboundError) -> Result<(), TestCaseError> {
    prop_assert!(matches!(
        e.code().as_str(),
        "INVALID_MESSAGE" | "INVALID_SUBSCRIPTION"
    ));
    prop_assert!(!e.to_string().is_empty());
    Ok(())
}

fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::ZlibEncoder::new(b"C:".to_vec(), flate2::Compression::fast());
    enc.write_all(bytes).expect("writing to a Vec");
    enc.finish().expect("writing to a Vec")
}

fn msgpack(v: &Value) -> Vec<u8> {
    let mut out = b"M:".to_vec();
    out.extend_from_slice(&rmp_serde::to_vec_named(v).expect("a JSON value packs"));
    out
}

// ------------------------------------------------------------------------------------------------
// Strategies
// ------------------------------------------------------------------------------------------------

const TYPES: &[&str] = &[
    "client_hello",
    "ping",
    "PING",
    "pong",
    "PONG",
    "subscription_update",
    "subscription",
    "subscribe",
    "unsubscribe",
    "publish",
    "batch",
    "presence_update",
    "chat.message",
];

const FIELDS: &[&str] = &[
    "protocol_version",
    "timestamp",
    "action",
    "topics",
    "recover",
    "recovery",
    "presence",
    "queue_group",
    "topic",
    "event",
    "data",
    "ack",
    "messages",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z:.*?]{0,12}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    prop::sample::select(FIELDS).prop_map(str::to_owned),
                    ".{0,6}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A payload object: each known field absent, of a plausible shape, or anything at all.
fn payload_object() -> impl Strategy<Value = Value> {
    let plausible = prop_oneof![
        "[a-z:.]{0,12}".prop_map(Value::String),
        prop::collection::vec("[a-z:.*]{0,10}", 0..4)
            .prop_map(|v| Value::Array(v.into_iter().map(Value::String).collect())),
        any::<bool>().prop_map(Value::Bool),
        (0u64..5).prop_map(Value::from),
        json_value(),
    ];
    prop::collection::vec(proptest::option::weighted(0.3, plausible), FIELDS.len()).prop_map(
        |values| {
            let map = FIELDS
                .iter()
                .zip(values)
                .filter_map(|(k, v)| Some(((*k).to_owned(), v?)))
                .collect();
            Value::Object(map)
        },
    )
}

fn envelope(batch_items: Vec<Value>) -> impl Strategy<Value = Value> {
    let t = prop_oneof![
        8 => prop::sample::select(TYPES).prop_map(|t| Value::String(t.to_owned())),
        1 => json_value(),
    ];
    let p = prop_oneof![4 => payload_object(), 1 => json_value()];
    (
        t,
        p,
        any::<bool>(),
        any::<bool>(),
        proptest::option::weighted(0.9, Just(())),
    )
        .prop_map(move |(t, mut p, long_names, is_batch, with_p)| {
            if is_batch {
                p = serde_json::json!({ "messages": batch_items.clone() });
            }
            let (tk, pk) = if long_names {
                ("type", "payload")
            } else {
                ("t", "p")
            };
            let t = if is_batch {
                Value::String("batch".to_owned())
            } else {
                t
            };
            let mut m = serde_json::Map::new();
            m.insert(tk.to_owned(), t);
            if with_p.is_some() {
                m.insert(pk.to_owned(), p);
            }
            Value::Object(m)
        })
}

/// A client message: an envelope of a random type with a random payload, sometimes a batch of
/// such messages.
fn client_message() -> impl Strategy<Value = Value> {
    prop::collection::vec(envelope(Vec::new()), 0..4).prop_flat_map(envelope)
}

/// The legacy prefixes the decoder strips, or none.
fn legacy_prefix() -> impl Strategy<Value = &'static str> {
    prop_oneof![6 => Just(""), 1 => Just("WSE"), 1 => Just("S"), 1 => Just("U")]
}

fn max_len() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize << 20), 0usize..2048]
}

/// `depth` nested MessagePack arrays (or maps) around a nil.
fn nested_msgpack(depth: usize, maps: bool) -> Vec<u8> {
    let mut out = b"M:".to_vec();
    for _ in 0..depth {
        if maps {
            out.extend_from_slice(&[0x81, 0xa1, b'k']);
        } else {
            out.push(0x91);
        }
    }
    out.push(0xc0);
    out
}

/// A 10 MiB zlib bomb (about 10 KiB compressed), built once.
fn bomb() -> &'static [u8] {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    BOMB.get_or_init(|| zlib(&vec![b' '; 10 << 20]))
}

proptest! {
    #![proptest_config(cases(4096))]

    /// Arbitrary bytes behind each prefix.
    #[test]
    fn arbitrary_bytes(
        prefix in prop::sample::select(vec!["", "C:", "M:", "E:", "WSE", "S", "U", "{"]),
        body in prop::collection::vec(any::<u8>(), 0..512),
        max in max_len(),
    ) {
        let mut payload = prefix.as_bytes().to_vec();
        payload.extend_from_slice(&body);
        check_frame(&payload, max)?;
    }

    /// Client messages of every type with random payload shapes, as text, `C:` and `M:`.
    #[test]
    fn structured_messages(
        message in client_message(),
        prefix in legacy_prefix(),
        max in max_len(),
    ) {
        let json = serde_json::to_vec(&message).expect("a Value serialises");
        let mut text = prefix.as_bytes().to_vec();
        text.extend_from_slice(&json);
        check_frame(&text, max)?;

        let inflated = check_frame(&zlib(&json), max)?;
        if json.len() <= max {
            prop_assert_eq!(inflated.as_deref(), Some(&json[..]), "C: round trip");
        }

        let packed = msgpack(&message);
        if let Some(unpacked) = check_frame(&packed, max)? {
            let back: Value = serde_json::from_slice(&unpacked).expect("M: decodes to JSON");
            // Compared through the same text round trip: serde_json reads some floats back a bit
            // off, on both sides alike.
            let sent: Value = serde_json::from_slice(&json).expect("JSON parses");
            prop_assert_eq!(back, sent, "M: round trip");
        }
    }

    /// Compressed streams cut short or with bytes overwritten.
    #[test]
    fn corrupted_compression(
        message in client_message(),
        cut in any::<Index>(),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 0..3),
        max in max_len(),
    ) {
        let json = serde_json::to_vec(&message).expect("a Value serialises");
        for mut stream in [zlib(&json), msgpack(&message)] {
            for (at, byte) in &flips {
                let i = 2 + at.index(stream.len() - 2);
                stream[i] ^= byte;
            }
            let keep = 2 + cut.index(stream.len() - 1);
            check_frame(&stream[..keep], max)?;
            check_frame(&stream, max)?;
        }
    }

    /// Zlib bombs and streams that inflate to right around the limit.
    #[test]
    fn inflation_is_capped(
        size in prop_oneof![0usize..64, 1000usize..1100, 4000usize..5000],
        byte in any::<u8>(),
        max in prop_oneof![0usize..64, 1000usize..1100, 4000usize..5000, Just(1usize << 20)],
    ) {
        let payload = zlib(&vec![byte; size]);
        let result = binary_to_json(&payload, max);
        if size <= max {
            prop_assert_eq!(result.as_deref().ok(), Some(&vec![byte; size][..]));
        } else {
            prop_assert_eq!(result, Err(InboundError::InflatedTooLarge));
        }
        prop_assert_eq!(binary_to_json(bomb(), max), Err(InboundError::InflatedTooLarge));
    }

    /// Nesting past the MessagePack depth cap is refused; below it, decoded.
    #[test]
    fn msgpack_nesting(depth in 0usize..300, maps in any::<bool>(), max in max_len()) {
        let payload = nested_msgpack(depth, maps);
        let result = check_frame(&payload, max)?;
        if depth >= MSGPACK_DEPTH_MAX {
            prop_assert_eq!(result, None);
        }
    }

    /// JSON nested far past serde_json's recursion limit, as the whole message and as a payload.
    #[test]
    fn json_nesting(depth in 0usize..20_000, brackets in any::<bool>(), as_payload in any::<bool>()) {
        let (open, close) = if brackets { ("[", "]") } else { ("{\"a\":", "}") };
        let mut nested = open.repeat(depth);
        nested.push_str("null");
        nested.push_str(&close.repeat(depth));
        let message = if as_payload {
            format!(r#"{{"t":"publish","p":{{"topic":"a","data":{nested}}}}}"#)
        } else {
            nested
        };
        check_frame(message.as_bytes(), 1 << 20)?;
    }
}

/// MessagePack that inflates when written as JSON (nils become `null,`, control characters
/// `\u0000`): what `M:` returns is still capped at the limit. Found by `structured_messages`
/// before the cap existed.
#[test]
fn msgpack_expansion_is_capped() {
    let max = 4096;
    // An array of `max` nils: 1 byte each packed, 5 bytes each as JSON.
    let mut nils = b"M:".to_vec();
    nils.push(0xdc);
    nils.extend_from_slice(&(max as u16).to_be_bytes());
    nils.extend(std::iter::repeat_n(0xc0, max));
    assert_eq!(
        binary_to_json(&nils, max).map(|json| json.len()),
        Err(InboundError::InflatedTooLarge)
    );
    // A string of control characters: 1 byte packed, 6 as JSON.
    let control = Value::String("\u{1}".repeat(max / 2));
    assert_eq!(
        binary_to_json(&msgpack(&control), max).map(|json| json.len()),
        Err(InboundError::InflatedTooLarge)
    );
    // Under the limit it decodes.
    let small = Value::Array(vec![Value::Null; 10]);
    assert_eq!(
        binary_to_json(&msgpack(&small), max).as_deref(),
        Ok(&b"[null,null,null,null,null,null,null,null,null,null]"[..])
    );
}

/// A MessagePack array or map announcing 4 billion elements it does not carry fails without
/// allocating for them.
#[test]
fn msgpack_lying_lengths() {
    for head in [
        &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
        &[0xdf, 0xff, 0xff, 0xff, 0xff],
        &[0xdb, 0xff, 0xff, 0xff, 0xff],
    ] {
        let mut payload = b"M:".to_vec();
        payload.extend_from_slice(head);
        assert_eq!(
            binary_to_json(&payload, 1 << 20),
            Err(InboundError::BadMsgpack)
        );
    }
}
