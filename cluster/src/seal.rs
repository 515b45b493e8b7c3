//! PSK sessions' record layer: after AUTH, every byte each way travels in AES-256-GCM records
//! `u32 len | ciphertext | 16-byte tag` (len counts ciphertext and tag), under a per-direction
//! key with a counter nonce, the length as associated data. A tampered, dropped, replayed or
//! reordered record fails to open, and the session is closed.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};

/// Plaintext bytes per record, at most.
pub const SEAL_RECORD_MAX: usize = 64 * 1024;
/// Authentication tag length, bytes.
pub const TAG_LEN: usize = 16;

/// Why a record could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The length field is out of bounds.
    #[error("sealed record length {0} out of bounds")]
    Length(usize),
    /// Authentication failed: tampered, replayed, reordered or wrong key.
    #[error("sealed record failed authentication")]
    Auth,
    /// 2^64 records: never in practice, but never a reused nonce either.
    #[error("record counter exhausted")]
    Exhausted,
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

/// Seals what this end sends.
pub struct Sealer {
    cipher: Aes256Gcm,
    counter: u64,
}

impl Sealer {
    /// A sealer with this direction's key.
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
            counter: 0,
        }
    }

    /// Appends `plain` as one or more records.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) {
        for chunk in plain.chunks(SEAL_RECORD_MAX) {
            let len = u32::try_from(chunk.len() + TAG_LEN).expect("records are at most 64 KiB");
            let aad = len.to_le_bytes();
            out.extend_from_slice(&aad);
            let start = out.len();
            out.extend_from_slice(chunk);
            let n = nonce(self.counter);
            // The counter is per direction and never wraps in practice; the opener refuses
            // past 2^64 - 1 records anyway.
            self.counter = self.counter.wrapping_add(1);
            let tag = self
                .cipher
                .encrypt_in_place_detached(&Nonce::from(n), &aad, &mut out[start..])
                .expect("AES-GCM seals any record under 64 GiB");
            out.extend_from_slice(&tag);
        }
    }
}

/// Opens what the peer sends; holds at most one partial record plus the last push.
pub struct Opener {
    cipher: Aes256Gcm,
    counter: u64,
    buf: Vec<u8>,
}

impl Opener {
    /// An opener with the peer's direction key.
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
            counter: 0,
            buf: Vec::new(),
        }
    }

    /// Bytes received and not yet opened (at most one partial record plus the last read).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Opens every complete record in `bytes` (plus what was buffered), appending the plaintext
    /// to `out`. After an error the session must be closed.
    pub fn open(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        self.buf.extend_from_slice(bytes);
        let mut at = 0;
        let res = loop {
            let rest = &self.buf[at..];
            if rest.len() < 4 {
                break Ok(());
            }
            let aad = [rest[0], rest[1], rest[2], rest[3]];
            let len = u32::from_le_bytes(aad) as usize;
            if !(TAG_LEN..=SEAL_RECORD_MAX + TAG_LEN).contains(&len) {
                break Err(SealError::Length(len));
            }
            if rest.len() < 4 + len {
                break Ok(());
            }
            if self.counter == u64::MAX {
                break Err(SealError::Exhausted);
            }
            let (body, tag) = rest[4..4 + len].split_at(len - TAG_LEN);
            let tag =
                Tag::from(<[u8; TAG_LEN]>::try_from(tag).map_err(|_| SealError::Length(len))?);
            let start = out.len();
            out.extend_from_slice(body);
            let n = nonce(self.counter);
            if self
                .cipher
                .decrypt_in_place_detached(&Nonce::from(n), &aad, &mut out[start..], &tag)
                .is_err()
            {
                out.truncate(start);
                break Err(SealError::Auth);
            }
            self.counter += 1;
            at += 4 + len;
        };
        self.buf.drain(..at);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(s: &mut Sealer, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        s.seal(plain, &mut out);
        out
    }

    #[test]
    fn records_round_trip_across_split_reads() {
        let (mut s, mut o) = (Sealer::new(&[7; 32]), Opener::new(&[7; 32]));
        let plain: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut wire = sealed(&mut s, &plain);
        wire.extend(sealed(&mut s, b"tail"));
        assert_eq!(
            wire.len(),
            plain.len() + 4 + 5 * (4 + TAG_LEN),
            "4 + 1 records"
        );
        let mut out = Vec::new();
        for chunk in wire.chunks(333) {
            o.open(chunk, &mut out).unwrap();
        }
        assert_eq!(&out[..plain.len()], &plain[..]);
        assert_eq!(&out[plain.len()..], b"tail");
    }

    #[test]
    fn tampering_replay_reorder_and_wrong_keys_fail() {
        let mut s = Sealer::new(&[1; 32]);
        let (r1, r2) = (sealed(&mut s, b"one"), sealed(&mut s, b"two"));
        let mut out = Vec::new();
        let mut flipped = r1.clone();
        flipped[6] ^= 1;
        assert_eq!(
            Opener::new(&[1; 32]).open(&flipped, &mut out),
            Err(SealError::Auth)
        );
        assert_eq!(
            Opener::new(&[1; 32]).open(&r2, &mut out),
            Err(SealError::Auth),
            "reordered"
        );
        assert_eq!(
            Opener::new(&[2; 32]).open(&r1, &mut out),
            Err(SealError::Auth),
            "wrong key"
        );
        let mut o = Opener::new(&[1; 32]);
        o.open(&r1, &mut out).unwrap();
        assert_eq!(o.open(&r1, &mut out), Err(SealError::Auth), "replayed");
        let mut long = r1.clone();
        long[..4].copy_from_slice(&(SEAL_RECORD_MAX as u32 + 17).to_le_bytes());
        assert!(matches!(
            Opener::new(&[1; 32]).open(&long, &mut out),
            Err(SealError::Length(_))
        ));
        assert_eq!(out, b"one", "nothing unauthenticated comes out");
    }
}
