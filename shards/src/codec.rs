//! RFC 6455 framing, sans-IO: bytes in, messages out; messages in, frame bytes out.
//!
//! Owns: frame header parsing, unmasking, fragment reassembly, UTF-8 validation of text
//! (fail-fast across fragments and within a frame whose payload has only partly arrived),
//! control-frame rules, close payload validation, and encoding of
//! outbound frames (unmasked for the server, masked for clients/tests/bench).
//!
//! Never: touches sockets, clocks or the WSE JSON layer. An idle [`Decoder`] holds no heap memory:
//! the reassembly buffer exists only while a fragmented message is in flight.
//!
//! Contract of [`Decoder::decode`]: it consumes whole frames from the front of `buf` (unmasking
//! them in place), hands every completed message to the callback, and returns how many bytes it
//! consumed. Bytes of an incomplete trailing frame are not consumed; the caller keeps them and
//! calls again with more appended. A frame whose declared length makes the message exceed
//! `max_message` fails at once with [`FrameError::MessageTooLarge`], before its payload arrives.

use std::ops::ControlFlow;

use bytes::Bytes;

use crate::close::CloseCode;

/// Longest frame header: 2 bytes + 8 bytes extended length + 4 bytes mask.
pub const FRAME_HEADER_MAX: usize = 14;
/// RFC 6455 §5.5: control frame payloads are at most this long.
pub const CONTROL_PAYLOAD_MAX: usize = 125;

/// First header byte: final fragment flag, reserved bits, opcode.
const FIN_BIT: u8 = 0x80;
const RSV_BITS: u8 = 0x70;
const OPCODE_BITS: u8 = 0x0F;
/// Second header byte: mask flag and the 7-bit length field.
const MASK_BIT: u8 = 0x80;
const LEN7_BITS: u8 = 0x7F;
/// Largest payload length that fits the 7-bit field itself.
const LEN7_MAX: usize = 125;
/// 7-bit field values announcing a 16-bit or a 64-bit extended length.
const LEN7_EXT16: u8 = 126;
const LEN7_EXT64: u8 = 127;
const EXT16_BYTES: usize = 2;
const EXT64_BYTES: usize = 8;
/// RFC 6455 §5.2: the most significant bit of a 64-bit length must be 0.
const EXT64_MSB: u64 = 1 << 63;
const BASE_HEADER_BYTES: usize = 2;
const MASK_KEY_BYTES: usize = 4;
/// Unmasking works on words of this many bytes; a multiple of the key length, so every word
/// starts at mask offset 0.
const MASK_WORD_BYTES: usize = 8;

/// A close payload starts with a big-endian status code; the reason gets the rest.
const CLOSE_CODE_BYTES: usize = 2;
const CLOSE_REASON_MAX: usize = CONTROL_PAYLOAD_MAX - CLOSE_CODE_BYTES;

/// A UTF-8 sequence is at most 4 bytes, so at most 3 of it can end a fragment unfinished.
const UTF8_CARRY_MAX: usize = 3;
const UTF8_SEQ_MAX: usize = UTF8_CARRY_MAX + 1;
/// The received part of an incomplete text frame is unmasked into a stack buffer of this many
/// bytes at a time to be validated (the input buffer is left masked: the caller hands it back).
const PARTIAL_CHUNK_BYTES: usize = 4096;

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0: the next fragment of a message in progress.
    Continuation,
    /// 0x1: a UTF-8 text message (or its first fragment).
    Text,
    /// 0x2: a binary message (or its first fragment).
    Binary,
    /// 0x8: the closing handshake.
    Close,
    /// 0x9: a keep-alive probe, answered with a Pong carrying the same payload.
    Ping,
    /// 0xA: the answer to a Ping, or an unsolicited heartbeat.
    Pong,
}

/// Which side of the connection this decoder is: a server requires masked input, a client
/// requires unmasked input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Decodes what clients send: every frame must be masked.
    Server,
    /// Decodes what servers send: no frame may be masked (tests, bench, the Rust client).
    Client,
}

/// A close frame's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    /// The status code (validated: see [`is_valid_close_code`]).
    pub code: u16,
    /// The reason, valid UTF-8, at most 123 bytes.
    pub reason: &'a str,
}

/// A complete message (data messages reassembled from their fragments) or a control frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A whole text message, UTF-8 validated.
    Text(&'a str),
    /// A whole binary message.
    Binary(&'a [u8]),
    /// A Ping's payload (at most 125 bytes), to be echoed in a Pong.
    Ping(&'a [u8]),
    /// A Pong's payload; only proves the peer is alive.
    Pong(&'a [u8]),
    /// `None` when the close frame had no payload.
    Close(Option<CloseFrame<'a>>),
}

/// What the peer did wrong. Each maps to the close code we answer with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A client sent an unmasked frame (RFC 6455 §5.1).
    #[error("client frame not masked")]
    UnmaskedFrame,
    /// A server sent a masked frame (RFC 6455 §5.1).
    #[error("server frame masked")]
    MaskedFrame,
    /// RSV1-3 set, though no extension was negotiated.
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    /// An opcode RFC 6455 reserves (0x3-0x7, 0xB-0xF).
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A control frame without FIN: control frames cannot be fragmented.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame announcing more than 125 bytes of payload.
    #[error("control frame payload over 125 bytes")]
    OversizedControl,
    /// A continuation frame with no fragmented message in progress.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A new Text or Binary frame while a fragmented message is unfinished.
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// Text (or a close reason) that is not UTF-8; detected at the first bad byte.
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    /// A close payload of exactly one byte (a code needs two).
    #[error("close frame payload of one byte")]
    InvalidClosePayload,
    /// A close code that may not be sent on the wire (e.g. 1005, 1006, 1015, < 1000).
    #[error("close code {0} is not allowed on the wire")]
    InvalidCloseCode(u16),
    /// A 64-bit length with its most significant bit set.
    #[error("64-bit payload length with the most significant bit set")]
    LengthOverflow,
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    /// The message (all fragments so far plus this frame's declared length) is over the
    /// limit; raised from the header, before the payload arrives.
    MessageTooLarge {
        /// Bytes the message would have.
        size: u64,
        /// The limit it broke (`limits.max_message_size`).
        limit: usize,
    },
}

impl FrameError {
    /// The close code to answer this error with: invalid payload (1007) for bad UTF-8, message
    /// too big (1009) for size, else protocol error (1002).
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::InvalidUtf8 => CloseCode::InvalidPayload,
            Self::MessageTooLarge { .. } => CloseCode::MessageTooBig,
            _ => CloseCode::ProtocolError,
        }
    }
}

/// Incremental frame decoder for one connection.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    /// Boxed so an idle decoder is two words and owns no heap memory; `Some` only while a
    /// fragmented message is in flight.
    assembly: Option<Box<Assembly>>,
    /// Fail-fast state for the text frame at the front of the caller's buffer while its payload
    /// has only partly arrived; `None` once it completes (see [`Decoder::check_partial_text`]).
    partial: Option<PartialText>,
}

/// How far the payload of an incomplete text frame has been validated, and the unfinished
/// character (if any) its validated part ends with.
#[derive(Debug)]
struct PartialText {
    /// Payload bytes validated so far (a frame longer than `u32::MAX` is not checked early).
    checked: u32,
    carry: Utf8Carry,
}

impl Decoder {
    /// A decoder for `role` with nothing in progress (no heap memory until a message is fragmented).
    pub fn new(role: Role) -> Self {
        Self {
            role,
            assembly: None,
            partial: None,
        }
    }

    /// Decodes every whole frame at the front of `buf` (see the module docs for the contract).
    /// The callback may return `ControlFlow::Break(())` to stop after the current message; the
    /// return value then counts the bytes up to and including that frame.
    ///
    /// # Errors
    /// The first protocol violation; the connection must then be failed with
    /// [`FrameError::close_code`]. The decoder is not usable afterwards.
    pub fn decode(
        &mut self,
        buf: &mut [u8],
        max_message: usize,
        mut on_message: impl FnMut(Message<'_>) -> ControlFlow<()>,
    ) -> Result<usize, FrameError> {
        let mut consumed = 0;
        while let Some(header) = self.parse_header(&buf[consumed..], max_message)? {
            let frame_end = consumed.saturating_add(header.frame_len());
            let Some(frame) = buf.get_mut(consumed..frame_end) else {
                self.check_partial_text(&header, &buf[consumed..])?;
                break;
            };
            self.partial = None;
            consumed = frame_end;
            let payload = &mut frame[header.header_len..];
            if let Some(mask) = header.mask {
                apply_mask(payload, mask);
            }
            if self.on_frame(&header, payload, &mut on_message)?.is_break() {
                break;
            }
        }
        Ok(consumed)
    }

    /// True while a fragmented message is being reassembled.
    pub fn is_assembling(&self) -> bool {
        self.assembly.is_some()
    }

    /// Heap bytes the reassembly buffer holds (its capacity; 0 when idle). For the fuzz tests'
    /// memory bound: at most `max_message` bytes are assembled, and `Vec` growth at most doubles
    /// that.
    #[doc(hidden)]
    pub fn assembly_capacity(&self) -> usize {
        match self.assembly.as_deref() {
            None => 0,
            Some(Assembly::Text { text, .. }) => text.capacity(),
            Some(Assembly::Binary(bytes)) => bytes.capacity(),
        }
    }

    /// Parses and validates the header at the front of `buf`; `None` until all of it is there.
    /// Every rule that the first two bytes decide is checked before waiting for the rest.
    fn parse_header(
        &self,
        buf: &[u8],
        max_message: usize,
    ) -> Result<Option<FrameHeader>, FrameError> {
        let [first, second, ..] = *buf else {
            return Ok(None);
        };
        let fin = first & FIN_BIT != 0;
        let masked = second & MASK_BIT != 0;
        let len7 = second & LEN7_BITS;
        let opcode = self.check_start(first, masked, len7)?;

        let ext_bytes = match len7 {
            LEN7_EXT16 => EXT16_BYTES,
            LEN7_EXT64 => EXT64_BYTES,
            _ => 0,
        };
        let mask_start = BASE_HEADER_BYTES + ext_bytes;
        let header_len = mask_start + if masked { MASK_KEY_BYTES } else { 0 };
        let Some(ext) = buf.get(BASE_HEADER_BYTES..mask_start) else {
            return Ok(None);
        };
        let payload_len = self.check_size(opcode, read_length(len7, ext)?, max_message)?;
        let Some(key) = buf.get(mask_start..header_len) else {
            return Ok(None);
        };
        Ok(Some(FrameHeader {
            fin,
            opcode,
            mask: masked.then(|| [key[0], key[1], key[2], key[3]]),
            header_len,
            payload_len,
        }))
    }

    /// Validates the UTF-8 of a text frame (or a continuation of a text message) whose payload
    /// has only partly arrived, so that invalid text fails the connection as soon as the bad
    /// byte is received, not when the frame completes (RFC 6455 §8.1; Autobahn 6.4.3/6.4.4).
    /// Each payload byte is checked once here, from where the previous call stopped; `frame`
    /// (the header and the received part of the payload) is not modified.
    fn check_partial_text(&mut self, header: &FrameHeader, frame: &[u8]) -> Result<(), FrameError> {
        let seed = match (header.opcode, self.assembly.as_deref()) {
            (OpCode::Text, _) => Utf8Carry::default(),
            (OpCode::Continuation, Some(Assembly::Text { carry, .. })) => carry.clone(),
            _ => return Ok(()),
        };
        let Some(payload) = frame.get(header.header_len..) else {
            return Ok(());
        };
        let Ok(received) = u32::try_from(payload.len()) else {
            return Ok(());
        };
        let state = self.partial.get_or_insert(PartialText {
            checked: 0,
            carry: seed,
        });
        let start = state.checked as usize;
        let mut scratch = [0; UTF8_CARRY_MAX + PARTIAL_CHUNK_BYTES];
        for (i, chunk) in payload[start..].chunks(PARTIAL_CHUNK_BYTES).enumerate() {
            let held = state.carry.len();
            scratch[..held].copy_from_slice(&state.carry.bytes[..held]);
            let offset = start + i * PARTIAL_CHUNK_BYTES;
            let dst = &mut scratch[held..held + chunk.len()];
            dst.copy_from_slice(chunk);
            if let Some(mut key) = header.mask {
                // The chunk starts at key offset `offset % 4`: the key as seen from there.
                key.rotate_left(offset % MASK_KEY_BYTES);
                apply_mask(dst, key);
            }
            state
                .carry
                .hold_unfinished(&scratch[..held + chunk.len()])?;
        }
        state.checked = received;
        Ok(())
    }

    /// The checks the first two header bytes are enough for; returns the opcode.
    fn check_start(&self, first: u8, masked: bool, len7: u8) -> Result<OpCode, FrameError> {
        if first & RSV_BITS != 0 {
            return Err(FrameError::ReservedBits);
        }
        let opcode = OpCode::from_wire(first & OPCODE_BITS)?;
        match (self.role, masked) {
            (Role::Server, false) => return Err(FrameError::UnmaskedFrame),
            (Role::Client, true) => return Err(FrameError::MaskedFrame),
            _ => {}
        }
        if opcode.is_control() {
            if first & FIN_BIT == 0 {
                return Err(FrameError::FragmentedControl);
            }
            if usize::from(len7) > CONTROL_PAYLOAD_MAX {
                return Err(FrameError::OversizedControl);
            }
        }
        match (opcode, self.assembly.is_some()) {
            (OpCode::Continuation, false) => Err(FrameError::UnexpectedContinuation),
            (OpCode::Text | OpCode::Binary, true) => Err(FrameError::ExpectedContinuation),
            _ => Ok(opcode),
        }
    }

    /// Enforces `max_message` on data frames from the declared length alone; control frames are
    /// already capped at 125 bytes and never count towards a message.
    fn check_size(
        &self,
        opcode: OpCode,
        payload_len: u64,
        max_message: usize,
    ) -> Result<usize, FrameError> {
        let assembled = match &self.assembly {
            Some(assembly) if !opcode.is_control() => assembly.len(),
            _ => 0,
        };
        let size = payload_len.saturating_add(assembled as u64);
        let too_large = FrameError::MessageTooLarge {
            size,
            limit: max_message,
        };
        if !opcode.is_control() && size > max_message as u64 {
            return Err(too_large);
        }
        usize::try_from(payload_len).map_err(|_| too_large)
    }

    fn on_frame<F>(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
        on_message: &mut F,
    ) -> Result<ControlFlow<()>, FrameError>
    where
        F: FnMut(Message<'_>) -> ControlFlow<()>,
    {
        let message = match header.opcode {
            OpCode::Ping => Message::Ping(payload),
            OpCode::Pong => Message::Pong(payload),
            OpCode::Close => Message::Close(parse_close(payload)?),
            OpCode::Text if header.fin => Message::Text(validate_utf8(payload)?),
            OpCode::Binary if header.fin => Message::Binary(payload),
            OpCode::Text | OpCode::Binary => {
                self.assembly = Some(Box::new(Assembly::start(header.opcode, payload)?));
                return Ok(ControlFlow::Continue(()));
            }
            OpCode::Continuation => return self.continue_message(header.fin, payload, on_message),
        };
        Ok(on_message(message))
    }

    /// Appends a continuation frame; on the final one delivers the message and frees the buffer.
    fn continue_message<F>(
        &mut self,
        fin: bool,
        payload: &[u8],
        on_message: &mut F,
    ) -> Result<ControlFlow<()>, FrameError>
    where
        F: FnMut(Message<'_>) -> ControlFlow<()>,
    {
        let mut assembly = self
            .assembly
            .take()
            .ok_or(FrameError::UnexpectedContinuation)?;
        assembly.push(payload)?;
        if fin {
            return Ok(on_message(assembly.message()?));
        }
        self.assembly = Some(assembly);
        Ok(ControlFlow::Continue(()))
    }
}

/// A complete, unmasked, FIN-set frame (header + payload) in one buffer, as the server sends it.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(frame_len(payload.len(), false));
    write_frame(&mut out, opcode, true, payload, None);
    Bytes::from(out)
}

/// Appends one frame to `out`; masked when `mask` is given (client side).
pub fn write_frame(
    out: &mut Vec<u8>,
    opcode: OpCode,
    fin: bool,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    out.reserve(frame_len(payload.len(), mask.is_some()));
    out.push(if fin { FIN_BIT } else { 0 } | opcode.to_wire());
    push_length(out, mask.is_some(), payload.len());
    match mask {
        None => out.extend_from_slice(payload),
        Some(key) => {
            out.extend_from_slice(&key);
            let payload_start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[payload_start..], key);
        }
    }
}

/// A server close frame; the reason is cut (on a char boundary) to fit in 125 bytes.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut reason_len = reason.len().min(CLOSE_REASON_MAX);
    while !reason.is_char_boundary(reason_len) {
        reason_len -= 1;
    }
    let mut payload = [0; CONTROL_PAYLOAD_MAX];
    payload[..CLOSE_CODE_BYTES].copy_from_slice(&code.to_be_bytes());
    payload[CLOSE_CODE_BYTES..][..reason_len].copy_from_slice(&reason.as_bytes()[..reason_len]);
    encode_frame(OpCode::Close, &payload[..CLOSE_CODE_BYTES + reason_len])
}

/// A server close frame without status code (an empty payload), which the peer reports as 1005.
pub fn encode_close_without_status() -> Bytes {
    encode_frame(OpCode::Close, &[])
}

/// Whether a close code may appear in a close frame (RFC 6455 §7.4): 1000–1003, 1007–1014 and
/// 3000–4999.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A parsed, validated frame header.
#[derive(Debug)]
struct FrameHeader {
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; MASK_KEY_BYTES]>,
    header_len: usize,
    payload_len: usize,
}

impl FrameHeader {
    fn frame_len(&self) -> usize {
        self.header_len.saturating_add(self.payload_len)
    }
}

impl OpCode {
    fn from_wire(bits: u8) -> Result<Self, FrameError> {
        match bits {
            0x0 => Ok(Self::Continuation),
            0x1 => Ok(Self::Text),
            0x2 => Ok(Self::Binary),
            0x8 => Ok(Self::Close),
            0x9 => Ok(Self::Ping),
            0xA => Ok(Self::Pong),
            reserved => Err(FrameError::ReservedOpcode(reserved)),
        }
    }

    fn to_wire(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// The payload length from the 7-bit field and its extension (empty, 2 or 8 bytes).
/// Non-minimal encodings are accepted: RFC 6455 forbids sending them, but rejecting them buys
/// nothing.
fn read_length(len7: u8, ext: &[u8]) -> Result<u64, FrameError> {
    match *ext {
        [a, b] => Ok(u16::from_be_bytes([a, b]).into()),
        [a, b, c, d, e, f, g, h] => {
            let len = u64::from_be_bytes([a, b, c, d, e, f, g, h]);
            if len & EXT64_MSB != 0 {
                return Err(FrameError::LengthOverflow);
            }
            Ok(len)
        }
        _ => Ok(len7.into()),
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame<'_>>, FrameError> {
    match *payload {
        [] => Ok(None),
        [_] => Err(FrameError::InvalidClosePayload),
        [hi, lo, ref reason @ ..] => {
            let code = u16::from_be_bytes([hi, lo]);
            if !is_valid_close_code(code) {
                return Err(FrameError::InvalidCloseCode(code));
            }
            let reason = validate_utf8(reason)?;
            Ok(Some(CloseFrame { code, reason }))
        }
    }
}

fn validate_utf8(bytes: &[u8]) -> Result<&str, FrameError> {
    simdutf8::basic::from_utf8(bytes).map_err(|_| FrameError::InvalidUtf8)
}

/// XORs `data` with the repeating 4-byte key, a word at a time; `data` starts at key offset 0.
fn apply_mask(data: &mut [u8], key: [u8; MASK_KEY_BYTES]) {
    let [a, b, c, d] = key;
    let wide_key = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let (words, tail) = data.as_chunks_mut::<MASK_WORD_BYTES>();
    for word in words {
        *word = (u64::from_ne_bytes(*word) ^ wide_key).to_ne_bytes();
    }
    for (byte, k) in tail.iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// A fragmented data message being reassembled.
#[derive(Debug)]
enum Assembly {
    /// Text is validated fragment by fragment so bad UTF-8 fails the connection at once.
    Text {
        text: String,
        carry: Utf8Carry,
    },
    Binary(Vec<u8>),
}

impl Assembly {
    fn start(opcode: OpCode, first_fragment: &[u8]) -> Result<Self, FrameError> {
        let mut assembly = match opcode {
            OpCode::Text => Self::Text {
                text: String::with_capacity(first_fragment.len()),
                carry: Utf8Carry::default(),
            },
            _ => Self::Binary(Vec::with_capacity(first_fragment.len())),
        };
        assembly.push(first_fragment)?;
        Ok(assembly)
    }

    /// Bytes received so far, including an unfinished UTF-8 sequence.
    fn len(&self) -> usize {
        match self {
            Self::Text { text, carry } => text.len() + carry.len(),
            Self::Binary(bytes) => bytes.len(),
        }
    }

    fn push(&mut self, fragment: &[u8]) -> Result<(), FrameError> {
        match self {
            Self::Text { text, carry } => push_text(text, carry, fragment),
            Self::Binary(bytes) => {
                bytes.extend_from_slice(fragment);
                Ok(())
            }
        }
    }

    /// The finished message; text must not end in the middle of a character.
    fn message(&self) -> Result<Message<'_>, FrameError> {
        match self {
            Self::Text { carry, .. } if !carry.is_empty() => Err(FrameError::InvalidUtf8),
            Self::Text { text, .. } => Ok(Message::Text(text)),
            Self::Binary(bytes) => Ok(Message::Binary(bytes)),
        }
    }
}

/// Validates and appends one text fragment. Each byte is validated once: the fragment is split
/// before a trailing, unfinished character, which is carried into the next fragment.
fn push_text(text: &mut String, carry: &mut Utf8Carry, fragment: &[u8]) -> Result<(), FrameError> {
    let rest = carry.complete(text, fragment)?;
    if !carry.is_empty() {
        // The whole fragment went into a character that is still unfinished.
        return Ok(());
    }
    let (whole, unfinished) = rest.split_at(unfinished_tail_start(rest));
    text.push_str(validate_utf8(whole)?);
    carry.settle(text, unfinished)
}

/// Up to 3 bytes that begin a valid UTF-8 sequence whose remaining bytes are in the next
/// fragment.
#[derive(Clone, Debug, Default)]
struct Utf8Carry {
    bytes: [u8; UTF8_CARRY_MAX],
    len: u8,
}

impl Utf8Carry {
    fn len(&self) -> usize {
        usize::from(self.len)
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Moves the bytes that finish the carried character from the front of `fragment` (all of
    /// it if it is too short) into the carry; returns the rest of `fragment`.
    fn complete<'f>(
        &mut self,
        text: &mut String,
        fragment: &'f [u8],
    ) -> Result<&'f [u8], FrameError> {
        if self.is_empty() {
            return Ok(fragment);
        }
        let held = self.len();
        let take = (utf8_width(self.bytes[0]) - held).min(fragment.len());
        let (head, rest) = fragment.split_at(take);
        let mut seq = [0; UTF8_SEQ_MAX];
        seq[..held].copy_from_slice(&self.bytes[..held]);
        seq[held..held + take].copy_from_slice(head);
        self.settle(text, &seq[..held + take])?;
        Ok(rest)
    }

    /// Validates `bytes` (the carried bytes first) without keeping them; keeps an unfinished
    /// character at the end in the carry. Fails if `bytes` can never become valid.
    fn hold_unfinished(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        match simdutf8::compat::from_utf8(bytes) {
            Ok(_) => {
                self.len = 0;
                Ok(())
            }
            Err(e) if e.error_len().is_none() => {
                let tail = &bytes[e.valid_up_to()..];
                assert!(tail.len() <= UTF8_CARRY_MAX, "an unfinished character");
                self.bytes[..tail.len()].copy_from_slice(tail);
                self.len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(FrameError::InvalidUtf8),
        }
    }

    /// Appends `seq` to `text` if it is complete, keeps it if it is the valid start of a
    /// character (never more than 3 bytes), fails if it can never become valid.
    fn settle(&mut self, text: &mut String, seq: &[u8]) -> Result<(), FrameError> {
        match simdutf8::compat::from_utf8(seq) {
            Ok(complete) => {
                text.push_str(complete);
                self.len = 0;
                Ok(())
            }
            Err(e) if e.error_len().is_none() && e.valid_up_to() == 0 => {
                self.bytes[..seq.len()].copy_from_slice(seq);
                self.len = seq.len() as u8;
                Ok(())
            }
            Err(_) => Err(FrameError::InvalidUtf8),
        }
    }
}

/// Where an unfinished character at the end of `bytes` starts (`bytes.len()` if there is
/// none): a lead byte among the last 3 bytes announcing more bytes than follow it.
fn unfinished_tail_start(bytes: &[u8]) -> usize {
    let len = bytes.len();
    let Some(lead) = (len.saturating_sub(UTF8_CARRY_MAX)..len)
        .rev()
        .find(|&i| !is_utf8_continuation(bytes[i]))
    else {
        return len;
    };
    if len - lead < utf8_width(bytes[lead]) {
        lead
    } else {
        len
    }
}

fn is_utf8_continuation(byte: u8) -> bool {
    byte & 0xC0 == 0x80
}

/// The sequence length a lead byte announces; 1 for ASCII and for bytes that cannot lead
/// (validation rejects those).
fn utf8_width(lead: u8) -> usize {
    match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 1,
    }
}

/// The second header byte and the extended length, using the shortest encoding.
fn push_length(out: &mut Vec<u8>, masked: bool, len: usize) {
    let mask_bit = if masked { MASK_BIT } else { 0 };
    if len <= LEN7_MAX {
        out.push(mask_bit | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.push(mask_bit | LEN7_EXT16);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(mask_bit | LEN7_EXT64);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Header plus payload size of a frame with the minimal length encoding.
fn frame_len(payload_len: usize, masked: bool) -> usize {
    let ext = match payload_len {
        0..=LEN7_MAX => 0,
        _ if payload_len <= usize::from(u16::MAX) => EXT16_BYTES,
        _ => EXT64_BYTES,
    };
    let key = if masked { MASK_KEY_BYTES } else { 0 };
    BASE_HEADER_BYTES + ext + key + payload_len
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    const MAX: usize = 2 << 20;

    /// A message with its borrowed data copied out of the decode buffer.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Owned {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<(u16, String)>),
    }

    impl From<Message<'_>> for Owned {
        fn from(message: Message<'_>) -> Self {
            match message {
                Message::Text(text) => Self::Text(text.to_owned()),
                Message::Binary(bytes) => Self::Binary(bytes.to_vec()),
                Message::Ping(bytes) => Self::Ping(bytes.to_vec()),
                Message::Pong(bytes) => Self::Pong(bytes.to_vec()),
                Message::Close(frame) => Self::Close(frame.map(|f| (f.code, f.reason.to_owned()))),
            }
        }
    }

    fn text(s: &str) -> Owned {
        Owned::Text(s.to_owned())
    }

    /// A client frame, as a browser would send it.
    fn masked(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, opcode, fin, payload, Some(KEY));
        out
    }

    fn unmasked(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, opcode, fin, payload, None);
        out
    }

    fn feed(
        decoder: &mut Decoder,
        bytes: &[u8],
        max: usize,
    ) -> Result<(usize, Vec<Owned>), FrameError> {
        let mut buf = bytes.to_vec();
        let mut messages = Vec::new();
        let consumed = decoder.decode(&mut buf, max, |message| {
            messages.push(message.into());
            ControlFlow::Continue(())
        })?;
        Ok((consumed, messages))
    }

    fn decode_all(role: Role, bytes: &[u8]) -> Result<(usize, Vec<Owned>), FrameError> {
        feed(&mut Decoder::new(role), bytes, MAX)
    }

    fn decode_err(role: Role, bytes: &[u8]) -> FrameError {
        decode_all(role, bytes).expect_err("decoding should fail")
    }

    fn concat(frames: &[Vec<u8>]) -> Vec<u8> {
        frames.concat()
    }

    // --- RFC 6455 §5.7 examples ---

    #[test]
    fn rfc_single_frame_unmasked_text() {
        let frame = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(
            decode_all(Role::Client, &frame),
            Ok((7, vec![text("Hello")]))
        );
        assert_eq!(&encode_frame(OpCode::Text, b"Hello")[..], &frame);
    }

    #[test]
    fn rfc_single_frame_masked_text() {
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(
            decode_all(Role::Server, &frame),
            Ok((11, vec![text("Hello")]))
        );
        assert_eq!(masked(OpCode::Text, true, b"Hello"), frame);
    }

    #[test]
    fn rfc_fragmented_unmasked_text() {
        let frames = [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
        assert_eq!(
            decode_all(Role::Client, &frames),
            Ok((9, vec![text("Hello")]))
        );
        let written = concat(&[
            unmasked(OpCode::Text, false, b"Hel"),
            unmasked(OpCode::Continuation, true, b"lo"),
        ]);
        assert_eq!(written, frames);
    }

    #[test]
    fn rfc_ping_and_masked_pong() {
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let expected = Owned::Ping(b"Hello".to_vec());
        assert_eq!(decode_all(Role::Client, &ping), Ok((7, vec![expected])));
        let pong = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let expected = Owned::Pong(b"Hello".to_vec());
        assert_eq!(decode_all(Role::Server, &pong), Ok((11, vec![expected])));
    }

    #[test]
    fn rfc_extended_length_headers() {
        let frame = encode_frame(OpCode::Binary, &[0; 256]);
        assert_eq!(&frame[..4], &[0x82, 0x7E, 0x01, 0x00]);
        let frame = encode_frame(OpCode::Binary, &[0; 65536]);
        assert_eq!(&frame[..10], &[0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0, 0]);
    }

    // --- round trips and encoding ---

    #[test]
    fn masked_round_trip_at_length_boundaries() {
        for len in [0, 1, 125, 126, 65535, 65536, 1 << 20] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let ascii: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            let cases = [
                (OpCode::Binary, bytes.clone(), Owned::Binary(bytes)),
                (OpCode::Text, ascii.clone().into_bytes(), Owned::Text(ascii)),
            ];
            for (opcode, payload, expected) in cases {
                let frame = masked(opcode, true, &payload);
                assert_eq!(frame.len(), frame_len(len, true), "len {len}");
                let decoded = decode_all(Role::Server, &frame);
                assert_eq!(decoded, Ok((frame.len(), vec![expected])), "len {len}");
            }
        }
    }

    #[test]
    fn unmasked_round_trip_for_client_role() {
        for len in [0, 125, 126, 70_000] {
            let payload = vec![7; len];
            let frame = encode_frame(OpCode::Binary, &payload);
            let decoded = decode_all(Role::Client, &frame);
            assert_eq!(decoded, Ok((frame.len(), vec![Owned::Binary(payload)])));
        }
    }

    #[test]
    fn encoding_uses_minimal_length_field() {
        let cases: [(usize, usize, u8); 6] = [
            (0, 2, 0),
            (125, 2, 125),
            (126, 4, 126),
            (65535, 4, 126),
            (65536, 10, 127),
            (1 << 20, 10, 127),
        ];
        for (len, header, len7) in cases {
            let frame = encode_frame(OpCode::Binary, &vec![1; len]);
            assert_eq!(frame.len(), header + len, "len {len}");
            assert_eq!(frame[0], 0x82);
            assert_eq!(frame[1], len7, "len {len}");
            assert_eq!(frame_len(len, false), header + len);
            assert_eq!(frame_len(len, true), header + MASK_KEY_BYTES + len);
        }
        assert_eq!(frame_len(1 << 20, true) - (1 << 20), FRAME_HEADER_MAX);
    }

    #[test]
    fn write_frame_appends_and_masks_only_the_copy() {
        let payload = b"payload to mask".to_vec();
        let mut out = vec![0xAA];
        write_frame(&mut out, OpCode::Binary, false, &payload, Some(KEY));
        assert_eq!(out[0], 0xAA, "existing bytes are kept");
        assert_eq!(out[1], 0x02, "FIN clear, binary");
        assert_eq!(out[2], MASK_BIT | payload.len() as u8);
        assert_eq!(&out[3..7], &KEY);
        assert_ne!(&out[7..], &payload[..]);
        apply_mask(&mut out[7..], KEY);
        assert_eq!(&out[7..], &payload[..]);
        assert_eq!(payload, b"payload to mask");
    }

    #[test]
    fn word_unmasking_matches_bytewise_xor() {
        for key in [KEY, [0; 4], [0xFF, 0, 0x80, 1]] {
            for len in 0..40 {
                let original: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                let mut data = original.clone();
                apply_mask(&mut data, key);
                let expected: Vec<u8> = original
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ key[i % 4])
                    .collect();
                assert_eq!(data, expected, "len {len}");
            }
        }
    }

    #[test]
    fn encode_close_round_trips() {
        let frame = encode_close(1000, "bye");
        assert_eq!(&frame[..], &[0x88, 0x05, 0x03, 0xE8, b'b', b'y', b'e']);
        let decoded = decode_all(Role::Client, &frame);
        assert_eq!(
            decoded,
            Ok((7, vec![Owned::Close(Some((1000, "bye".into())))]))
        );
    }

    #[test]
    fn encode_close_cuts_reason_on_char_boundary() {
        let cases = [
            ("a".repeat(123), 123),
            ("a".repeat(200), 123),
            ("é".repeat(100), 122),
            (format!("{}€", "a".repeat(121)), 121),
            ("🦀".repeat(40), 120),
        ];
        for (reason, kept) in cases {
            let frame = encode_close(1001, &reason);
            assert!(frame.len() - 2 <= CONTROL_PAYLOAD_MAX);
            let (_, messages) = decode_all(Role::Client, &frame).expect("valid close");
            let expected = Owned::Close(Some((1001, reason[..kept].to_owned())));
            assert_eq!(messages, vec![expected]);
        }
    }

    #[test]
    fn non_minimal_length_encoding_is_accepted() {
        let frame = [0x82, 0x7E, 0x00, 0x02, 0xAB, 0xCD];
        let decoded = decode_all(Role::Client, &frame);
        assert_eq!(decoded, Ok((6, vec![Owned::Binary(vec![0xAB, 0xCD])])));
    }

    // --- partial input ---

    fn frame_sample() -> Vec<Vec<u8>> {
        vec![
            masked(OpCode::Text, true, b"Hello"),
            masked(OpCode::Ping, true, b""),
            masked(OpCode::Binary, true, &[9; 200]),
            masked(OpCode::Text, false, "h€".as_bytes()),
            masked(OpCode::Continuation, true, b"llo"),
            masked(OpCode::Close, true, &[0x03, 0xE8, b'o', b'k']),
        ]
    }

    #[test]
    fn every_prefix_consumes_only_whole_frames() {
        let frames = frame_sample();
        let stream = concat(&frames);
        let (_, all) = decode_all(Role::Server, &stream).expect("valid stream");
        let delivered_after = [1, 2, 3, 3, 4, 5];
        for cut in 0..=stream.len() {
            let (consumed, messages) =
                decode_all(Role::Server, &stream[..cut]).expect("valid prefix");
            let mut boundary = 0;
            let mut whole = 0;
            for frame in &frames {
                if boundary + frame.len() > cut {
                    break;
                }
                boundary += frame.len();
                whole += 1;
            }
            assert_eq!(consumed, boundary, "cut {cut}");
            let delivered = if whole == 0 {
                0
            } else {
                delivered_after[whole - 1]
            };
            assert_eq!(messages, all[..delivered], "cut {cut}");
        }
    }

    #[test]
    fn byte_by_byte_feeding_delivers_everything() {
        let stream = concat(&frame_sample());
        let (_, all) = decode_all(Role::Server, &stream).expect("valid stream");
        let mut decoder = Decoder::new(Role::Server);
        let mut pending = Vec::new();
        let mut messages = Vec::new();
        for &byte in &stream {
            pending.push(byte);
            let (consumed, got) = feed(&mut decoder, &pending, MAX).expect("valid stream");
            pending.drain(..consumed);
            messages.extend(got);
        }
        assert!(pending.is_empty());
        assert_eq!(messages, all);
    }

    #[test]
    fn trailing_partial_frame_is_left_in_place() {
        let first = masked(OpCode::Text, true, b"one");
        let second = masked(OpCode::Text, true, b"two");
        let mut stream = concat(&[first.clone(), second.clone()]);
        stream.extend_from_slice(&masked(OpCode::Text, true, b"three")[..5]);
        let decoded = decode_all(Role::Server, &stream);
        assert_eq!(
            decoded,
            Ok((first.len() + second.len(), vec![text("one"), text("two")]))
        );
    }

    // --- fragmentation ---

    #[test]
    fn fragmented_text_with_interleaved_control_frames() {
        let stream = concat(&[
            masked(OpCode::Text, false, b"Hel"),
            masked(OpCode::Ping, true, b"p"),
            masked(OpCode::Continuation, false, b"lo "),
            masked(OpCode::Pong, true, b"q"),
            masked(OpCode::Continuation, false, b""),
            masked(OpCode::Continuation, true, b"world"),
        ]);
        let expected = vec![
            Owned::Ping(b"p".to_vec()),
            Owned::Pong(b"q".to_vec()),
            text("Hello world"),
        ];
        assert_eq!(
            decode_all(Role::Server, &stream),
            Ok((stream.len(), expected))
        );
    }

    #[test]
    fn fragmented_binary_across_decode_calls() {
        let first = masked(OpCode::Binary, false, &[1, 2]);
        let ping = masked(OpCode::Ping, true, b"");
        let last = masked(OpCode::Continuation, true, &[3]);
        let mut decoder = Decoder::new(Role::Server);
        assert!(!decoder.is_assembling());
        assert_eq!(feed(&mut decoder, &first, MAX), Ok((first.len(), vec![])));
        assert!(decoder.is_assembling());
        let ping_only = vec![Owned::Ping(vec![])];
        assert_eq!(feed(&mut decoder, &ping, MAX), Ok((ping.len(), ping_only)));
        assert!(decoder.is_assembling());
        let message = vec![Owned::Binary(vec![1, 2, 3])];
        assert_eq!(feed(&mut decoder, &last, MAX), Ok((last.len(), message)));
        assert!(!decoder.is_assembling());
    }

    #[test]
    fn single_fragment_message_with_fin_on_empty_continuation() {
        let stream = concat(&[
            masked(OpCode::Binary, false, b"all"),
            masked(OpCode::Continuation, true, b""),
        ]);
        let expected = vec![Owned::Binary(b"all".to_vec())];
        assert_eq!(
            decode_all(Role::Server, &stream),
            Ok((stream.len(), expected))
        );
    }

    #[test]
    fn decoder_is_heap_free_when_idle() {
        // The role, the boxed assembly and the 8-byte fail-fast state of a partial text frame.
        assert!(std::mem::size_of::<Decoder>() <= 24);
        let mut decoder = Decoder::new(Role::Server);
        assert!(decoder.assembly.is_none());
        let stream = concat(&[
            masked(OpCode::Text, false, b"a"),
            masked(OpCode::Continuation, true, b"b"),
        ]);
        let (_, messages) = feed(&mut decoder, &stream, MAX).expect("valid stream");
        assert_eq!(messages, vec![text("ab")]);
        assert!(decoder.assembly.is_none());
        feed(&mut decoder, &masked(OpCode::Text, true, b"whole"), MAX).expect("valid frame");
        assert!(decoder.assembly.is_none());
    }

    #[test]
    fn unfragmented_messages_borrow_the_input_buffer() {
        let stream = concat(&[
            masked(OpCode::Text, true, b"text"),
            masked(OpCode::Binary, true, &[1; 300]),
        ]);
        let mut buf = stream.clone();
        let range = buf.as_ptr_range();
        let mut borrowed = Vec::new();
        Decoder::new(Role::Server)
            .decode(&mut buf, MAX, |message| {
                let data = match message {
                    Message::Text(text) => text.as_bytes(),
                    Message::Binary(bytes) => bytes,
                    _ => unreachable!("only data frames were sent"),
                };
                borrowed.push(range.contains(&data.as_ptr()));
                ControlFlow::Continue(())
            })
            .expect("valid stream");
        assert_eq!(borrowed, [true, true]);
    }

    // --- callback control ---

    #[test]
    fn break_stops_after_the_current_frame() {
        let first = masked(OpCode::Text, true, b"1");
        let stream = concat(&[
            first.clone(),
            masked(OpCode::Text, true, b"2"),
            masked(OpCode::Text, true, b"3"),
        ]);
        let mut buf = stream.clone();
        let mut decoder = Decoder::new(Role::Server);
        let mut seen = Vec::new();
        let consumed = decoder
            .decode(&mut buf, MAX, |message| {
                seen.push(Owned::from(message));
                ControlFlow::Break(())
            })
            .expect("valid stream");
        assert_eq!(consumed, first.len());
        assert_eq!(seen, vec![text("1")]);
        let rest = feed(&mut decoder, &stream[consumed..], MAX);
        assert_eq!(
            rest,
            Ok((stream.len() - consumed, vec![text("2"), text("3")]))
        );
    }

    #[test]
    fn break_on_final_fragment_counts_that_frame() {
        let stream = concat(&[
            masked(OpCode::Text, false, b"a"),
            masked(OpCode::Continuation, true, b"b"),
            masked(OpCode::Text, true, b"c"),
        ]);
        let mut buf = stream.clone();
        let mut decoder = Decoder::new(Role::Server);
        let consumed = decoder
            .decode(&mut buf, MAX, |_| ControlFlow::Break(()))
            .expect("valid stream");
        assert_eq!(
            consumed,
            stream.len() - masked(OpCode::Text, true, b"c").len()
        );
        assert!(!decoder.is_assembling());
    }

    // --- errors ---

    #[test]
    fn header_errors_fail_from_the_first_two_bytes() {
        let mut text_then_text = masked(OpCode::Text, false, b"a");
        text_then_text.extend_from_slice(&masked(OpCode::Text, true, b"b")[..2]);
        let mut text_then_binary = masked(OpCode::Text, false, b"a");
        text_then_binary.extend_from_slice(&masked(OpCode::Binary, true, b"b")[..2]);
        let cases: Vec<(Role, Vec<u8>, FrameError)> = vec![
            (Role::Server, vec![0x81, 0x05], FrameError::UnmaskedFrame),
            (Role::Client, vec![0x81, 0x85], FrameError::MaskedFrame),
            (Role::Server, vec![0xC1, 0x85], FrameError::ReservedBits),
            (Role::Server, vec![0xA1, 0x85], FrameError::ReservedBits),
            (Role::Server, vec![0x91, 0x85], FrameError::ReservedBits),
            (
                Role::Server,
                vec![0x09, 0x80],
                FrameError::FragmentedControl,
            ),
            (
                Role::Server,
                vec![0x08, 0x80],
                FrameError::FragmentedControl,
            ),
            (Role::Server, vec![0x8A, 0xFE], FrameError::OversizedControl),
            (Role::Server, vec![0x88, 0xFF], FrameError::OversizedControl),
            (
                Role::Server,
                vec![0x80, 0x81],
                FrameError::UnexpectedContinuation,
            ),
            (
                Role::Server,
                vec![0x00, 0x81],
                FrameError::UnexpectedContinuation,
            ),
            (
                Role::Server,
                text_then_text,
                FrameError::ExpectedContinuation,
            ),
            (
                Role::Server,
                text_then_binary,
                FrameError::ExpectedContinuation,
            ),
        ];
        for (role, bytes, expected) in cases {
            assert_eq!(decode_err(role, &bytes), expected, "{bytes:02x?}");
        }
    }

    #[test]
    fn reserved_opcodes_are_rejected() {
        for opcode in (0x3..=0x7).chain(0xB..=0xF) {
            let bytes = [0x80 | opcode, 0x80];
            assert_eq!(
                decode_err(Role::Server, &bytes),
                FrameError::ReservedOpcode(opcode)
            );
        }
    }

    #[test]
    fn oversized_control_frames_are_rejected() {
        for opcode in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
            let frame = masked(opcode, true, &[0x03; 126]);
            assert_eq!(
                decode_err(Role::Server, &frame),
                FrameError::OversizedControl
            );
            let mut limit = vec![0x03, 0xE8];
            limit.resize(CONTROL_PAYLOAD_MAX, b'x');
            assert!(decode_all(Role::Server, &masked(opcode, true, &limit)).is_ok());
        }
    }

    #[test]
    fn length_with_msb_set_overflows() {
        let header = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            decode_err(Role::Server, &header),
            FrameError::LengthOverflow
        );
    }

    #[test]
    fn message_too_large_from_the_header_alone() {
        let header = [0x82, 0xFE, 0x03, 0xE9];
        let expected = FrameError::MessageTooLarge {
            size: 1001,
            limit: 1000,
        };
        assert_eq!(
            feed(&mut Decoder::new(Role::Server), &header, 1000),
            Err(expected)
        );
        let huge = [0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        let error = feed(&mut Decoder::new(Role::Server), &huge, 1000).expect_err("too large");
        assert_eq!(error.close_code().code(), 1009);
    }

    #[test]
    fn message_at_the_limit_is_accepted() {
        let frame = masked(OpCode::Binary, true, &[0; 1000]);
        let decoded = feed(&mut Decoder::new(Role::Server), &frame, 1000);
        assert_eq!(
            decoded,
            Ok((frame.len(), vec![Owned::Binary(vec![0; 1000])]))
        );
    }

    #[test]
    fn message_too_large_counts_earlier_fragments() {
        let mut decoder = Decoder::new(Role::Server);
        let first = masked(OpCode::Binary, false, &[0; 600]);
        assert_eq!(feed(&mut decoder, &first, 1000), Ok((first.len(), vec![])));
        let next = &masked(OpCode::Continuation, true, &[0; 401])[..4];
        let expected = FrameError::MessageTooLarge {
            size: 1001,
            limit: 1000,
        };
        assert_eq!(feed(&mut decoder, next, 1000), Err(expected));
    }

    #[test]
    fn control_frames_do_not_count_towards_the_message_limit() {
        let stream = concat(&[
            masked(OpCode::Binary, false, &[0; 8]),
            masked(OpCode::Ping, true, &[0; 100]),
            masked(OpCode::Continuation, true, &[0; 2]),
        ]);
        let (_, messages) = feed(&mut Decoder::new(Role::Server), &stream, 10).expect("fits");
        assert_eq!(messages[1], Owned::Binary(vec![0; 10]));
    }

    #[test]
    fn close_payload_rules() {
        let close =
            |payload: &[u8]| decode_all(Role::Server, &masked(OpCode::Close, true, payload));
        assert_eq!(close(b""), Ok((6, vec![Owned::Close(None)])));
        let expected = Owned::Close(Some((1000, String::new())));
        assert_eq!(close(&[0x03, 0xE8]), Ok((8, vec![expected])));
        let expected = Owned::Close(Some((4999, "ciao é".into())));
        let payload = [&[0x13, 0x87][..], "ciao é".as_bytes()].concat();
        assert_eq!(close(&payload).map(|(_, m)| m), Ok(vec![expected]));
        assert_eq!(close(&[0x03]), Err(FrameError::InvalidClosePayload));
        assert_eq!(close(&[0x03, 0xE8, 0xFF]), Err(FrameError::InvalidUtf8));
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX] {
            let payload = code.to_be_bytes();
            assert_eq!(
                close(&payload),
                Err(FrameError::InvalidCloseCode(code)),
                "{code}"
            );
        }
    }

    #[test]
    fn close_code_validity_table() {
        let valid = [
            1000, 1001, 1002, 1003, 1007, 1008, 1010, 1011, 1014, 3000, 4000, 4999,
        ];
        let invalid = [
            0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535,
        ];
        for code in valid {
            assert!(is_valid_close_code(code), "{code}");
        }
        for code in invalid {
            assert!(!is_valid_close_code(code), "{code}");
        }
    }

    #[test]
    fn close_codes_for_errors() {
        let cases = [
            (FrameError::UnmaskedFrame, 1002),
            (FrameError::MaskedFrame, 1002),
            (FrameError::ReservedBits, 1002),
            (FrameError::ReservedOpcode(3), 1002),
            (FrameError::FragmentedControl, 1002),
            (FrameError::OversizedControl, 1002),
            (FrameError::UnexpectedContinuation, 1002),
            (FrameError::ExpectedContinuation, 1002),
            (FrameError::InvalidUtf8, 1007),
            (FrameError::InvalidClosePayload, 1002),
            (FrameError::InvalidCloseCode(1005), 1002),
            (FrameError::LengthOverflow, 1002),
            (FrameError::MessageTooLarge { size: 2, limit: 1 }, 1009),
        ];
        for (error, code) in cases {
            assert_eq!(error.close_code().code(), code, "{error}");
        }
    }

    // --- UTF-8 ---

    #[test]
    fn invalid_utf8_in_single_frames() {
        let cases: [&[u8]; 7] = [
            b"\xFF",
            b"\xC0\x80",
            b"\xED\xA0\x80",
            b"\xF4\x90\x80\x80",
            b"\xE2\x82",
            b"ok\x80",
            b"\xCE\xBA\xE1\xBD\xB9\xCF\x83\xCE\xBC\xCE\xB5\xED\xA0\x80edited",
        ];
        for payload in cases {
            let frame = masked(OpCode::Text, true, payload);
            assert_eq!(
                decode_err(Role::Server, &frame),
                FrameError::InvalidUtf8,
                "{payload:02x?}"
            );
            let fragmented = concat(&[
                masked(OpCode::Text, false, payload),
                masked(OpCode::Continuation, true, b""),
            ]);
            assert_eq!(
                decode_err(Role::Server, &fragmented),
                FrameError::InvalidUtf8
            );
        }
    }

    #[test]
    fn invalid_utf8_fails_before_the_final_fragment() {
        let fail_fast: [&[&[u8]]; 6] = [
            &[b"\xFF"],
            &[b"valid", b"\xC0"],
            &[
                b"\xCE\xBA\xE1\xBD\xB9\xCF\x83\xCE\xBC\xCE\xB5",
                b"\xF4\x90\x80\x80",
            ],
            // Can never become valid, even though it is only a prefix.
            &[b"\xF4\x90"],
            &[b"\xE0\x80"],
            // A carried lead byte followed by a non-continuation byte.
            &[b"\xE2", b"A"],
        ];
        for fragments in fail_fast {
            let mut stream = masked(OpCode::Text, false, fragments[0]);
            for fragment in &fragments[1..] {
                stream.extend(masked(OpCode::Continuation, false, fragment));
            }
            assert_eq!(
                decode_err(Role::Server, &stream),
                FrameError::InvalidUtf8,
                "{fragments:02x?}"
            );
        }
    }

    /// Feeds `stream` in growing prefixes (as a socket would deliver it), each call getting the
    /// unconsumed rest plus the next `step` bytes; returns the first error and the stream
    /// length received when it happened.
    fn feed_in_steps(stream: &[u8], step: usize) -> Result<Vec<Owned>, (FrameError, usize)> {
        let mut decoder = Decoder::new(Role::Server);
        let mut messages = Vec::new();
        let mut start = 0;
        let mut end = 0;
        while end < stream.len() {
            end = (end + step).min(stream.len());
            let (consumed, got) =
                feed(&mut decoder, &stream[start..end], MAX).map_err(|e| (e, end))?;
            messages.extend(got);
            start += consumed;
        }
        Ok(messages)
    }

    #[test]
    fn invalid_utf8_fails_before_its_frame_completes() {
        // A single text frame: valid text, then a byte that can never be UTF-8, then more.
        let payload = [b"\xCE\xBA\xE1\xBD\xB9".as_slice(), b"\xFF", &[b'a'; 5000]].concat();
        let stream = masked(OpCode::Text, true, &payload);
        let header = stream.len() - payload.len();
        // The bad byte is at payload offset 5: it fails with exactly that byte received.
        for step in [1, 3, 7] {
            let (err, received) = feed_in_steps(&stream, step).unwrap_err();
            assert_eq!(err, FrameError::InvalidUtf8);
            assert!(
                received >= header + 6 && received < header + 6 + step,
                "{received}"
            );
        }
        // In a continuation of a text message, with a character carried from the frame before.
        let first = masked(OpCode::Text, false, b"a\xE2");
        let cont = masked(
            OpCode::Continuation,
            true,
            &[b"\x82\xAC".as_slice(), &[b'b'; 5000]].concat(),
        );
        let bad = masked(
            OpCode::Continuation,
            true,
            &[b"\x41".as_slice(), &[b'b'; 5000]].concat(),
        );
        let ok = feed_in_steps(&concat(&[first.clone(), cont]), 2).unwrap();
        assert_eq!(ok.len(), 1);
        let stream = concat(&[first.clone(), bad]);
        let (err, received) = feed_in_steps(&stream, 1).unwrap_err();
        assert_eq!(err, FrameError::InvalidUtf8);
        assert!(received < first.len() + 10, "{received}");
    }

    #[test]
    fn valid_text_in_any_chops_is_accepted() {
        let message = "aé€🦀z".repeat(1500);
        let stream = concat(&[
            masked(OpCode::Text, false, &message.as_bytes()[..4001]),
            masked(OpCode::Ping, true, b"p"),
            masked(OpCode::Continuation, true, &message.as_bytes()[4001..]),
            masked(OpCode::Text, true, message.as_bytes()),
        ]);
        for step in [1, 2, 3, 5, 4099, stream.len()] {
            let messages = feed_in_steps(&stream, step).expect("valid stream");
            assert_eq!(
                messages,
                vec![Owned::Ping(b"p".to_vec()), text(&message), text(&message)],
                "step {step}"
            );
        }
    }

    #[test]
    fn unfinished_character_at_message_end_is_invalid() {
        let stream = concat(&[
            masked(OpCode::Text, false, b"a\xE2"),
            masked(OpCode::Continuation, false, b"\x82"),
            masked(OpCode::Continuation, true, b""),
        ]);
        assert_eq!(decode_err(Role::Server, &stream), FrameError::InvalidUtf8);
    }

    #[test]
    fn characters_split_across_fragments_are_accepted() {
        let message = "aé€🦀z".as_bytes();
        for first in 0..=message.len() {
            for second in first..=message.len() {
                let stream = concat(&[
                    masked(OpCode::Text, false, &message[..first]),
                    masked(OpCode::Ping, true, b""),
                    masked(OpCode::Continuation, false, &message[first..second]),
                    masked(OpCode::Continuation, true, &message[second..]),
                ]);
                let (_, messages) = decode_all(Role::Server, &stream).expect("valid UTF-8");
                assert_eq!(
                    messages,
                    vec![Owned::Ping(vec![]), text("aé€🦀z")],
                    "{first} {second}"
                );
            }
        }
    }

    #[test]
    fn four_byte_character_one_byte_per_fragment() {
        let crab = "🦀".as_bytes();
        let mut stream = masked(OpCode::Text, false, &crab[..1]);
        stream.extend(masked(OpCode::Continuation, false, &crab[1..2]));
        stream.extend(masked(OpCode::Continuation, false, &crab[2..3]));
        stream.extend(masked(OpCode::Continuation, true, &crab[3..]));
        assert_eq!(
            decode_all(Role::Server, &stream),
            Ok((stream.len(), vec![text("🦀")]))
        );
    }

    #[test]
    fn unfinished_tail_detection() {
        let cases: [(&[u8], usize); 8] = [
            (b"", 0),
            (b"abc", 3),
            (b"a\xC3", 1),
            (b"a\xC3\xA9", 3),
            (b"\xE2\x82", 0),
            (b"x\xF0\x9F\xA6", 1),
            (b"\xF0\x9F\xA6\x80", 4),
            (b"a\x80\x80\x80", 4),
        ];
        for (bytes, start) in cases {
            assert_eq!(unfinished_tail_start(bytes), start, "{bytes:02x?}");
        }
    }
}
