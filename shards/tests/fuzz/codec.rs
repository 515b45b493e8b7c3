//! The frame decoder (`Decoder::decode`, server role) against arbitrary bytes, against frames
//! with random header bits, length encodings, masks and fragmentation, and against a model of
//! valid traffic whose decoding is known in advance.
//!
//! Every input is fed in random splits, the way reads arrive: the decoded messages, the error and
//! the bytes left over must be the same whatever the splits, and nothing may exceed its limit.

use std::ops::ControlFlow;

use proptest::prelude::*;
use proptest::sample::Index;
use wse_shards::codec::{
    CONTROL_PAYLOAD_MAX, Decoder, FRAME_HEADER_MAX, FrameError, Message, OpCode, Role, write_frame,
};

use crate::cases;

/// A decoded message, owned so runs can be compared.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Msg {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

impl Msg {
    fn from(m: Message<'_>) -> Self {
        match m {
            Message::Text(t) => Self::Text(t.to_owned()),
            Message::Binary(b) => Self::Binary(b.to_vec()),
            Message::Ping(p) => Self::Ping(p.to_vec()),
            Message::Pong(p) => Self::Pong(p.to_vec()),
            Message::Close(c) => Self::Close(c.map(|c| (c.code, c.reason.to_owned()))),
        }
    }
}

/// Everything a run of the decoder over one byte stream produced.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    messages: Vec<Msg>,
    error: Option<FrameError>,
    /// Bytes of an incomplete frame at the end (only when there was no error).
    leftover: Vec<u8>,
    assembling: bool,
}

/// Feeds `stream` in the chunks `splits` cut it into, as a connection does: unconsumed bytes are
/// kept and the next read appended. The callback stops decoding after a message where `stops`
/// says so (as a connection does when a message closes it), and the caller resumes. Checks the
/// size bounds after every call.
fn feed(stream: &[u8], mut cuts: Vec<usize>, stops: &[bool], max: usize) -> Run {
    cuts.push(stream.len());
    cuts.sort_unstable();
    let mut decoder = Decoder::new(Role::Server);
    let mut pending = Vec::new();
    let mut messages = Vec::new();
    let mut start = 0;
    for cut in cuts {
        pending.extend_from_slice(&stream[start..cut]);
        start = cut;
        loop {
            let mut stopped = false;
            let result = decoder.decode(&mut pending, max, |m| {
                check_message_size(&m, max);
                messages.push(Msg::from(m));
                let stop = stops.get(messages.len() % stops.len().max(1)) == Some(&true);
                stopped = stop;
                if stop {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            let consumed = match result {
                Ok(consumed) => consumed,
                Err(error) => {
                    return Run {
                        messages,
                        error: Some(error),
                        leftover: Vec::new(),
                        assembling: false,
                    };
                }
            };
            assert!(consumed <= pending.len());
            pending.drain(..consumed);
            check_buffers(&decoder, &pending, max, stopped);
            if !stopped {
                break;
            }
        }
    }
    Run {
        messages,
        error: None,
        leftover: pending,
        assembling: decoder.is_assembling(),
    }
}

fn check_message_size(m: &Message<'_>, max: usize) {
    let len = match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        Message::Ping(p) | Message::Pong(p) => {
            assert!(p.len() <= CONTROL_PAYLOAD_MAX);
            return;
        }
        Message::Close(c) => {
            let reason = c.map_or(0, |c| c.reason.len());
            assert!(reason + 2 <= CONTROL_PAYLOAD_MAX);
            return;
        }
    };
    assert!(len <= max, "a {len}-byte message passed a limit of {max}");
}

/// What the decoder leaves the caller holding is part of one frame, which the limit admitted; the
/// reassembly buffer holds at most `max` bytes and `Vec` growth at most doubles that.
fn check_buffers(decoder: &Decoder, pending: &[u8], max: usize, stopped: bool) {
    if !stopped {
        let frame_max = FRAME_HEADER_MAX + max.max(CONTROL_PAYLOAD_MAX);
        assert!(
            pending.len() < frame_max,
            "{} bytes pending, more than one frame of at most {frame_max}",
            pending.len()
        );
    }
    // The smallest non-zero capacity `Vec<u8>` allocates is 8.
    let capacity = decoder.assembly_capacity();
    assert!(
        capacity <= 2 * max.max(8),
        "reassembly buffer of {capacity} bytes for a limit of {max}"
    );
}

/// The same stream fed whole and fed in two random ways must give the same run.
fn check_split_invariance(
    stream: &[u8],
    splits: &[Index],
    stops: &[bool],
    max: usize,
) -> Result<Run, TestCaseError> {
    let whole = feed(stream, Vec::new(), &[], max);
    let cuts = splits.iter().map(|i| i.index(stream.len() + 1)).collect();
    let split = feed(stream, cuts, stops, max);
    prop_assert_eq!(&whole, &split);
    Ok(whole)
}

// ------------------------------------------------------------------------------------------------
// Strategies
// ------------------------------------------------------------------------------------------------

fn max_message() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => Just(0usize),
        4 => 1usize..300,
        2 => 300usize..5000,
        1 => Just(1usize << 20),
    ]
}

fn splits() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..24)
}

fn stops() -> impl Strategy<Value = Vec<bool>> {
    prop::collection::vec(prop::bool::weighted(0.2), 0..8)
}

/// How a frame spells its payload length: honestly in one of the three encodings, or a lie.
#[derive(Clone, Debug)]
enum LenSpelling {
    Minimal,
    Ext16,
    Ext64,
    /// Declares the payload length plus this (wrapping), in the minimal encoding for the lie.
    Off(i64),
    /// A 64-bit length from anywhere in the range, the top bit included.
    Raw64(u64),
}

#[derive(Clone, Debug)]
struct FrameSpec {
    first: u8,
    masked: bool,
    mask: [u8; 4],
    len: LenSpelling,
    payload: Vec<u8>,
}

fn opcode_bits() -> impl Strategy<Value = u8> {
    prop_oneof![
        6 => prop::sample::select(vec![0x0u8, 0x1, 0x2, 0x8, 0x9, 0xA]),
        1 => 0u8..16,
    ]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..40),
        3 => any::<String>().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 100..400),
        // A close payload: a code, then a reason.
        2 => (any::<u16>(), ".{0,20}").prop_map(|(code, reason): (u16, String)| {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason.as_bytes());
            p
        }),
    ]
}

fn frame_spec() -> impl Strategy<Value = FrameSpec> {
    let len = prop_oneof![
        8 => Just(LenSpelling::Minimal),
        1 => Just(LenSpelling::Ext16),
        1 => Just(LenSpelling::Ext64),
        1 => (-3i64..3).prop_map(LenSpelling::Off),
        1 => any::<u64>().prop_map(LenSpelling::Raw64),
    ];
    (
        any::<bool>(),
        prop::bool::weighted(0.05),
        opcode_bits(),
        prop::bool::weighted(0.95),
        any::<[u8; 4]>(),
        len,
        payload(),
    )
        .prop_map(|(fin, rsv, opcode, masked, mask, len, payload)| FrameSpec {
            first: u8::from(fin) << 7 | if rsv { 0x40 } else { 0 } | opcode,
            masked,
            mask,
            len,
            payload,
        })
}

fn encode_spec(spec: &FrameSpec, out: &mut Vec<u8>) {
    out.push(spec.first);
    let mask_bit = if spec.masked { 0x80 } else { 0 };
    let n = spec.payload.len() as u64;
    let (len7, ext): (u8, Vec<u8>) = match spec.len {
        LenSpelling::Minimal => minimal_length(n),
        LenSpelling::Ext16 => (126, (n as u16).to_be_bytes().to_vec()),
        LenSpelling::Ext64 => (127, n.to_be_bytes().to_vec()),
        LenSpelling::Off(delta) => minimal_length(n.wrapping_add_signed(delta)),
        LenSpelling::Raw64(raw) => (127, raw.to_be_bytes().to_vec()),
    };
    out.push(mask_bit | len7);
    out.extend_from_slice(&ext);
    if spec.masked {
        out.extend_from_slice(&spec.mask);
    }
    let start = out.len();
    out.extend_from_slice(&spec.payload);
    if spec.masked {
        for (i, byte) in out[start..].iter_mut().enumerate() {
            *byte ^= spec.mask[i % 4];
        }
    }
}

fn minimal_length(n: u64) -> (u8, Vec<u8>) {
    match n {
        0..=125 => (n as u8, Vec::new()),
        126..=0xFFFF => (126, (n as u16).to_be_bytes().to_vec()),
        _ => (127, n.to_be_bytes().to_vec()),
    }
}

/// A data message of valid traffic: its fragments, and control frames sent between them.
#[derive(Clone, Debug)]
struct Logical {
    text: bool,
    content: Vec<u8>,
    /// Where the content is cut into fragments (byte offsets, not char boundaries).
    cuts: Vec<Index>,
    /// Control frames, each placed before the fragment its index picks.
    controls: Vec<(Index, Control)>,
}

#[derive(Clone, Debug)]
enum Control {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn control() -> impl Strategy<Value = Control> {
    let body = prop::collection::vec(any::<u8>(), 0..=CONTROL_PAYLOAD_MAX);
    prop_oneof![
        body.clone().prop_map(Control::Ping),
        body.prop_map(Control::Pong)
    ]
}

fn logical() -> impl Strategy<Value = Logical> {
    let content = prop_oneof![
        any::<String>().prop_map(|s| (true, s.into_bytes())),
        "[\u{0}-\u{10FFFF}]{0,300}".prop_map(|s| (true, s.into_bytes())),
        prop::collection::vec(any::<u8>(), 0..600).prop_map(|b| (false, b)),
    ];
    (
        content,
        prop::collection::vec(any::<Index>(), 0..6),
        prop::collection::vec((any::<Index>(), control()), 0..3),
    )
        .prop_map(|((text, content), cuts, controls)| Logical {
            text,
            content,
            cuts,
            controls,
        })
}

/// Encodes valid traffic (masked, as a client sends it) and the run the decoder must produce
/// with limit `max`.
fn encode_logical(
    traffic: &[Logical],
    closing: Option<(u16, String)>,
    max: usize,
) -> (Vec<u8>, Run) {
    let mut stream = Vec::new();
    let mut messages = Vec::new();
    let mut error = None;
    let mut mask = 0x9e37_79b9u32;
    let mut next_mask = || {
        mask = mask.wrapping_mul(0x0101_0101).wrapping_add(0x2545_f491);
        Some(mask.to_be_bytes())
    };
    for m in traffic {
        let mut cuts: Vec<usize> = m
            .cuts
            .iter()
            .map(|i| i.index(m.content.len() + 1))
            .collect();
        cuts.push(m.content.len());
        cuts.sort_unstable();
        cuts.dedup();
        let fragments = cuts.len();
        let mut start = 0;
        for (k, cut) in cuts.into_iter().enumerate() {
            for (at, c) in &m.controls {
                if at.index(fragments) == k && k > 0 {
                    let (op, body, msg) = match c {
                        Control::Ping(p) => (OpCode::Ping, p, Msg::Ping(p.clone())),
                        Control::Pong(p) => (OpCode::Pong, p, Msg::Pong(p.clone())),
                    };
                    write_frame(&mut stream, op, true, body, next_mask());
                    if error.is_none() {
                        messages.push(msg);
                    }
                }
            }
            let op = match (k, m.text) {
                (0, true) => OpCode::Text,
                (0, false) => OpCode::Binary,
                _ => OpCode::Continuation,
            };
            let fin = k + 1 == fragments;
            write_frame(&mut stream, op, fin, &m.content[start..cut], next_mask());
            if error.is_none() && cut > max {
                error = Some(FrameError::MessageTooLarge {
                    size: cut as u64,
                    limit: max,
                });
            }
            start = cut;
        }
        if error.is_none() {
            let valid_text = std::str::from_utf8(&m.content).ok();
            messages.push(match (m.text, valid_text) {
                (true, Some(t)) => Msg::Text(t.to_owned()),
                (true, None) => unreachable!("text content is generated from strings"),
                (false, _) => Msg::Binary(m.content.clone()),
            });
        }
    }
    if let Some((code, reason)) = closing {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(reason.as_bytes());
        write_frame(&mut stream, OpCode::Close, true, &body, next_mask());
        if error.is_none() {
            messages.push(Msg::Close(Some((code, reason))));
        }
    }
    let expected = Run {
        messages,
        error,
        leftover: Vec::new(),
        assembling: false,
    };
    (stream, expected)
}

fn close_code() -> impl Strategy<Value = u16> {
    prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999]
}

// ------------------------------------------------------------------------------------------------
// Properties
// ------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(8192))]

    /// Arbitrary bytes: no panic, split invariance, bounded buffers.
    #[test]
    fn arbitrary_bytes(
        stream in prop::collection::vec(any::<u8>(), 0..2048),
        splits in splits(),
        stops in stops(),
        max in max_message(),
    ) {
        check_split_invariance(&stream, &splits, &stops, max)?;
    }

    /// Frames with random header bits, length spellings (lies and 64-bit monsters included),
    /// masks and fragmentation; mostly well-formed so decoding gets past the first frame.
    #[test]
    fn random_frames(
        frames in prop::collection::vec(frame_spec(), 0..24),
        splits in splits(),
        stops in stops(),
        max in max_message(),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            encode_spec(f, &mut stream);
        }
        check_split_invariance(&stream, &splits, &stops, max)?;
    }

    /// Valid traffic decodes to exactly what was sent, whatever the splits; with a smaller limit,
    /// exactly up to the first message that outgrows it.
    #[test]
    fn valid_traffic_decodes_to_the_model(
        traffic in prop::collection::vec(logical(), 0..8),
        closing in proptest::option::of((close_code(), ".{0,30}")),
        splits in splits(),
        stops in stops(),
        max in prop_oneof![Just(1usize << 20), 0usize..700],
    ) {
        let (stream, expected) = encode_logical(&traffic, closing, max);
        let run = check_split_invariance(&stream, &splits, &stops, max)?;
        prop_assert_eq!(run, expected);
    }

    /// Valid traffic with a few bytes overwritten: no panic, split invariance, bounded buffers.
    #[test]
    fn mutated_traffic(
        traffic in prop::collection::vec(logical(), 1..6),
        mutations in prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
        splits in splits(),
        stops in stops(),
        max in max_message(),
    ) {
        let (mut stream, _) = encode_logical(&traffic, None, usize::MAX);
        for (at, byte) in &mutations {
            let i = at.index(stream.len());
            stream[i] = *byte;
        }
        check_split_invariance(&stream, &splits, &stops, max)?;
    }
}

proptest! {
    #![proptest_config(cases(1024))]

    /// The hardest split: one byte per read.
    #[test]
    fn one_byte_at_a_time(
        traffic in prop::collection::vec(logical(), 0..4),
        max in prop_oneof![Just(1usize << 20), 0usize..700],
    ) {
        let (stream, expected) = encode_logical(&traffic, None, max);
        let run = feed(&stream, (1..stream.len()).collect(), &[], max);
        prop_assert_eq!(run, expected);
    }
}
