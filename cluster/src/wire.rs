//! The cluster wire format: an 8-byte preface, then length-prefixed frames; CTRL and BATCH
//! frames carry records. Every decoder here takes arbitrary bytes: it returns an error, never
//! panics, and allocates at most what the (bounded) input length justifies.
//!
//! ```text
//! preface: "WSEC" | u16 min_version | u16 max_version                       (little-endian)
//! frame:   u32 len | u8 type | u8 flags | u16 0 | body                      (len = 4 + body)
//! record:  u8 kind | varint len | body                                      (inside CTRL / BATCH)
//! ```

use std::io::Read;

/// The preface's magic bytes.
pub const MAGIC: [u8; 4] = *b"WSEC";
/// Length of the preface in bytes.
pub const PREFACE_LEN: usize = 8;
/// The lowest protocol version this build speaks.
pub const MIN_VERSION: u16 = 1;
/// The highest protocol version this build speaks.
pub const MAX_VERSION: u16 = 1;
/// Length of a frame header in bytes (`u32 len`, type, flags, reserved).
pub const HEADER_LEN: usize = 8;
/// Largest frame after authentication, in bytes (the `len` field's bound).
pub const MAX_FRAME: usize = 4 * 1024 * 1024;
/// Largest frame before authentication, in bytes: a HELLO, AUTH or GOODBYE fits easily, and an
/// unauthenticated socket cannot make us buffer more.
pub const PREAUTH_MAX_FRAME: usize = 4 * 1024;
/// Largest decompressed BATCH body, in bytes: a zstd bomb stops here.
pub const MAX_DECOMPRESSED: usize = MAX_FRAME;
/// zstd window bound for decompression (2^22 = 4 MiB): a frame header asking for a larger window
/// is refused before the decoder allocates it.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 22;
/// Longest name (node or cluster), topic or address string, in bytes.
pub const MAX_STRING: usize = 1024;

/// Flag bit 7: a receiver that does not know the frame type may skip it.
pub const FLAG_IGNORABLE: u8 = 0x80;
/// BATCH flag bit 0: the body is one zstd frame.
pub const FLAG_ZSTD: u8 = 0x01;

/// Capability bit: the peer decompresses zstd batches.
pub const CAP_ZSTD: u64 = 1 << 0;
/// Capability bit: glob interest (`*`, `?`) across nodes.
pub const CAP_GLOB: u64 = 1 << 3;
/// The capabilities this build offers (AND-ed with the peer's).
pub const CAPABILITIES: u64 = CAP_ZSTD | CAP_GLOB;

/// Frame type codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// [`Hello`].
    Hello = 1,
    /// [`Auth`].
    Auth = 2,
    /// [`Goodbye`].
    Goodbye = 3,
    /// PING `{t_send}`.
    Ping = 4,
    /// PONG `{t_echo}`.
    Pong = 5,
    /// Control lane: [`CtrlRecord`]s.
    Ctrl = 6,
    /// Data lane: [`PubRecord`]s, maybe zstd-compressed.
    Batch = 7,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::Auth,
            3 => Self::Goodbye,
            4 => Self::Ping,
            5 => Self::Pong,
            6 => Self::Ctrl,
            7 => Self::Batch,
            _ => return None,
        })
    }
}

/// Why a frame or record could not be decoded. Each is a protocol violation (`GOODBYE(PROTOCOL)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The preface's magic bytes are wrong: not a cluster peer.
    #[error("bad preface magic")]
    BadMagic,
    /// The version ranges do not overlap.
    #[error("no common protocol version (peer {min}..={max})")]
    NoCommonVersion {
        /// Peer's minimum.
        min: u16,
        /// Peer's maximum.
        max: u16,
    },
    /// A frame's length field exceeds the current bound.
    #[error("frame of {len} bytes exceeds {max}")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The bound in force.
        max: usize,
    },
    /// A frame's length field is below the header.
    #[error("frame length {0} below the header")]
    FrameTooShort(usize),
    /// The reserved header field is not zero.
    #[error("reserved header bits set")]
    Reserved,
    /// A frame type this build does not know, without the ignorable flag.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A body ended early or a field is malformed.
    #[error("truncated or malformed {0}")]
    Malformed(&'static str),
    /// A string is not UTF-8 or is longer than [`MAX_STRING`].
    #[error("bad string in {0}")]
    BadString(&'static str),
    /// Decompression failed or exceeded [`MAX_DECOMPRESSED`].
    #[error("bad compressed batch: {0}")]
    Decompress(&'static str),
}

/// A frame as cut from the stream, body still encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// Frame type.
    pub ty: FrameType,
    /// Flags byte.
    pub flags: u8,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Encodes the preface.
pub fn encode_preface(out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&MIN_VERSION.to_le_bytes());
    out.extend_from_slice(&MAX_VERSION.to_le_bytes());
}

/// Decodes a preface and negotiates the version (the lower of both maxima, if the ranges overlap).
pub fn decode_preface(b: &[u8; PREFACE_LEN]) -> Result<u16, WireError> {
    if b[..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let min = u16::from_le_bytes([b[4], b[5]]);
    let max = u16::from_le_bytes([b[6], b[7]]);
    let v = max.min(MAX_VERSION);
    if min > max || v < min.max(MIN_VERSION) {
        return Err(WireError::NoCommonVersion { min, max });
    }
    Ok(v)
}

/// Appends one frame.
pub fn encode_frame(out: &mut Vec<u8>, ty: FrameType, flags: u8, body: &[u8]) {
    let len = u32::try_from(4 + body.len()).expect("frame bodies are bounded by MAX_FRAME");
    out.extend_from_slice(&len.to_le_bytes());
    out.push(ty as u8);
    out.push(flags);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(body);
}

/// Cuts frames out of a byte stream. Holds at most one partial frame plus what the caller
/// pushed in one go; the frame bound can be raised once the peer is authenticated.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max_frame,
        }
    }

    /// Changes the bound (after authentication).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Takes everything buffered and not yet consumed (the bytes after a handshake, when a
    /// record layer takes over the stream).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.start);
        self.buf.clear();
        self.start = 0;
        rest
    }

    /// Takes `n` raw bytes (the preface) if that many are buffered.
    pub fn take_raw<const N: usize>(&mut self) -> Option<[u8; N]> {
        if self.buffered() < N {
            return None;
        }
        let mut a = [0u8; N];
        a.copy_from_slice(&self.buf[self.start..self.start + N]);
        self.start += N;
        Some(a)
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. Unknown ignorable frames
    /// are skipped. After an error the stream is unusable (the caller closes it).
    pub fn next_frame(&mut self) -> Result<Option<RawFrame>, WireError> {
        loop {
            let avail = &self.buf[self.start..];
            if avail.len() < 4 {
                self.compact();
                return Ok(None);
            }
            let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
            if len > self.max_frame {
                return Err(WireError::FrameTooLarge {
                    len,
                    max: self.max_frame,
                });
            }
            if len < 4 {
                return Err(WireError::FrameTooShort(len));
            }
            if avail.len() < 4 + len {
                self.compact();
                return Ok(None);
            }
            let (ty, flags, r0, r1) = (avail[4], avail[5], avail[6], avail[7]);
            if r0 != 0 || r1 != 0 {
                return Err(WireError::Reserved);
            }
            let body = avail[HEADER_LEN..4 + len].to_vec();
            self.start += 4 + len;
            match FrameType::from_u8(ty) {
                Some(ty) => return Ok(Some(RawFrame { ty, flags, body })),
                None if flags & FLAG_IGNORABLE != 0 => continue,
                None => return Err(WireError::UnknownType(ty)),
            }
        }
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Primitive encoders / a bounds-checked reader.

/// Appends an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

/// A cursor over a body that fails (never panics) past its end.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Self { b, what }
    }
    fn err(&self) -> WireError {
        WireError::Malformed(self.what)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(self.err());
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes(s.try_into().map_err(|_| self.err())?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(s.try_into().map_err(|_| self.err())?))
    }
    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let byte = self.u8()?;
            let part = u64::from(byte & 0x7f);
            if i == 9 && byte > 1 {
                return Err(self.err());
            }
            v |= part << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err())
    }
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| self.err())?;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, WireError> {
        let b = self.bytes()?;
        if b.len() > MAX_STRING {
            return Err(WireError::BadString(self.what));
        }
        String::from_utf8(b.to_vec()).map_err(|_| WireError::BadString(self.what))
    }
    fn array32(&mut self) -> Result<[u8; 32], WireError> {
        let s = self.take(32)?;
        s.try_into().map_err(|_| self.err())
    }
    fn end(&self) -> Result<(), WireError> {
        // Trailing bytes are allowed: later versions may append fields.
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake frames.

/// HELLO: who a node is and what it speaks. Sent by both ends right after the preface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Cluster name: nodes of different clusters refuse each other.
    pub cluster: String,
    /// Node name (stable, from configuration).
    pub name: String,
    /// Incarnation: changes on every start, bumped on refutation; higher = newer.
    pub incarnation: u64,
    /// Address other nodes dial this one at (`host:port`).
    pub advertised: String,
    /// Capability bits offered.
    pub capabilities: u64,
    /// Fingerprint of the configuration that must agree across the cluster.
    pub fingerprint: u64,
    /// The dialer's per-node dial counter (0 from the acceptor): orders two sessions dialled by
    /// the same node, so both ends agree which duplicate survives.
    pub dial_seq: u64,
    /// Fresh random nonce for the PSK key derivation.
    pub nonce: [u8; 32],
}

impl Hello {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128);
        put_str(&mut b, &self.cluster);
        put_str(&mut b, &self.name);
        b.extend_from_slice(&self.incarnation.to_le_bytes());
        put_str(&mut b, &self.advertised);
        b.extend_from_slice(&self.capabilities.to_le_bytes());
        b.extend_from_slice(&self.fingerprint.to_le_bytes());
        b.extend_from_slice(&self.dial_seq.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b
    }
    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "HELLO");
        let h = Self {
            cluster: r.string()?,
            name: r.string()?,
            incarnation: r.u64()?,
            advertised: r.string()?,
            capabilities: r.u64()?,
            fingerprint: r.u64()?,
            dial_seq: r.u64()?,
            nonce: r.array32()?,
        };
        r.end()?;
        if h.name.is_empty() {
            return Err(WireError::Malformed("HELLO (empty name)"));
        }
        Ok(h)
    }
}

/// Most MACs an AUTH carries: one per configured key (current and previous).
pub const MAX_AUTH_MACS: usize = 2;

/// AUTH: PSK proofs, one HMAC per key the sender holds (current, previous) so that any pair of
/// nodes sharing one key authenticates during a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// HMAC-SHA256 values.
    pub macs: Vec<[u8; 32]>,
}

impl Auth {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![self.macs.len() as u8];
        for m in &self.macs {
            b.extend_from_slice(m);
        }
        b
    }
    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "AUTH");
        let n = r.u8()? as usize;
        if n == 0 || n > MAX_AUTH_MACS {
            return Err(WireError::Malformed("AUTH (count)"));
        }
        let mut macs = Vec::with_capacity(n);
        for _ in 0..n {
            macs.push(r.array32()?);
        }
        Ok(Self { macs })
    }
}

/// Why a session is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reason {
    /// Another session of this pair survives (lower-name rule).
    Duplicate = 1,
    /// The node dialled itself.
    SelfDial = 2,
    /// Another node uses this name.
    NameConflict = 3,
    /// Cluster name or configuration fingerprint differ.
    ConfigMismatch = 4,
    /// `max_members` reached.
    ClusterFull = 5,
    /// The node left (drain finished).
    Left = 6,
    /// Malformed input or a broken rule.
    Protocol = 7,
    /// PSK authentication failed.
    AuthFailed = 8,
    /// The handshake did not finish in time.
    Timeout = 9,
    /// The sender knows a newer incarnation of this node (`incarnation` says which).
    StaleIncarnation = 10,
    /// The member was declared dead.
    Dead = 11,
    /// Any reason this build does not know.
    Other = 255,
}

impl Reason {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Duplicate,
            2 => Self::SelfDial,
            3 => Self::NameConflict,
            4 => Self::ConfigMismatch,
            5 => Self::ClusterFull,
            6 => Self::Left,
            7 => Self::Protocol,
            8 => Self::AuthFailed,
            9 => Self::Timeout,
            10 => Self::StaleIncarnation,
            11 => Self::Dead,
            _ => Self::Other,
        }
    }
}

/// GOODBYE: the sender closes the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goodbye {
    /// Why.
    pub reason: Reason,
    /// Do not redial before this many milliseconds.
    pub retry_after_ms: u32,
    /// Never redial this incarnation.
    pub no_reconnect: bool,
    /// With [`Reason::StaleIncarnation`]: the incarnation the sender knows.
    pub incarnation: u64,
}

impl Goodbye {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![self.reason as u8];
        b.extend_from_slice(&self.retry_after_ms.to_le_bytes());
        b.push(u8::from(self.no_reconnect));
        b.extend_from_slice(&self.incarnation.to_le_bytes());
        b
    }
    /// Decodes the body.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "GOODBYE");
        Ok(Self {
            reason: Reason::from_u8(r.u8()?),
            retry_after_ms: r.u32()?,
            no_reconnect: r.u8()? != 0,
            incarnation: r.u64()?,
        })
    }
}

/// Decodes a PING or PONG body (a timestamp in microseconds of the sender's clock).
pub fn decode_u64(body: &[u8], what: &'static str) -> Result<u64, WireError> {
    Reader::new(body, what).u64()
}

// ---------------------------------------------------------------------------------------------
// Control records.

/// A member's state as gossiped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum MemberState {
    /// Up.
    Alive = 1,
    /// Suspected down; still a member.
    Suspect = 2,
    /// Draining (lame duck): keeps its interest, never an owner.
    Leaving = 3,
    /// Declared down.
    Dead = 4,
    /// Left for good (never redialled at this incarnation).
    Left = 5,
}

impl MemberState {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Alive,
            2 => Self::Suspect,
            3 => Self::Leaving,
            4 => Self::Dead,
            5 => Self::Left,
            _ => return None,
        })
    }
}

/// One member as gossiped in MEMBERS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRecord {
    /// Node name.
    pub name: String,
    /// Incarnation the state is about.
    pub incarnation: u64,
    /// Advertised cluster address.
    pub addr: String,
    /// State.
    pub state: MemberState,
}

/// Kind of an interest pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum PatternKind {
    /// An exact topic.
    Exact = 0,
    /// A character-level glob (`*` any run, `?` one character).
    Glob = 1,
    /// A queue group on an exact topic: `text` is `group` U+001F `topic` (one member per group
    /// gets each publication, cluster-wide).
    Group = 2,
}

/// Separates group and topic in a [`PatternKind::Group`] pattern's text.
pub const GROUP_SEP: char = '\u{1f}';

/// An interest pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern {
    /// Exact or glob.
    pub kind: PatternKind,
    /// The topic or glob text.
    pub text: String,
}

impl Pattern {
    /// An exact topic, or a glob if it contains `*` or `?`.
    pub fn parse(s: &str) -> Self {
        let kind = if s.contains(['*', '?']) {
            PatternKind::Glob
        } else {
            PatternKind::Exact
        };
        Self {
            kind,
            text: s.to_owned(),
        }
    }

    /// An exact topic, whatever characters it has (`*` and `?` included).
    pub fn exact(s: &str) -> Self {
        Self {
            kind: PatternKind::Exact,
            text: s.to_owned(),
        }
    }

    /// A queue-group membership on `topic`.
    pub fn group(topic: &str, group: &str) -> Self {
        Self {
            kind: PatternKind::Group,
            text: format!("{group}{GROUP_SEP}{topic}"),
        }
    }

    /// `(topic, group)` of a group pattern.
    pub fn group_parts(&self) -> Option<(&str, &str)> {
        if self.kind != PatternKind::Group {
            return None;
        }
        let (g, t) = self.text.split_once(GROUP_SEP)?;
        Some((t, g))
    }
}

/// Record kinds inside CTRL.
mod ctrl_kind {
    pub const MEMBERS: u8 = 1;
    pub const PROBE: u8 = 2;
    pub const PROBE_ACK: u8 = 3;
    pub const SUB: u8 = 4;
    pub const UNSUB: u8 = 5;
    pub const SYNC_BEGIN: u8 = 6;
    pub const SYNC_END: u8 = 7;
    pub const ACK: u8 = 8;
    pub const DIGEST: u8 = 9;
    pub const RESYNC: u8 = 10;
}

/// A control-lane record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtrlRecord {
    /// Member table entries (whole table at session start, changes afterwards).
    Members(Vec<MemberRecord>),
    /// Indirect probe request: "is `target` (at `incarnation`) alive from where you are?".
    Probe {
        /// Request id, echoed in the ack.
        id: u64,
        /// Probed node.
        target: String,
        /// Its incarnation as the requester knows it.
        incarnation: u64,
    },
    /// Answer to a probe.
    ProbeAck {
        /// The request's id.
        id: u64,
        /// Whether the target answered in time.
        alive: bool,
    },
    /// Interest added (`generation` = the session's next generation).
    Sub {
        /// Generation.
        generation: u64,
        /// Pattern.
        pattern: Pattern,
    },
    /// Interest withdrawn.
    Unsub {
        /// Generation.
        generation: u64,
        /// Pattern.
        pattern: Pattern,
    },
    /// A snapshot starts: the SUBs up to SYNC_END replace the receiver's table for this session.
    SyncBegin {
        /// Generation.
        generation: u64,
    },
    /// The snapshot is complete.
    SyncEnd {
        /// Generation.
        generation: u64,
        /// Patterns in the snapshot.
        count: u64,
        /// XOR of the patterns' hashes.
        digest: u64,
    },
    /// Cumulative acknowledgement of interest generations.
    Ack {
        /// Highest applied generation.
        generation: u64,
    },
    /// The sender's advertised interest as of `generation` (sent every 30 s): a receiver whose
    /// table differs asks for a fresh snapshot.
    Digest {
        /// Generation the digest describes.
        generation: u64,
        /// Patterns.
        count: u64,
        /// XOR of the patterns' hashes.
        digest: u64,
    },
    /// "Send me a fresh snapshot": the receiver's table disagreed with a DIGEST.
    Resync,
    /// A record kind this build does not know (skipped: records carry their length).
    Unknown(u8),
}

fn put_pattern(b: &mut Vec<u8>, p: &Pattern) {
    b.push(p.kind as u8);
    put_str(b, &p.text);
}

fn get_pattern(r: &mut Reader<'_>) -> Result<Pattern, WireError> {
    let kind = match r.u8()? {
        0 => PatternKind::Exact,
        1 => PatternKind::Glob,
        2 => PatternKind::Group,
        _ => return Err(WireError::Malformed("pattern kind")),
    };
    let p = Pattern {
        kind,
        text: r.string()?,
    };
    if kind == PatternKind::Group && p.group_parts().is_none() {
        return Err(WireError::Malformed("group pattern"));
    }
    Ok(p)
}

fn put_record(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    put_bytes(out, body);
}

impl CtrlRecord {
    /// Appends this record (kind, length, body).
    pub fn encode(&self, out: &mut Vec<u8>) {
        use ctrl_kind::*;
        let mut b = Vec::new();
        let kind = match self {
            Self::Members(ms) => {
                put_varint(&mut b, ms.len() as u64);
                for m in ms {
                    put_str(&mut b, &m.name);
                    b.extend_from_slice(&m.incarnation.to_le_bytes());
                    put_str(&mut b, &m.addr);
                    b.push(m.state as u8);
                }
                MEMBERS
            }
            Self::Probe {
                id,
                target,
                incarnation,
            } => {
                b.extend_from_slice(&id.to_le_bytes());
                put_str(&mut b, target);
                b.extend_from_slice(&incarnation.to_le_bytes());
                PROBE
            }
            Self::ProbeAck { id, alive } => {
                b.extend_from_slice(&id.to_le_bytes());
                b.push(u8::from(*alive));
                PROBE_ACK
            }
            Self::Sub {
                generation,
                pattern,
            } => {
                put_varint(&mut b, *generation);
                put_pattern(&mut b, pattern);
                SUB
            }
            Self::Unsub {
                generation,
                pattern,
            } => {
                put_varint(&mut b, *generation);
                put_pattern(&mut b, pattern);
                UNSUB
            }
            Self::SyncBegin { generation } => {
                put_varint(&mut b, *generation);
                SYNC_BEGIN
            }
            Self::SyncEnd {
                generation,
                count,
                digest,
            } => {
                put_varint(&mut b, *generation);
                put_varint(&mut b, *count);
                b.extend_from_slice(&digest.to_le_bytes());
                SYNC_END
            }
            Self::Ack { generation } => {
                put_varint(&mut b, *generation);
                ACK
            }
            Self::Digest {
                generation,
                count,
                digest,
            } => {
                put_varint(&mut b, *generation);
                put_varint(&mut b, *count);
                b.extend_from_slice(&digest.to_le_bytes());
                DIGEST
            }
            Self::Resync => RESYNC,
            Self::Unknown(k) => *k,
        };
        put_record(out, kind, &b);
    }

    fn decode_one(kind: u8, body: &[u8]) -> Result<Self, WireError> {
        use ctrl_kind::*;
        let mut r = Reader::new(body, "CTRL record");
        Ok(match kind {
            MEMBERS => {
                let n = r.varint()?;
                // Each entry takes at least 11 bytes: the body bounds the allocation.
                let cap = usize::try_from(n)
                    .unwrap_or(usize::MAX)
                    .min(body.len() / 11);
                let mut ms = Vec::with_capacity(cap);
                for _ in 0..n {
                    let name = r.string()?;
                    let incarnation = r.u64()?;
                    let addr = r.string()?;
                    let state = MemberState::from_u8(r.u8()?)
                        .ok_or(WireError::Malformed("member state"))?;
                    if name.is_empty() {
                        return Err(WireError::Malformed("member name"));
                    }
                    ms.push(MemberRecord {
                        name,
                        incarnation,
                        addr,
                        state,
                    });
                }
                Self::Members(ms)
            }
            PROBE => Self::Probe {
                id: r.u64()?,
                target: r.string()?,
                incarnation: r.u64()?,
            },
            PROBE_ACK => Self::ProbeAck {
                id: r.u64()?,
                alive: r.u8()? != 0,
            },
            SUB => Self::Sub {
                generation: r.varint()?,
                pattern: get_pattern(&mut r)?,
            },
            UNSUB => Self::Unsub {
                generation: r.varint()?,
                pattern: get_pattern(&mut r)?,
            },
            SYNC_BEGIN => Self::SyncBegin {
                generation: r.varint()?,
            },
            SYNC_END => Self::SyncEnd {
                generation: r.varint()?,
                count: r.varint()?,
                digest: r.u64()?,
            },
            ACK => Self::Ack {
                generation: r.varint()?,
            },
            DIGEST => Self::Digest {
                generation: r.varint()?,
                count: r.varint()?,
                digest: r.u64()?,
            },
            RESYNC => Self::Resync,
            k => Self::Unknown(k),
        })
    }
}

/// Splits a CTRL/BATCH body into `(kind, body)` records.
fn split_records<'a>(
    body: &'a [u8],
    what: &'static str,
) -> impl Iterator<Item = Result<(u8, &'a [u8]), WireError>> + 'a {
    let mut r = Reader::new(body, what);
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || r.b.is_empty() {
            return None;
        }
        let res = (|| Ok((r.u8()?, r.bytes()?)))();
        failed = res.is_err();
        Some(res)
    })
}

/// Encodes a CTRL body.
pub fn encode_ctrl(records: &[CtrlRecord]) -> Vec<u8> {
    let mut b = Vec::new();
    for r in records {
        r.encode(&mut b);
    }
    b
}

/// Decodes a CTRL body.
pub fn decode_ctrl(body: &[u8]) -> Result<Vec<CtrlRecord>, WireError> {
    split_records(body, "CTRL")
        .map(|rec| rec.and_then(|(k, b)| CtrlRecord::decode_one(k, b)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Data records.

/// Record kind of a direct publication (no recovery stamp).
const PUB_DIRECT: u8 = 1;

/// One publication in a BATCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubRecord {
    /// Topic.
    pub topic: String,
    /// For a queue-group delivery: the group, of which the receiver hands it to one member.
    pub group: Option<String>,
    /// The message as the shards would send it.
    pub payload: Vec<u8>,
}

/// Record kind of a queue-group publication (no recovery stamp).
const PUB_GROUP: u8 = 2;

impl PubRecord {
    /// A plain publication.
    pub fn new(topic: &str, payload: &[u8]) -> Self {
        Self {
            topic: topic.to_owned(),
            group: None,
            payload: payload.to_vec(),
        }
    }
    /// Bytes this record takes in a batch (for batch and queue accounting).
    pub fn encoded_len(&self) -> usize {
        let t = self.topic.len();
        let g = self
            .group
            .as_ref()
            .map_or(0, |g| varint_len(g.len() as u64) + g.len());
        let inner = varint_len(t as u64)
            + t
            + g
            + varint_len(self.payload.len() as u64)
            + self.payload.len();
        1 + varint_len(inner as u64) + inner
    }
    /// Appends this record.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut b = Vec::with_capacity(self.encoded_len());
        put_str(&mut b, &self.topic);
        if let Some(g) = &self.group {
            put_str(&mut b, g);
        }
        put_bytes(&mut b, &self.payload);
        put_record(
            out,
            if self.group.is_some() {
                PUB_GROUP
            } else {
                PUB_DIRECT
            },
            &b,
        );
    }
}

fn varint_len(v: u64) -> usize {
    (64 - v.max(1).leading_zeros() as usize).div_ceil(7)
}

/// Compresses a batch body with zstd (level 1: the speed end of the curve, spec §5).
pub fn compress(body: &[u8]) -> Vec<u8> {
    // Compressing an in-memory slice only fails on allocation failure.
    zstd::bulk::compress(body, 1).expect("zstd compression of an in-memory buffer")
}

/// Decompresses a batch body, at most [`MAX_DECOMPRESSED`] bytes out and a bounded window.
pub fn decompress(body: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut dec =
        zstd::stream::read::Decoder::new(body).map_err(|_| WireError::Decompress("init"))?;
    dec.window_log_max(ZSTD_WINDOW_LOG_MAX)
        .map_err(|_| WireError::Decompress("window"))?;
    let mut out = Vec::new();
    let mut limited = dec.take(MAX_DECOMPRESSED as u64 + 1);
    limited
        .read_to_end(&mut out)
        .map_err(|_| WireError::Decompress("corrupt"))?;
    if out.len() > MAX_DECOMPRESSED {
        return Err(WireError::Decompress("too large"));
    }
    Ok(out)
}

/// Decodes a BATCH frame body (decompressing it if flagged).
pub fn decode_batch(flags: u8, body: &[u8]) -> Result<Vec<PubRecord>, WireError> {
    let plain;
    let body = if flags & FLAG_ZSTD != 0 {
        plain = decompress(body)?;
        &plain[..]
    } else {
        body
    };
    let mut out = Vec::new();
    for rec in split_records(body, "BATCH") {
        let (kind, b) = rec?;
        if kind != PUB_DIRECT && kind != PUB_GROUP {
            continue; // later kinds (FORWARD, stamped PUB) are skipped by this version
        }
        let mut r = Reader::new(b, "PUB");
        let topic = r.string()?;
        let group = if kind == PUB_GROUP {
            Some(r.string()?)
        } else {
            None
        };
        let payload = r.bytes()?.to_vec();
        out.push(PubRecord {
            topic,
            group,
            payload,
        });
    }
    Ok(out)
}

/// FNV-1a 64: a stable hash for interest digests (the same on every build and platform).
pub fn stable_hash(kind: PatternKind, s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in std::iter::once(&(kind as u8)).chain(s.as_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_across_split_reads() {
        let mut s = Vec::new();
        encode_preface(&mut s);
        encode_frame(&mut s, FrameType::Ping, 0, &7u64.to_le_bytes());
        let recs = vec![
            CtrlRecord::Sub {
                generation: 3,
                pattern: Pattern::parse("a.*"),
            },
            CtrlRecord::Ack { generation: 2 },
            CtrlRecord::Members(vec![MemberRecord {
                name: "n1".into(),
                incarnation: 9,
                addr: "127.0.0.1:1".into(),
                state: MemberState::Suspect,
            }]),
        ];
        encode_frame(&mut s, FrameType::Ctrl, 0, &encode_ctrl(&recs));
        let mut d = FrameDecoder::new(PREAUTH_MAX_FRAME);
        let mut frames = Vec::new();
        let mut preface = None;
        for chunk in s.chunks(3) {
            d.push(chunk);
            if preface.is_none() {
                preface = d.take_raw::<PREFACE_LEN>();
                if preface.is_none() {
                    continue;
                }
            }
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(decode_preface(&preface.unwrap()), Ok(1));
        assert_eq!(frames.len(), 2);
        assert_eq!(decode_u64(&frames[0].body, "PING"), Ok(7));
        assert_eq!(decode_ctrl(&frames[1].body).unwrap(), recs);
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused_ignorable_ones_skipped() {
        let mut d = FrameDecoder::new(PREAUTH_MAX_FRAME);
        d.push(&(PREAUTH_MAX_FRAME as u32 + 1).to_le_bytes());
        assert!(matches!(
            d.next_frame(),
            Err(WireError::FrameTooLarge { .. })
        ));

        let mut s = Vec::new();
        encode_frame(&mut s, FrameType::Ping, 0, &1u64.to_le_bytes());
        s[4] = 99; // unknown type, ignorable
        s[5] = FLAG_IGNORABLE;
        encode_frame(&mut s, FrameType::Pong, 0, &2u64.to_le_bytes());
        let mut d = FrameDecoder::new(PREAUTH_MAX_FRAME);
        d.push(&s);
        assert_eq!(d.next_frame().unwrap().unwrap().ty, FrameType::Pong);
        s[5] = 0;
        let mut d = FrameDecoder::new(PREAUTH_MAX_FRAME);
        d.push(&s);
        assert_eq!(d.next_frame(), Err(WireError::UnknownType(99)));
    }

    #[test]
    fn versions_negotiate_to_the_lower_maximum_or_fail() {
        let mut p = [0u8; PREFACE_LEN];
        p[..4].copy_from_slice(&MAGIC);
        p[4..6].copy_from_slice(&1u16.to_le_bytes());
        p[6..8].copy_from_slice(&5u16.to_le_bytes());
        assert_eq!(decode_preface(&p), Ok(MAX_VERSION));
        p[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert!(matches!(
            decode_preface(&p),
            Err(WireError::NoCommonVersion { .. })
        ));
        p[0] = b'X';
        assert_eq!(decode_preface(&p), Err(WireError::BadMagic));
    }

    #[test]
    fn compressed_batches_round_trip_and_bombs_stop_at_the_bound() {
        let recs: Vec<PubRecord> = (0..200)
            .map(|i| PubRecord {
                topic: format!("t{}", i % 7),
                group: (i % 5 == 0).then(|| "workers".to_owned()),
                payload: br#"{"t":"price","p":{"v":1}}"#.to_vec(),
            })
            .collect();
        let mut body = Vec::new();
        for r in &recs {
            r.encode(&mut body);
        }
        let z = compress(&body);
        assert!(z.len() < body.len() / 3, "{} vs {}", z.len(), body.len());
        assert_eq!(decode_batch(FLAG_ZSTD, &z).unwrap(), recs);
        assert_eq!(decode_batch(0, &body).unwrap(), recs);

        // 64 MiB of zeros compresses to a few KiB: decompression must stop at the bound.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
        assert!(bomb.len() < PREAUTH_MAX_FRAME * 4);
        assert_eq!(decompress(&bomb), Err(WireError::Decompress("too large")));
    }

    #[test]
    fn encoded_len_matches() {
        for n in [0usize, 1, 127, 128, 300, 20000] {
            for group in [None, Some("g".repeat(n % 150))] {
                let r = PubRecord {
                    topic: "x".repeat(n % 200),
                    group,
                    payload: vec![1; n],
                };
                let mut b = Vec::new();
                r.encode(&mut b);
                assert_eq!(b.len(), r.encoded_len());
            }
        }
    }
}
