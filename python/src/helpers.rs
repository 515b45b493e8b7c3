//! Upstream's module-level helper functions that need native code: hashing and signing
//! (`rust_sha256`, `rust_hmac_sha256`, `rust_sign_message`), zlib (`rust_compress`,
//! `rust_decompress`, `rust_should_compress`), AES-GCM-256 and ECDH P-256 (the end-to-end
//! encryption of WSE's clients). Same arguments,
//! results, wire formats and exception types as upstream 2.5.1's (python/tests/test_helpers.py
//! compares them on the same inputs).
//!
//! Owns: these functions only, on the RustCrypto crates and flate2. Never: anything the engine
//! does on connections (its own zlib and MessagePack paths are in wse-shards).

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use flate2::write::ZlibEncoder;
use flate2::{Compression, Decompress, FlushDecompress, Status};
use hmac::{Hmac, Mac};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use sha2::{Digest, Sha256};

/// Largest output `rust_decompress` produces, bytes (upstream's bound, same message past it).
const DECOMPRESS_MAX: usize = 10 * 1024 * 1024;
/// Output room `rust_decompress` adds at a time, bytes.
const DECOMPRESS_CHUNK: usize = 64 * 1024;
/// AES-256 key length, bytes.
const AES_KEY_LEN: usize = 32;
/// AES-GCM nonce (IV) and tag lengths, bytes: the wire format is IV || ciphertext || tag.
const GCM_IV_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;
/// HKDF-SHA256 `info` for the AES key derived from an ECDH secret (WSE's clients use the same).
const ECDH_HKDF_INFO: &[u8] = b"wse-encryption/aes-gcm-key";

/// Compute SHA-256 hash of data. Returns hex digest string.
#[pyfunction]
#[pyo3(signature = (data))]
pub fn rust_sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Compute HMAC-SHA256 of data using the given key.
/// Returns raw bytes (32 bytes).
#[pyfunction]
#[pyo3(signature = (key, data))]
pub fn rust_hmac_sha256<'py>(py: Python<'py>, key: &[u8], data: &[u8]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &hmac_sha256(key, data))
}

/// Sign a JSON payload string using HMAC-SHA256.
///
/// 1. Compute SHA-256 hash of payload_json
/// 2. Compute HMAC-SHA256(secret, hash)
/// 3. Return hex-encoded HMAC
#[pyfunction]
#[pyo3(signature = (payload_json, secret))]
pub fn rust_sign_message(payload_json: &str, secret: &[u8]) -> String {
    // The hash enters the HMAC as its hex text, as upstream's does.
    let digest = hex(&Sha256::digest(payload_json.as_bytes()));
    hex(&hmac_sha256(secret, digest.as_bytes()))
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Compress data using zlib.
///
/// `level`: 1 (fastest) through 9 (smallest); anything else raises ValueError.
#[pyfunction]
#[pyo3(signature = (data, level))]
pub fn rust_compress<'py>(
    py: Python<'py>,
    data: &[u8],
    level: i64,
) -> PyResult<Bound<'py, PyBytes>> {
    Ok(PyBytes::new(py, &compress(data, level)?))
}

pub fn compress(data: &[u8], level: i64) -> PyResult<Vec<u8>> {
    use std::io::Write as _;
    let level = u32::try_from(level)
        .ok()
        .filter(|l| (1..=9).contains(l))
        .ok_or_else(|| PyValueError::new_err("compression level must be between 1 and 9"))?;
    let mut enc = ZlibEncoder::new(
        Vec::with_capacity(data.len() / 2 + 16),
        Compression::new(level),
    );
    enc.write_all(data)
        .and_then(|()| enc.finish())
        .map_err(|e| PyRuntimeError::new_err(format!("compression error: {e}")))
}

/// Decompress zlib-compressed data (bounded to 10 MiB of output: RuntimeError past it).
#[pyfunction]
#[pyo3(signature = (data))]
pub fn rust_decompress<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    Ok(PyBytes::new(py, &decompress(data)?))
}

pub fn decompress(data: &[u8]) -> PyResult<Vec<u8>> {
    let mut z = Decompress::new(true);
    let mut out = Vec::with_capacity((data.len() * 4).min(DECOMPRESS_MAX + 1));
    loop {
        // One byte past the bound tells "exactly at the bound" from "over it".
        let room = DECOMPRESS_MAX + 1 - out.len();
        out.reserve(room.min(DECOMPRESS_CHUNK));
        let (before_in, before_out) = (z.total_in(), z.total_out());
        let consumed = before_in as usize;
        let status = z
            .decompress_vec(&data[consumed..], &mut out, FlushDecompress::None)
            .map_err(|e| PyRuntimeError::new_err(format!("decompression error: {e}")))?;
        if out.len() > DECOMPRESS_MAX {
            return Err(PyRuntimeError::new_err(format!(
                "decompressed output exceeds {DECOMPRESS_MAX} bytes limit"
            )));
        }
        // The end of the stream, or of the input: a truncated stream gives what it holds (and
        // bytes after the stream are ignored), as upstream's does.
        let stalled = z.total_in() == before_in && z.total_out() == before_out;
        if status == Status::StreamEnd || stalled {
            return Ok(out);
        }
    }
}

/// Return true if the data length exceeds the given threshold.
#[pyfunction]
#[pyo3(signature = (data, threshold))]
pub fn rust_should_compress(data: &[u8], threshold: usize) -> bool {
    data.len() > threshold
}

fn aes_key(key: &[u8]) -> PyResult<Aes256Gcm> {
    if key.len() != AES_KEY_LEN {
        return Err(PyValueError::new_err("AES-GCM-256 key must be 32 bytes"));
    }
    Ok(Aes256Gcm::new_from_slice(key).expect("32-byte key"))
}

/// Encrypt plaintext using AES-GCM-256.
///
/// key: 32-byte AES key.
/// Returns: 12-byte IV + ciphertext + 16-byte auth tag (a random IV each call).
#[pyfunction]
#[pyo3(signature = (key, plaintext))]
pub fn rust_aes_gcm_encrypt<'py>(
    py: Python<'py>,
    key: &[u8],
    plaintext: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let cipher = aes_key(key)?;
    let iv = Aes256Gcm::generate_nonce(&mut OsRng);
    let sealed = cipher
        .encrypt(&iv, plaintext)
        .map_err(|e| PyRuntimeError::new_err(format!("Encrypt failed: {e}")))?;
    let mut out = Vec::with_capacity(GCM_IV_LEN + sealed.len());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&sealed);
    Ok(PyBytes::new(py, &out))
}

/// Decrypt AES-GCM-256 ciphertext.
///
/// key: 32-byte AES key.
/// data: 12-byte IV + ciphertext + 16-byte auth tag.
/// Returns: decrypted plaintext (RuntimeError when the tag does not verify).
#[pyfunction]
#[pyo3(signature = (key, data))]
pub fn rust_aes_gcm_decrypt<'py>(
    py: Python<'py>,
    key: &[u8],
    data: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let cipher = aes_key(key)?;
    if data.len() < GCM_IV_LEN + GCM_TAG_LEN {
        return Err(PyValueError::new_err(
            "Encrypted data too short (min 28 bytes: 12 IV + 16 tag)",
        ));
    }
    let (iv, sealed) = data.split_at(GCM_IV_LEN);
    let iv: [u8; GCM_IV_LEN] = iv.try_into().expect("split at the IV length");
    let plain = cipher
        .decrypt(&Nonce::from(iv), sealed)
        .map_err(|e| PyRuntimeError::new_err(format!("Decrypt failed: {e:?}")))?;
    Ok(PyBytes::new(py, &plain))
}

/// Generate an ECDH P-256 keypair.
///
/// Returns (private_key_32bytes, public_key_uncompressed_65bytes).
/// Public key format: 0x04 || X (32 bytes) || Y (32 bytes) — SEC1 uncompressed.
#[pyfunction]
pub fn rust_ecdh_generate_keypair(py: Python<'_>) -> (Bound<'_, PyBytes>, Bound<'_, PyBytes>) {
    let secret = SecretKey::random(&mut OsRng);
    let public = secret.public_key().to_encoded_point(false);
    (
        PyBytes::new(py, &secret.to_bytes()),
        PyBytes::new(py, public.as_bytes()),
    )
}

/// Derive a 32-byte AES key from ECDH shared secret + HKDF-SHA256.
///
/// private_key: 32-byte raw scalar.
/// peer_public_key: SEC1 point, 65-byte uncompressed (04 || X || Y) or 33-byte compressed.
///
/// HKDF parameters (RFC 5869): salt = None (32 zero bytes), info =
/// "wse-encryption/aes-gcm-key", hash = SHA-256, output = 32 bytes (AES-256 key).
#[pyfunction]
#[pyo3(signature = (private_key, peer_public_key))]
pub fn rust_ecdh_derive_shared_secret<'py>(
    py: Python<'py>,
    private_key: &[u8],
    peer_public_key: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let secret = SecretKey::from_slice(private_key)
        .map_err(|e| PyValueError::new_err(format!("Invalid private key: {e}")))?;
    // Any SEC1 encoding (uncompressed or compressed), as upstream.
    let peer = PublicKey::from_sec1_bytes(peer_public_key)
        .map_err(|e| PyValueError::new_err(format!("Invalid peer public key: {e}")))?;
    let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), peer.as_affine());
    let mut key = [0u8; AES_KEY_LEN];
    shared
        .extract::<Sha256>(None)
        .expand(ECDH_HKDF_INFO, &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    Ok(PyBytes::new(py, &key))
}
