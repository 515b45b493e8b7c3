//! The WSE JSON the load generator sends, and the small scanners it reads server JSON with.
//!
//! Owns: message shapes (client_hello, subscribe, publish, ping, PONG, inbound events) and the
//! benchmark stamp carried in every published payload. Never: touches sockets or framing.
//!
//! Reading is deliberately not a JSON parser: on the hot path a subscriber needs the message
//! type and five integers, found by substring search in the frame it already holds, so a
//! delivery costs no allocation and no tree building. Both servers write compact JSON
//! (`"key":value`, no spaces), which the scanners rely on.

use std::io::Write as _;

use memchr::memmem;

/// Event name of benchmark publications (`{"t":"bench",...}` on the subscriber side).
pub const BENCH_EVENT: &str = "bench";

/// The stamp every benchmark publication carries in its data: `"bench":[step,publisher,topic,seq,scheduled_ns]`.
///
/// `step` separates measurement phases (warm-up, each rate-search step) so late messages of an
/// earlier phase are never counted in a later one; `seq` counts from 1 per (step, publisher,
/// topic); `scheduled_ns` is when the publication was *due* on the process-wide monotonic clock
/// ([`crate::clock::now_ns`]), not when it was written, so a publisher that falls behind shows as
/// latency instead of as a lower rate (no coordinated omission).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub step: u32,
    pub publisher: u32,
    pub topic: u32,
    pub seq: u64,
    pub scheduled_ns: u64,
}

const STAMP_KEY: &[u8] = b"\"bench\":[";
const TYPE_KEY: &[u8] = b"\"t\":\"";

/// The message type (`t`) of a server message: the first `"t":"..."` in it. Both servers put
/// `t` before `p`, and recovery stamps use `tp`, which does not match.
pub fn msg_type(json: &[u8]) -> Option<&[u8]> {
    let start = memmem::find(json, TYPE_KEY)? + TYPE_KEY.len();
    let len = memchr::memchr(b'"', &json[start..])?;
    Some(&json[start..start + len])
}

/// The raw JSON value of the first `"key":` in `json`: a string with its quotes, or a scalar up
/// to the next `,` or `}`. Objects and arrays are not supported (not needed).
pub fn raw_field<'a>(json: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let mut pattern = Vec::with_capacity(key.len() + 3);
    pattern.push(b'"');
    pattern.extend_from_slice(key.as_bytes());
    pattern.extend_from_slice(b"\":");
    let start = memmem::find(json, &pattern)? + pattern.len();
    let rest = &json[start..];
    if rest.first() == Some(&b'"') {
        let end = memchr::memchr(b'"', &rest[1..])?;
        return Some(&rest[..end + 2]);
    }
    let end = rest
        .iter()
        .position(|&b| b == b',' || b == b'}')
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// A string field's value without quotes (no unescaping: codes and types are plain ASCII).
pub fn str_field<'a>(json: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let raw = raw_field(json, key)?;
    raw.strip_prefix(b"\"")?.strip_suffix(b"\"")
}

/// Finds and parses the benchmark stamp; `None` when the message carries none.
pub fn parse_stamp(json: &[u8]) -> Option<Stamp> {
    let start = memmem::find(json, STAMP_KEY)? + STAMP_KEY.len();
    let mut nums = [0u64; 5];
    let mut rest = &json[start..];
    for (i, slot) in nums.iter_mut().enumerate() {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 20 {
            return None;
        }
        *slot = parse_u64(&rest[..digits])?;
        let sep = if i == 4 { b']' } else { b',' };
        if rest.get(digits) != Some(&sep) {
            return None;
        }
        rest = &rest[digits + 1..];
    }
    Some(Stamp {
        step: u32::try_from(nums[0]).ok()?,
        publisher: u32::try_from(nums[1]).ok()?,
        topic: u32::try_from(nums[2]).ok()?,
        seq: nums[3],
        scheduled_ns: nums[4],
    })
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Milliseconds since the Unix epoch (the protocol's timestamps).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `client_hello`, as the Python client sends it.
pub fn client_hello() -> Vec<u8> {
    br#"{"c":"WSE","t":"client_hello","p":{"client_version":"wse-bench","protocol_version":1,"features":{"compression":false,"encryption":false,"batching":true,"priority_queue":false,"msgpack":false}},"v":1}"#.to_vec()
}

/// `subscription_update` subscribing to `topics`.
pub fn subscribe(topics: &[String]) -> Vec<u8> {
    let topics = serde_json::to_string(topics).expect("strings serialise");
    format!(
        r#"{{"c":"WSE","t":"subscription_update","p":{{"action":"subscribe","topics":{topics}}},"v":1}}"#
    )
    .into_bytes()
}

/// `subscription_update` subscribing to `topic` and recovering what was published after
/// `offset` in history `epoch` (protocol.md §5); without an epoch the server answers with its
/// current one and replays nothing.
pub fn subscribe_recover(topic: &str, epoch: Option<&str>, offset: u64) -> Vec<u8> {
    let position = match epoch {
        Some(e) => serde_json::json!({"epoch": e, "offset": offset}),
        None => serde_json::json!({"offset": offset}),
    };
    let msg = serde_json::json!({
        "c": "WSE",
        "t": "subscription_update",
        "p": {
            "action": "subscribe",
            "topics": [topic],
            "recover": true,
            "recovery": {topic: position},
        },
        "v": 1,
    });
    serde_json::to_vec(&msg).expect("JSON values serialise")
}

/// The recovery stamp both servers put first in a publication when recovery is on:
/// `{"tp":"<topic>","e":"<epoch>","o":<offset>,...}`. Returns the epoch and the offset.
pub fn parse_recovery_stamp(json: &[u8]) -> Option<(&[u8], u64)> {
    let rest = json.strip_prefix(br#"{"tp":""#)?;
    let rest = &rest[memchr::memchr(b'"', rest)? + 1..];
    let rest = rest.strip_prefix(br#","e":""#)?;
    let end = memchr::memchr(b'"', rest)?;
    let epoch = &rest[..end];
    let rest = rest[end + 1..].strip_prefix(br#","o":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    Some((epoch, parse_u64(&rest[..digits])?))
}

/// What a recovery subscription's acknowledgement says about its (one) topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryAck {
    pub recovered: bool,
    /// The topic history's current epoch (`None`: the server has none yet).
    pub epoch: Option<String>,
    /// The inclusive last offset the connection now has.
    pub offset: Option<u64>,
    /// Publications replayed before the acknowledgement.
    pub count: u64,
}

/// Reads the `"recovery":{"<topic>":{..}}` part of a `subscription_update` acknowledgement.
pub fn parse_recovery_ack(ack: &[u8]) -> Option<RecoveryAck> {
    // Upstream also has a top-level `recovered`: only what follows `"recovery":{` counts.
    let at = memmem::find(ack, br#""recovery":{"#)?;
    let info = &ack[at..];
    Some(RecoveryAck {
        recovered: raw_field(info, "recovered")? == b"true",
        epoch: str_field(info, "epoch").map(|e| String::from_utf8_lossy(e).into_owned()),
        offset: raw_field(info, "offset").and_then(parse_u64_text),
        count: raw_field(info, "count")
            .and_then(parse_u64_text)
            .unwrap_or(0),
    })
}

fn parse_u64_text(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || raw.len() > 20 || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    parse_u64(raw)
}

/// Client ping carrying `timestamp_ms`; both servers answer with `PONG`.
pub fn ping(timestamp_ms: u64) -> Vec<u8> {
    format!(r#"{{"c":"WSE","t":"ping","p":{{"timestamp":{timestamp_ms}}},"v":1}}"#).into_bytes()
}

/// The Python client's answer to a server `{"t":"ping"}`: it echoes the server's time
/// (`server_time`, else `timestamp`, else ours) and adds its own.
pub fn pong_for(server_ping: &[u8], out: &mut Vec<u8>) {
    let now = wall_ms();
    out.extend_from_slice(br#"{"c":"WSE","t":"PONG","p":{"server_timestamp":"#);
    match raw_field(server_ping, "server_time").or_else(|| raw_field(server_ping, "timestamp")) {
        Some(raw) => out.extend_from_slice(raw),
        None => {
            let _ = write!(out, "{now}");
        }
    }
    let _ = write!(out, r#","client_timestamp":{now}}},"v":1}}"#);
}

/// Padding that brings a publication's `data` object to about `size` bytes.
pub fn padding(size: usize) -> String {
    // `{"bench":[s,p,t,seq,ns],"pad":""}` with typical numbers is about 40-50 bytes.
    const STAMP_OVERHEAD: usize = 45;
    "x".repeat(size.saturating_sub(STAMP_OVERHEAD))
}

/// Appends a publish request for `topic` carrying `stamp` and `pad` to `json` (cleared first):
/// `{"c":"U","t":"publish","p":{"topic":T,"event":"bench","data":{"bench":[..],"pad":".."}}}`.
/// The same shape works for wse-server (`wse_publish` claim) and the upstream peer (`sub` =
/// `publisher`), which both rebroadcast `data` as the subscriber message's `p`.
pub fn publish(json: &mut Vec<u8>, topic: &str, stamp: &Stamp, pad: &str) {
    json.clear();
    let _ = write!(
        json,
        r#"{{"c":"U","t":"publish","p":{{"topic":"{topic}","event":"{BENCH_EVENT}","data":{{"bench":[{},{},{},{},{}],"pad":"{pad}"}}}}}}"#,
        stamp.step, stamp.publisher, stamp.topic, stamp.seq, stamp.scheduled_ns
    );
}

/// An application event for the inbound scenario (neither server answers it).
pub fn inbound_event(json: &mut Vec<u8>, seq: u64, pad: &str) {
    json.clear();
    let _ = write!(
        json,
        r#"{{"c":"U","t":"bench_inbound","p":{{"seq":{seq},"pad":"{pad}"}},"v":1}}"#
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_through_both_server_shapes() {
        let stamp = Stamp {
            step: 2,
            publisher: 3,
            topic: 17,
            seq: 123_456,
            scheduled_ns: 9_876_543_210,
        };
        let mut req = Vec::new();
        publish(&mut req, "bench.17", &stamp, "xx");
        let v: serde_json::Value = serde_json::from_slice(&req).unwrap();
        let data = serde_json::to_string(&v["p"]["data"]).unwrap();
        // wse-server: {"c":"U","t":<event>,"p":<data>,"v":1}, maybe with recovery stamps first.
        let wse = format!(
            r#"{{"tp":"bench.17","e":"0a0b0c0d","o":5,"c":"U","t":"bench","p":{data},"v":1}}"#
        );
        // upstream peer: {"t":<event>,"p":<data>}.
        let upstream = format!(r#"{{"t":"bench","p":{data}}}"#);
        for msg in [wse, upstream] {
            assert_eq!(msg_type(msg.as_bytes()), Some(&b"bench"[..]));
            assert_eq!(parse_stamp(msg.as_bytes()), Some(stamp));
        }
    }

    #[test]
    fn stamp_rejects_truncated_or_malformed() {
        assert_eq!(parse_stamp(br#"{"bench":[1,2,3,4]}"#), None);
        assert_eq!(parse_stamp(br#"{"bench":[1,2,3,4,x]}"#), None);
        assert_eq!(
            parse_stamp(br#"{"bench":[1,2,3,4,99999999999999999999999]}"#),
            None
        );
        assert_eq!(parse_stamp(br#"{"t":"other"}"#), None);
    }

    #[test]
    fn recovery_stamps_and_acks_of_both_servers() {
        let wse = br#"{"tp":"rec.1","e":"0a0b0c0d","o":17,"c":"U","t":"bench","p":{"bench":[1,0,1,5,9]},"v":1}"#;
        assert_eq!(parse_recovery_stamp(wse), Some((&b"0a0b0c0d"[..], 17)));
        // Upstream's shape: the same stamp, no "v".
        let up = br#"{"tp":"rec.1","e":"56819e96","o":0,"c":"U","t":"bench","p":{}}"#;
        assert_eq!(parse_recovery_stamp(up), Some((&b"56819e96"[..], 0)));
        assert_eq!(
            parse_recovery_stamp(br#"{"c":"U","t":"bench","p":{}}"#),
            None
        );
        assert_eq!(parse_recovery_stamp(br#"{"tp":"x","e":"1","o":}"#), None);

        let wse_ack = br#"{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","success":true,"success_topics":["t"],"failed_topics":[],"recovery":{"t":{"epoch":"000000ab","offset":7,"recovered":true,"count":3}}},"v":1}"#;
        assert_eq!(
            parse_recovery_ack(wse_ack),
            Some(RecoveryAck {
                recovered: true,
                epoch: Some("000000ab".into()),
                offset: Some(7),
                count: 3
            })
        );
        let up_ack = br#"{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","success":true,"success_topics":["r.0"],"failed_topics":[],"recoverable":true,"recovered":true,"recovery":{"r.0":{"epoch":null,"offset":0,"recovered":false,"count":0}}},"v":1}"#;
        assert_eq!(
            parse_recovery_ack(up_ack),
            Some(RecoveryAck {
                recovered: false,
                epoch: None,
                offset: Some(0),
                count: 0
            })
        );
        assert_eq!(
            parse_recovery_ack(br#"{"t":"subscription_update","p":{}}"#),
            None
        );
        let req: serde_json::Value =
            serde_json::from_slice(&subscribe_recover("a\"b", Some("00000001"), 5)).unwrap();
        assert_eq!(req["p"]["recovery"]["a\"b"]["offset"], 5);
        assert_eq!(req["p"]["recover"], true);
        let req: serde_json::Value =
            serde_json::from_slice(&subscribe_recover("t", None, 0)).unwrap();
        assert!(req["p"]["recovery"]["t"].get("epoch").is_none());
    }

    #[test]
    fn fields_are_found() {
        let msg = br#"{"c":"WSE","t":"error","p":{"code":"AUTH_FAILED","n":12,"m":"x"},"v":1}"#;
        assert_eq!(msg_type(msg), Some(&b"error"[..]));
        assert_eq!(str_field(msg, "code"), Some(&b"AUTH_FAILED"[..]));
        assert_eq!(raw_field(msg, "n"), Some(&b"12"[..]));
        assert_eq!(raw_field(msg, "missing"), None);
    }

    #[test]
    fn pong_echoes_the_server_time_like_the_python_client() {
        let mut out = Vec::new();
        pong_for(
            br#"{"c":"WSE","t":"ping","p":{"server_time":"2026-01-01T00:00:00.000Z"}}"#,
            &mut out,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["t"], "PONG");
        assert_eq!(v["p"]["server_timestamp"], "2026-01-01T00:00:00.000Z");
        assert!(v["p"]["client_timestamp"].as_u64().unwrap() > 0);
        assert!(std::str::from_utf8(&out).unwrap()[..25].contains(r#""t":"PONG""#));
    }

    #[test]
    fn builders_emit_valid_json() {
        for msg in [
            client_hello(),
            subscribe(&["a".into(), "b\"c".into()]),
            ping(5),
        ] {
            serde_json::from_slice::<serde_json::Value>(&msg).unwrap();
        }
        let mut json = Vec::new();
        inbound_event(&mut json, 7, "pp");
        serde_json::from_slice::<serde_json::Value>(&json).unwrap();
        let pad = padding(200);
        publish(
            &mut json,
            "t",
            &Stamp {
                step: 1,
                publisher: 0,
                topic: 0,
                seq: 1,
                scheduled_ns: 1_000_000_000,
            },
            &pad,
        );
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let data_len = serde_json::to_string(&v["p"]["data"]).unwrap().len();
        assert!((185..=215).contains(&data_len), "{data_len}");
    }
}
