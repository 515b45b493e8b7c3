//! `M:` frames: MessagePack written straight out as JSON text, under a byte cap.
//!
//! Owns: the transcoding walk and the capped output. Never: builds a `serde_json::Value` (a
//! payload of a million 1-byte nils would hold ~32x the frame in memory as one), allocates more
//! than the cap for the output, or recurses deeper than the caller's depth limit (the
//! deserializer's).
//!
//! What it accepts is what decoding into a `serde_json::Value` accepted, so a client sees the same
//! answers as before: maps with string keys only, no `bin` values, no extension types (all
//! [`TranscodeError::Invalid`]); a NaN or infinite float becomes `null`. One difference, on
//! purpose: map keys come out in the order sent, duplicates included, where the `Value` sorted
//! them and kept the last (a message with a duplicate field is then refused by the JSON layer as
//! it is when sent as JSON).

use std::fmt;
use std::io::{self, Write};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Why an `M:` payload was not turned into JSON.
#[derive(Debug, PartialEq, Eq)]
pub enum TranscodeError {
    /// Not MessagePack we take: malformed, too deep, `bin`/ext values or non-string keys.
    Invalid,
    /// The JSON would be longer than the cap; decoding stopped there.
    TooLarge,
}

/// Transcodes the MessagePack value in `packed` to JSON of at most `max_len` bytes. The output
/// buffer grows with what is written, so at most `max_len` (plus `Vec` doubling) is allocated
/// whatever the input claims.
///
/// # Errors
/// [`TranscodeError::TooLarge`] as soon as the output passes `max_len`;
/// [`TranscodeError::Invalid`] for input [`binary_to_json`](crate::protocol::binary_to_json)
/// refuses as `BadMsgpack`.
pub fn msgpack_to_json(
    packed: &[u8],
    max_len: usize,
    depth_max: usize,
) -> Result<Vec<u8>, TranscodeError> {
    let mut de = rmp_serde::Deserializer::new(packed);
    de.set_max_depth(depth_max);
    let mut out = Capped {
        buf: Vec::new(),
        max_len,
        overflowed: false,
    };
    let result = Json { out: &mut out }.deserialize(&mut de);
    match result {
        Ok(()) => Ok(out.buf),
        Err(_) if out.overflowed => Err(TranscodeError::TooLarge),
        Err(_) => Err(TranscodeError::Invalid),
    }
}

/// A `Vec` writer that refuses to grow past `max_len` and remembers that it did.
struct Capped {
    buf: Vec<u8>,
    max_len: usize,
    /// Set when a write would have passed `max_len`: the error is then "too large", not
    /// "malformed".
    overflowed: bool,
}

impl Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.buf.len() + bytes.len() > self.max_len {
            self.overflowed = true;
            return Err(io::Error::other("JSON output over the cap"));
        }
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes one value (and, through the nested seeds, everything inside it) as JSON.
struct Json<'w> {
    out: &'w mut Capped,
}

impl Json<'_> {
    fn raw<E: de::Error>(&mut self, bytes: &[u8]) -> Result<(), E> {
        self.out.write_all(bytes).map_err(E::custom)
    }

    /// A string, escaped as serde_json escapes it.
    fn string<E: de::Error>(&mut self, s: &str) -> Result<(), E> {
        serde_json::to_writer(&mut *self.out, s).map_err(E::custom)
    }
}

impl<'de> DeserializeSeed<'de> for Json<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Json<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a MessagePack value with a JSON equivalent")
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.raw(b"null")
    }

    fn visit_none<E: de::Error>(mut self) -> Result<(), E> {
        self.raw(b"null")
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<(), E> {
        self.raw(if v { b"true" } else { b"false" })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        serde_json::to_writer(&mut *self.out, &v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        serde_json::to_writer(&mut *self.out, &v).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<(), E> {
        // As `serde_json::Value` had it: a float JSON cannot hold is `null`.
        match serde_json::Number::from_f64(v) {
            Some(n) => serde_json::to_writer(&mut *self.out, &n).map_err(E::custom),
            None => self.raw(b"null"),
        }
    }

    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<(), E> {
        self.string(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.out;
        Json { out: &mut *out }.raw(b"[")?;
        let mut first = true;
        loop {
            if !first {
                // Written before the element is known to exist; a `]` replaces it below.
                Json { out: &mut *out }.raw(b",")?;
            }
            if seq.next_element_seed(Json { out: &mut *out })?.is_none() {
                if !first {
                    out.buf.pop();
                }
                break;
            }
            first = false;
        }
        Json { out }.raw(b"]")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.out;
        Json { out: &mut *out }.raw(b"{")?;
        let mut first = true;
        loop {
            if !first {
                Json { out: &mut *out }.raw(b",")?;
            }
            if map.next_key_seed(Key { out: &mut *out })?.is_none() {
                if !first {
                    out.buf.pop();
                }
                break;
            }
            Json { out: &mut *out }.raw(b":")?;
            map.next_value_seed(Json { out: &mut *out })?;
            first = false;
        }
        Json { out }.raw(b"}")
    }
}

/// A map key: strings only, as JSON requires (and as decoding into a `Value` did).
struct Key<'w> {
    out: &'w mut Capped,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string map key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        Json { out: self.out }.string(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(v: &serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(v).unwrap()
    }

    fn json(packed: &[u8]) -> Result<String, TranscodeError> {
        msgpack_to_json(packed, 1 << 20, 64).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn values_come_out_as_serde_json_writes_them() {
        let v = serde_json::json!({"t": "m", "p": {"a": [1, -2, 1.5, true, null, "é\u{1}\""],
            "b": {}, "c": [], "big": u64::MAX, "neg": i64::MIN}});
        let text = json(&pack(&v)).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), v);
        assert_eq!(
            json(&[0x93, 0x01, 0xc0, 0xa1, b'x']).unwrap(),
            r#"[1,null,"x"]"#
        );
        assert_eq!(json(&[0x90]).unwrap(), "[]");
        assert_eq!(json(&[0x80]).unwrap(), "{}");
        // f32 widens as it did through `Value`; NaN is null.
        assert_eq!(json(&[0xca, 0x3f, 0xc0, 0, 0]).unwrap(), "1.5");
        assert_eq!(json(&[0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0]).unwrap(), "null");
    }

    #[test]
    fn keys_keep_the_order_sent() {
        // {"b":1,"a":2,"b":3}
        let packed = [0x83, 0xa1, b'b', 1, 0xa1, b'a', 2, 0xa1, b'b', 3];
        assert_eq!(json(&packed).unwrap(), r#"{"b":1,"a":2,"b":3}"#);
    }

    #[test]
    fn what_a_value_refused_is_refused() {
        for packed in [
            &[0x81, 0x01, 0x02][..],         // {1: 2}: integer key
            &[0xc4, 0x01, 0x00],             // bin 8
            &[0xd4, 0x01, 0x00],             // fixext 1
            &[0x92, 0x01],                   // an array missing an element
            &[0xa2, 0xff, 0xfe],             // a str that is not UTF-8
            &[0x81, 0xc4, 0x01, b'k', 0x01], // a bin key
        ] {
            assert_eq!(json(packed), Err(TranscodeError::Invalid), "{packed:02x?}");
        }
    }

    #[test]
    fn output_past_the_cap_stops_there() {
        let mut nils = vec![0xdc, 0x00, 0x10];
        nils.extend([0xc0; 16]);
        assert_eq!(msgpack_to_json(&nils, 81, 64).map(|b| b.len()), Ok(81));
        assert_eq!(
            msgpack_to_json(&nils, 80, 64),
            Err(TranscodeError::TooLarge)
        );
    }
}
