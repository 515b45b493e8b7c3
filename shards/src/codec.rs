//! RFC 6455 framing, sans-IO: bytes in, messages out; messages in, frame bytes out.
//!
//! Owns: frame header parsing, unmasking, fragment reassembly, UTF-8 validation of text
//! (fail-fast across fragments), control-frame rules, close payload validation, and encoding of
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

/// Longest frame header: 2 bytes + 8 bytes extended length + 4 bytes mask.
pub const FRAME_HEADER_MAX: usize = 14;
/// RFC 6455 §5.5: control frame payloads are at most this long.
pub const CONTROL_PAYLOAD_MAX: usize = 125;

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

/// Which side of the connection this decoder is: a server requires masked input, a client
/// requires unmasked input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// A close frame's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    pub code: u16,
    pub reason: &'a str,
}

/// A complete message (data messages reassembled from their fragments) or a control frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// `None` when the close frame had no payload.
    Close(Option<CloseFrame<'a>>),
}

/// What the peer did wrong. Each maps to the close code we answer with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("client frame not masked")]
    UnmaskedFrame,
    #[error("server frame masked")]
    MaskedFrame,
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("control frame payload over 125 bytes")]
    OversizedControl,
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    #[error("close frame payload of one byte")]
    InvalidClosePayload,
    #[error("close code {0} is not allowed on the wire")]
    InvalidCloseCode(u16),
    #[error("64-bit payload length with the most significant bit set")]
    LengthOverflow,
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    MessageTooLarge { size: u64, limit: usize },
}

impl FrameError {
    /// The close code to answer this error with: 1007 for bad UTF-8, 1009 for size, else 1002.
    pub fn close_code(&self) -> u16 {
        todo!()
    }
}

/// Incremental frame decoder for one connection.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
}

impl Decoder {
    pub fn new(role: Role) -> Self {
        Self { role }
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
        on_message: impl FnMut(Message<'_>) -> ControlFlow<()>,
    ) -> Result<usize, FrameError> {
        let _ = (buf, max_message, on_message, self.role);
        todo!()
    }

    /// True while a fragmented message is being reassembled.
    pub fn is_assembling(&self) -> bool {
        todo!()
    }
}

/// A complete, unmasked, FIN-set frame (header + payload) in one buffer, as the server sends it.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let _ = (opcode, payload);
    todo!()
}

/// Appends one frame to `out`; masked when `mask` is given (client side).
pub fn write_frame(out: &mut Vec<u8>, opcode: OpCode, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) {
    let _ = (out, opcode, fin, payload, mask);
    todo!()
}

/// A server close frame; the reason is cut (on a char boundary) to fit in 125 bytes.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let _ = (code, reason);
    todo!()
}

/// Whether a close code may appear in a close frame (RFC 6455 §7.4): 1000–1003, 1007–1014 and
/// 3000–4999.
pub fn is_valid_close_code(code: u16) -> bool {
    let _ = code;
    todo!()
}
