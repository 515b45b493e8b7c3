//! One session's handshake: PREFACE + HELLO from both ends at once (so the receiver always
//! answers HELLO, even when it then refuses), then with `psk` an AUTH from both ends; with `tls`
//! the transport authenticated the peer's certificate and the HELLO's node name must be one the
//! certificate is valid for (its SAN). Pair-level
//! rules (duplicates, incarnations) need the whole node's view and live in [`crate::node`].

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::wire::{
    self, Auth, FrameDecoder, FrameType, Goodbye, Hello, PREAUTH_MAX_FRAME, PREFACE_LEN, RawFrame,
    Reason,
};

/// Which end of the TCP connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We dialled.
    Dialer,
    /// We accepted.
    Acceptor,
}

/// How sessions are authenticated.
#[derive(Clone, Default)]
pub enum Security {
    /// Plaintext, unauthenticated (loopback and tests only; the configuration refuses it elsewhere).
    #[default]
    None,
    /// Pre-shared key, plus the previous one during a rotation.
    Psk {
        /// The key in force.
        current: Vec<u8>,
        /// The key being rotated out, still accepted.
        previous: Option<Vec<u8>>,
    },
    /// TLS 1.3 with mutual authentication, done by the I/O layer before any byte reaches the
    /// node; it hands over the verified certificate's names with [`Handshake::certified`]
    /// (`Node::certified`), and the HELLO's node name must be one of them. No AUTH frame.
    Tls,
}

/// Says whether the peer's verified certificate is valid for a node name (a SAN of it).
pub type CertifiedNames = std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>;

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        match self {
            Self::None => f.write_str("None"),
            Self::Tls => f.write_str("Tls"),
            Self::Psk { previous, .. } => write!(f, "Psk {{ previous: {} }}", previous.is_some()),
        }
    }
}

/// This node's identity as sent in HELLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Cluster name.
    pub cluster: String,
    /// Node name.
    pub name: String,
    /// Current incarnation.
    pub incarnation: u64,
    /// Advertised address.
    pub advertised: String,
    /// Configuration fingerprint.
    pub fingerprint: u64,
}

/// Record keys of a PSK session.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Seals what this end sends.
    pub send: [u8; 32],
    /// Opens what the peer sends.
    pub recv: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(<redacted>)")
    }
}

/// What the handshake learnt about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Node name.
    pub name: String,
    /// Incarnation.
    pub incarnation: u64,
    /// Advertised address.
    pub advertised: String,
    /// Negotiated capabilities (AND of both).
    pub capabilities: u64,
    /// Negotiated protocol version.
    pub version: u16,
    /// The dialler's dial counter for this session.
    pub dial_seq: u64,
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Malformed input.
    #[error("protocol: {0}")]
    Wire(#[from] wire::WireError),
    /// A frame that does not belong in the handshake.
    #[error("unexpected {0:?} frame during the handshake")]
    Unexpected(FrameType),
    /// We refused the peer (a GOODBYE was written).
    #[error("refused: {0:?}")]
    Refused(Reason),
    /// The peer refused us.
    #[error("peer said goodbye: {0:?}")]
    PeerGoodbye(Goodbye),
    /// The deadline passed.
    #[error("handshake deadline passed")]
    Timeout,
    /// With `tls`: the HELLO's node name is not one the peer's certificate is valid for (or no
    /// verified certificate came with the session).
    #[error("the peer's certificate is not valid for the node name {0:?} it sent")]
    NotCertified(String),
}

/// Result of feeding the handshake.
#[derive(Debug)]
pub enum Step {
    /// Needs more bytes.
    Continue,
    /// Authenticated; the session may start.
    Established(PeerInfo),
    /// Failed; whatever was written to `out` (a GOODBYE) should be sent before closing.
    Failed(HandshakeError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitPreface,
    AwaitHello,
    AwaitAuth,
    Done,
}

type HmacSha256 = Hmac<Sha256>;

const KDF_INFO: &[u8] = b"wse-cluster/1 psk";
const AUTH_LABEL: &[u8] = b"wse-cluster/1 auth";

/// A session's handshake state machine.
pub struct Handshake {
    role: Role,
    security: Security,
    identity: Identity,
    local_hello: Hello,
    local_preface: [u8; PREFACE_LEN],
    peer_preface: [u8; PREFACE_LEN],
    peer_hello: Option<(Hello, Vec<u8>)>,
    version: u16,
    state: State,
    /// The PSK both ends hold (the first in the dialer's order), once AUTH verified.
    shared: Option<Vec<u8>>,
    /// With `tls`: the names the peer's verified certificate is valid for.
    certified: Option<CertifiedNames>,
    decoder: FrameDecoder,
    /// Virtual-clock time (µs) by which the handshake must be done.
    pub deadline: u64,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .field("state", &self.state)
            .finish()
    }
}

impl Handshake {
    /// Starts a handshake; writes our PREFACE and HELLO to `out`.
    pub fn start(
        role: Role,
        identity: Identity,
        security: Security,
        dial_seq: u64,
        nonce: [u8; 32],
        deadline: u64,
        out: &mut Vec<u8>,
    ) -> Self {
        let local_hello = Hello {
            cluster: identity.cluster.clone(),
            name: identity.name.clone(),
            incarnation: identity.incarnation,
            advertised: identity.advertised.clone(),
            capabilities: wire::CAPABILITIES,
            fingerprint: identity.fingerprint,
            dial_seq: if role == Role::Dialer { dial_seq } else { 0 },
            nonce,
        };
        let mut p = Vec::with_capacity(PREFACE_LEN);
        wire::encode_preface(&mut p);
        let local_preface: [u8; PREFACE_LEN] = p.as_slice().try_into().expect("preface length");
        out.extend_from_slice(&local_preface);
        wire::encode_frame(out, FrameType::Hello, 0, &local_hello.encode());
        Self {
            role,
            security,
            identity,
            local_hello,
            local_preface,
            peer_preface: [0; PREFACE_LEN],
            peer_hello: None,
            version: 0,
            state: State::AwaitPreface,
            shared: None,
            certified: None,
            decoder: FrameDecoder::new(PREAUTH_MAX_FRAME),
            deadline,
        }
    }

    /// With `tls`: the transport verified the peer's certificate; `names` says which node names
    /// it is valid for. Given before the first byte is fed.
    pub fn certified(&mut self, names: CertifiedNames) {
        self.certified = Some(names);
    }

    /// Feeds received bytes; may write frames (AUTH, GOODBYE) to `out`.
    pub fn feed(&mut self, bytes: &[u8], now: u64, out: &mut Vec<u8>) -> Step {
        if self.state == State::Done {
            return Step::Continue;
        }
        if now >= self.deadline {
            return self.fail(HandshakeError::Timeout, None, out);
        }
        self.decoder.push(bytes);
        loop {
            match self.state {
                State::AwaitPreface => match self.decoder.take_raw::<PREFACE_LEN>() {
                    None => return Step::Continue,
                    Some(p) => match wire::decode_preface(&p) {
                        Ok(v) => {
                            self.version = v;
                            self.peer_preface = p;
                            self.state = State::AwaitHello;
                        }
                        Err(e) => return self.fail(e.into(), Some(Reason::Protocol), out),
                    },
                },
                State::AwaitHello | State::AwaitAuth => {
                    let frame = match self.decoder.next_frame() {
                        Ok(Some(f)) => f,
                        Ok(None) => return Step::Continue,
                        Err(e) => return self.fail(e.into(), Some(Reason::Protocol), out),
                    };
                    if let Some(step) = self.on_frame(frame, out) {
                        return step;
                    }
                }
                State::Done => return Step::Continue,
            }
        }
    }

    /// Fails the handshake if its deadline has passed.
    pub fn check_deadline(&mut self, now: u64, out: &mut Vec<u8>) -> Option<HandshakeError> {
        if self.state != State::Done && now >= self.deadline {
            self.state = State::Done;
            write_goodbye(out, Reason::Timeout, false, 0);
            return Some(HandshakeError::Timeout);
        }
        None
    }

    /// The decoder, holding whatever followed the handshake in the stream.
    pub fn into_decoder(self) -> FrameDecoder {
        self.decoder
    }

    /// With `psk`, once established: the record keys (send, receive) for every byte after AUTH,
    /// one per direction, from HKDF over the shared key and both nonces.
    pub fn session_keys(&self) -> Option<SessionKeys> {
        let psk = self.shared.as_ref()?;
        let (peer, _) = self.peer_hello.as_ref()?;
        let (nd, na) = match self.role {
            Role::Dialer => (&self.local_hello.nonce, &peer.nonce),
            Role::Acceptor => (&peer.nonce, &self.local_hello.nonce),
        };
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(nd);
        salt[32..].copy_from_slice(na);
        let kdf = Hkdf::<Sha256>::new(Some(&salt), psk);
        let (mut d2a, mut a2d) = ([0u8; 32], [0u8; 32]);
        kdf.expand(b"wse-cluster/1 seal dialer", &mut d2a)
            .expect("32 bytes is a valid HKDF length");
        kdf.expand(b"wse-cluster/1 seal acceptor", &mut a2d)
            .expect("32 bytes is a valid HKDF length");
        Some(match self.role {
            Role::Dialer => SessionKeys {
                send: d2a,
                recv: a2d,
            },
            Role::Acceptor => SessionKeys {
                send: a2d,
                recv: d2a,
            },
        })
    }

    fn on_frame(&mut self, f: RawFrame, out: &mut Vec<u8>) -> Option<Step> {
        match (self.state, f.ty) {
            (_, FrameType::Goodbye) => {
                let g = match Goodbye::decode(&f.body) {
                    Ok(g) => g,
                    Err(e) => return Some(self.fail(e.into(), None, out)),
                };
                Some(self.fail(HandshakeError::PeerGoodbye(g), None, out))
            }
            (State::AwaitHello, FrameType::Hello) => {
                let h = match Hello::decode(&f.body) {
                    Ok(h) => h,
                    Err(e) => return Some(self.fail(e.into(), Some(Reason::Protocol), out)),
                };
                if h.cluster != self.identity.cluster || h.fingerprint != self.identity.fingerprint
                {
                    return Some(self.fail(
                        HandshakeError::Refused(Reason::ConfigMismatch),
                        Some(Reason::ConfigMismatch),
                        out,
                    ));
                }
                if h.name == self.identity.name {
                    let r = if h.incarnation == self.identity.incarnation {
                        Reason::SelfDial
                    } else {
                        Reason::NameConflict
                    };
                    return Some(self.fail(HandshakeError::Refused(r), Some(r), out));
                }
                self.peer_hello = Some((h, f.body));
                match &self.security {
                    Security::None => Some(self.established()),
                    Security::Tls => {
                        let name = self.peer_hello.as_ref().map(|(h, _)| h.name.clone());
                        let name = name.unwrap_or_default();
                        if self.certified.as_ref().is_some_and(|ok| ok(&name)) {
                            Some(self.established())
                        } else {
                            Some(self.fail(
                                HandshakeError::NotCertified(name),
                                Some(Reason::AuthFailed),
                                out,
                            ))
                        }
                    }
                    Security::Psk { .. } => {
                        let auth = Auth {
                            macs: self.keys().iter().map(|k| self.mac(k, self.role)).collect(),
                        };
                        wire::encode_frame(out, FrameType::Auth, 0, &auth.encode());
                        self.state = State::AwaitAuth;
                        None
                    }
                }
            }
            (State::AwaitAuth, FrameType::Auth) => {
                let auth = match Auth::decode(&f.body) {
                    Ok(a) => a,
                    Err(e) => return Some(self.fail(e.into(), Some(Reason::Protocol), out)),
                };
                let peer_role = match self.role {
                    Role::Dialer => Role::Acceptor,
                    Role::Acceptor => Role::Dialer,
                };
                let verifies =
                    |k: &[u8], m: &[u8; 32]| self.mac_state(k, peer_role).verify_slice(m).is_ok();
                // Both ends pick the same key: the first, in the dialer's order, that both hold.
                let shared = match self.role {
                    Role::Dialer => self
                        .keys()
                        .into_iter()
                        .find(|k| auth.macs.iter().any(|m| verifies(k, m))),
                    Role::Acceptor => auth
                        .macs
                        .iter()
                        .find_map(|m| self.keys().into_iter().find(|k| verifies(k, m))),
                }
                .map(<[u8]>::to_vec);
                if shared.is_some() {
                    self.shared = shared;
                    Some(self.established())
                } else {
                    Some(self.fail(
                        HandshakeError::Refused(Reason::AuthFailed),
                        Some(Reason::AuthFailed),
                        out,
                    ))
                }
            }
            (_, ty) => Some(self.fail(HandshakeError::Unexpected(ty), Some(Reason::Protocol), out)),
        }
    }

    fn established(&mut self) -> Step {
        self.state = State::Done;
        self.decoder.set_max_frame(wire::MAX_FRAME);
        let (h, _) = self.peer_hello.as_ref().expect("established after HELLO");
        Step::Established(PeerInfo {
            name: h.name.clone(),
            incarnation: h.incarnation,
            advertised: h.advertised.clone(),
            capabilities: h.capabilities & wire::CAPABILITIES,
            version: self.version,
            dial_seq: match self.role {
                Role::Dialer => self.local_hello.dial_seq,
                Role::Acceptor => h.dial_seq,
            },
        })
    }

    fn fail(&mut self, e: HandshakeError, goodbye: Option<Reason>, out: &mut Vec<u8>) -> Step {
        self.state = State::Done;
        if let Some(r) = goodbye {
            write_goodbye(out, r, matches!(r, Reason::SelfDial), 0);
        }
        Step::Failed(e)
    }

    fn keys(&self) -> Vec<&[u8]> {
        match &self.security {
            Security::None | Security::Tls => Vec::new(),
            Security::Psk { current, previous } => std::iter::once(current.as_slice())
                .chain(previous.as_deref())
                .collect(),
        }
    }

    /// Hash of both PREFACEs and HELLOs in dialer-then-acceptor order: AUTH covers the versions,
    /// capabilities and nonces each side saw, so tampering with them fails authentication.
    fn transcript(&self) -> [u8; 32] {
        let (_, peer_body) = self.peer_hello.as_ref().expect("AUTH after HELLO");
        let local_body = self.local_hello.encode();
        let (d, a) = match self.role {
            Role::Dialer => (
                (&self.local_preface, &local_body),
                (&self.peer_preface, peer_body),
            ),
            Role::Acceptor => (
                (&self.peer_preface, peer_body),
                (&self.local_preface, &local_body),
            ),
        };
        let mut h = Sha256::new();
        for (p, b) in [d, a] {
            h.update(p);
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        }
        h.finalize().into()
    }

    fn mac_state(&self, psk: &[u8], role: Role) -> HmacSha256 {
        let (peer, _) = self.peer_hello.as_ref().expect("AUTH after HELLO");
        let (nd, na) = match self.role {
            Role::Dialer => (&self.local_hello.nonce, &peer.nonce),
            Role::Acceptor => (&peer.nonce, &self.local_hello.nonce),
        };
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(nd);
        salt[32..].copy_from_slice(na);
        let mut k = [0u8; 32];
        Hkdf::<Sha256>::new(Some(&salt), psk)
            .expand(KDF_INFO, &mut k)
            .expect("32 bytes is a valid HKDF length");
        let mut m = HmacSha256::new_from_slice(&k).expect("HMAC takes any key length");
        m.update(AUTH_LABEL);
        m.update(&[role as u8]);
        m.update(&self.transcript());
        m
    }

    fn mac(&self, psk: &[u8], role: Role) -> [u8; 32] {
        self.mac_state(psk, role).finalize().into_bytes().into()
    }
}

/// Writes a GOODBYE frame.
pub fn write_goodbye(out: &mut Vec<u8>, reason: Reason, no_reconnect: bool, incarnation: u64) {
    let g = Goodbye {
        reason,
        retry_after_ms: 0,
        no_reconnect,
        incarnation,
    };
    wire::encode_frame(out, FrameType::Goodbye, 0, &g.encode());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(name: &str, inc: u64) -> Identity {
        Identity {
            cluster: "c".into(),
            name: name.into(),
            incarnation: inc,
            advertised: format!("{name}:1"),
            fingerprint: 1,
        }
    }

    fn psk(cur: &[u8], prev: Option<&[u8]>) -> Security {
        Security::Psk {
            current: cur.to_vec(),
            previous: prev.map(<[u8]>::to_vec),
        }
    }

    /// Runs two handshakes against each other, delivering bytes in `chunk`-sized pieces.
    fn run(a: (Identity, Security), b: (Identity, Security), chunk: usize) -> (Step, Step) {
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        let mut ha = Handshake::start(Role::Dialer, a.0, a.1, 5, [1; 32], 100, &mut oa);
        let mut hb = Handshake::start(Role::Acceptor, b.0, b.1, 0, [2; 32], 100, &mut ob);
        let (mut ra, mut rb) = (None, None);
        for _ in 0..1000 {
            if ra.is_some() && rb.is_some() || oa.is_empty() && ob.is_empty() {
                break;
            }
            let na = oa.len().min(chunk);
            let to_b: Vec<u8> = oa.drain(..na).collect();
            let nb = ob.len().min(chunk);
            let to_a: Vec<u8> = ob.drain(..nb).collect();
            if rb.is_none() {
                match hb.feed(&to_b, 0, &mut ob) {
                    Step::Continue => {}
                    s => rb = Some(s),
                }
            }
            if ra.is_none() {
                match ha.feed(&to_a, 0, &mut oa) {
                    Step::Continue => {}
                    s => ra = Some(s),
                }
            }
        }
        (ra.unwrap_or(Step::Continue), rb.unwrap_or(Step::Continue))
    }

    /// A `tls` pair: each end certified for `a_cert` / `b_cert` (what the peer's certificate is
    /// valid for, as the transport verified it); HELLOs go across whole.
    fn run_tls(a_certified_as: &'static str, b_certified_as: &'static str) -> (Step, Step) {
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        let mut ha = Handshake::start(
            Role::Dialer,
            ident("a", 1),
            Security::Tls,
            1,
            [1; 32],
            100,
            &mut oa,
        );
        let mut hb = Handshake::start(
            Role::Acceptor,
            ident("b", 2),
            Security::Tls,
            0,
            [2; 32],
            100,
            &mut ob,
        );
        // `ha` checks b's certificate, `hb` checks a's.
        ha.certified(std::sync::Arc::new(move |n: &str| n == b_certified_as));
        hb.certified(std::sync::Arc::new(move |n: &str| n == a_certified_as));
        let rb = hb.feed(&oa, 0, &mut Vec::new());
        let ra = ha.feed(&ob, 0, &mut Vec::new());
        (ra, rb)
    }

    #[test]
    fn tls_handshake_needs_the_hello_name_in_the_peer_certificate() {
        let (a, b) = run_tls("a", "b");
        assert!(matches!(
            (a, b),
            (Step::Established(_), Step::Established(_))
        ));
        // a's certificate is for "x": b refuses a HELLO named "a", with AUTH_FAILED.
        let (a, b) = run_tls("x", "b");
        assert!(matches!(a, Step::Established(_)));
        assert!(
            matches!(&b, Step::Failed(HandshakeError::NotCertified(n)) if n == "a"),
            "{b:?}"
        );
        // No certificate handed over at all: refused too.
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        Handshake::start(
            Role::Dialer,
            ident("a", 1),
            Security::Tls,
            1,
            [1; 32],
            100,
            &mut oa,
        );
        let mut hb = Handshake::start(
            Role::Acceptor,
            ident("b", 2),
            Security::Tls,
            0,
            [2; 32],
            100,
            &mut ob,
        );
        assert!(matches!(
            hb.feed(&oa, 0, &mut Vec::new()),
            Step::Failed(HandshakeError::NotCertified(_))
        ));
    }

    #[test]
    fn psk_handshake_establishes_with_current_or_previous_key() {
        for chunk in [1, 7, 4096] {
            let (a, b) = run(
                (ident("a", 1), psk(b"k1", None)),
                (ident("b", 2), psk(b"k1", None)),
                chunk,
            );
            let (Step::Established(pa), Step::Established(pb)) = (a, b) else {
                panic!("not established")
            };
            assert_eq!((pa.name.as_str(), pa.incarnation, pa.dial_seq), ("b", 2, 5));
            assert_eq!((pb.name.as_str(), pb.dial_seq), ("a", 5));
        }
        // Rotation: one node already on k2 (k1 previous), the other still on k1.
        let (a, b) = run(
            (ident("a", 1), psk(b"k2", Some(b"k1"))),
            (ident("b", 2), psk(b"k1", None)),
            64,
        );
        assert!(matches!(
            (a, b),
            (Step::Established(_), Step::Established(_))
        ));
    }

    #[test]
    fn both_ends_derive_the_same_record_keys_even_during_a_rotation() {
        for (a, b) in [
            (psk(b"k1", None), psk(b"k1", None)),
            (psk(b"k2", Some(b"k1")), psk(b"k1", None)),
            (psk(b"k1", None), psk(b"k2", Some(b"k1"))),
            (psk(b"k2", Some(b"k1")), psk(b"k1", Some(b"k2"))),
        ] {
            let (mut oa, mut ob) = (Vec::new(), Vec::new());
            let mut ha = Handshake::start(Role::Dialer, ident("a", 1), a, 1, [1; 32], 100, &mut oa);
            let mut hb =
                Handshake::start(Role::Acceptor, ident("b", 2), b, 0, [2; 32], 100, &mut ob);
            let mut to_a = Vec::new();
            assert!(matches!(hb.feed(&oa, 0, &mut to_a), Step::Continue));
            ob.extend(to_a);
            let mut to_b = Vec::new();
            assert!(matches!(ha.feed(&ob, 0, &mut to_b), Step::Established(_)));
            assert!(matches!(
                hb.feed(&to_b, 0, &mut Vec::new()),
                Step::Established(_)
            ));
            let (ka, kb) = (ha.session_keys().unwrap(), hb.session_keys().unwrap());
            assert_eq!((ka.send, ka.recv), (kb.recv, kb.send));
            assert_ne!(ka.send, ka.recv);
        }
        let mut out = Vec::new();
        let h = Handshake::start(
            Role::Dialer,
            ident("a", 1),
            Security::None,
            1,
            [1; 32],
            100,
            &mut out,
        );
        assert!(h.session_keys().is_none());
    }

    #[test]
    fn wrong_psk_is_refused_on_both_ends() {
        let (a, b) = run(
            (ident("a", 1), psk(b"k1", None)),
            (ident("b", 2), psk(b"other", None)),
            64,
        );
        assert!(
            matches!(a, Step::Failed(HandshakeError::Refused(Reason::AuthFailed))),
            "{a:?}"
        );
        assert!(
            matches!(b, Step::Failed(HandshakeError::Refused(Reason::AuthFailed))),
            "{b:?}"
        );
        // A peer without a key cannot get in either.
        let (_, b) = run(
            (ident("a", 1), Security::None),
            (ident("b", 2), psk(b"k1", None)),
            64,
        );
        assert!(!matches!(b, Step::Established(_)), "{b:?}");
    }

    #[test]
    fn self_dial_and_name_conflict_and_config_mismatch() {
        let (a, _) = run(
            (ident("a", 1), Security::None),
            (ident("a", 1), Security::None),
            64,
        );
        assert!(
            matches!(a, Step::Failed(HandshakeError::Refused(Reason::SelfDial))),
            "{a:?}"
        );
        let (a, _) = run(
            (ident("a", 1), Security::None),
            (ident("a", 2), Security::None),
            64,
        );
        assert!(
            matches!(
                a,
                Step::Failed(HandshakeError::Refused(Reason::NameConflict))
            ),
            "{a:?}"
        );
        let mut other = ident("b", 2);
        other.fingerprint = 9;
        let (a, b) = run((ident("a", 1), Security::None), (other, Security::None), 64);
        assert!(
            matches!(
                a,
                Step::Failed(HandshakeError::Refused(Reason::ConfigMismatch))
            ),
            "{a:?}"
        );
        assert!(
            matches!(
                b,
                Step::Failed(HandshakeError::Refused(Reason::ConfigMismatch))
            ),
            "{b:?}"
        );
    }

    #[test]
    fn tampered_hello_fails_authentication() {
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        let mut ha = Handshake::start(
            Role::Dialer,
            ident("a", 1),
            psk(b"k", None),
            1,
            [1; 32],
            100,
            &mut oa,
        );
        let mut hb = Handshake::start(
            Role::Acceptor,
            ident("b", 2),
            psk(b"k", None),
            0,
            [2; 32],
            100,
            &mut ob,
        );
        // A man in the middle lowers a's advertised capabilities (a downgrade).
        let caps_at = oa.len() - 32 - 8 - 8 - 8;
        oa[caps_at] ^= wire::CAP_ZSTD as u8;
        let mut to_a = Vec::new();
        assert!(matches!(hb.feed(&oa, 0, &mut to_a), Step::Continue));
        ob.extend_from_slice(&to_a);
        let mut to_b = Vec::new();
        assert!(matches!(
            ha.feed(&ob, 0, &mut to_b),
            Step::Failed(HandshakeError::Refused(Reason::AuthFailed))
        ));
    }

    #[test]
    fn silence_hits_the_deadline_and_garbage_is_refused() {
        let mut out = Vec::new();
        let mut h = Handshake::start(
            Role::Acceptor,
            ident("b", 2),
            Security::None,
            0,
            [0; 32],
            5_000_000,
            &mut out,
        );
        assert!(h.check_deadline(4_999_999, &mut out).is_none());
        assert_eq!(
            h.check_deadline(5_000_000, &mut out),
            Some(HandshakeError::Timeout)
        );
        let mut h = Handshake::start(
            Role::Acceptor,
            ident("b", 2),
            Security::None,
            0,
            [0; 32],
            5_000_000,
            &mut out,
        );
        assert!(matches!(
            h.feed(b"GET / HTTP/1.1\r\n", 0, &mut out),
            Step::Failed(HandshakeError::Wire(_))
        ));
    }
}
