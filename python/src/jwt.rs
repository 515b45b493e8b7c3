//! Upstream's JWT helpers, `rust_jwt_encode` and `rust_jwt_decode`, on the `jsonwebtoken` crate
//! the engine verifies tokens with.
//!
//! Owns: signing and checking tokens for application code (minting test tokens, checking a
//! token outside a connection). Never: authenticates connections (the engine's `auth` does).

use jsonwebtoken::crypto::{CryptoProvider, rust_crypto};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{json_to_py, py_to_json};

/// Encode claims into a JWT token string.
///
/// Supported algorithms: HS256 (default), RS256, ES256.
/// For HS256: secret is the shared key (>= 32 bytes).
/// For RS256/ES256: secret is the PEM-encoded private key.
///
/// Raises ValueError if algorithm is not HS256, RS256, or ES256.
/// Raises RuntimeError on signing failure (invalid key, bad PEM, etc.).
#[pyfunction]
#[pyo3(signature = (claims, secret, algorithm = "HS256", key_id = None))]
pub fn rust_jwt_encode(
    claims: &Bound<'_, PyDict>,
    secret: &[u8],
    algorithm: &str,
    key_id: Option<String>,
) -> PyResult<String> {
    install_provider();
    let alg = algorithm_of(algorithm)?;
    let claims = py_to_json(claims.as_any())?;
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(secret),
        Algorithm::ES256 => EncodingKey::from_ec_pem(secret),
        _ => Ok(EncodingKey::from_secret(secret)),
    }
    .map_err(|e| PyRuntimeError::new_err(format!("invalid key: {e}")))?;
    let mut header = Header::new(alg);
    header.kid = key_id;
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| PyRuntimeError::new_err(format!("signing failed: {e}")))
}

/// Decode and validate a JWT. Returns None on failure.
///
/// Supported algorithms: HS256 (default), RS256, ES256.
/// For HS256: secret is the shared key (>= 32 bytes).
/// For RS256/ES256: secret is the PEM-encoded public key.
///
/// `exp` is required and checked (60 s leeway); `iss`/`aud` when given; a token signed with
/// `previous_secret` is accepted too (key rotation); with `key_id`, the token's `kid` must match.
/// Returns None on all failures (expired, wrong key, invalid signature, unknown algorithm, ...),
/// as upstream 2.5.1 does.
// Upstream's signature, argument for argument: drop-in means the same call works.
#[allow(clippy::too_many_arguments)]
#[pyfunction]
#[pyo3(signature = (token, secret, algorithm = "HS256", issuer = None, audience = None, previous_secret = None, key_id = None))]
pub fn rust_jwt_decode<'py>(
    py: Python<'py>,
    token: &str,
    secret: &[u8],
    algorithm: &str,
    issuer: Option<String>,
    audience: Option<String>,
    previous_secret: Option<Vec<u8>>,
    key_id: Option<String>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    install_provider();
    let Ok(alg) = algorithm_of(algorithm) else {
        return Ok(None);
    };
    if let Some(kid) = &key_id {
        match jsonwebtoken::decode_header(token) {
            Ok(h) if h.kid.as_deref() == Some(kid) => {}
            _ => return Ok(None),
        }
    }
    let mut validation = Validation::new(alg);
    if let Some(iss) = &issuer {
        validation.set_issuer(&[iss]);
    }
    match &audience {
        Some(aud) => validation.set_audience(&[aud]),
        None => validation.validate_aud = false,
    }
    let claims = [Some(secret), previous_secret.as_deref()]
        .into_iter()
        .flatten()
        .find_map(|key| {
            let key = match alg {
                Algorithm::RS256 => DecodingKey::from_rsa_pem(key).ok()?,
                Algorithm::ES256 => DecodingKey::from_ec_pem(key).ok()?,
                _ => DecodingKey::from_secret(key),
            };
            jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).ok()
        });
    claims.map(|data| json_to_py(py, &data.claims)).transpose()
}

fn algorithm_of(name: &str) -> PyResult<Algorithm> {
    match name {
        "HS256" => Ok(Algorithm::HS256),
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        other => Err(PyValueError::new_err(format!(
            "unsupported algorithm {other:?}: use HS256, RS256 or ES256"
        ))),
    }
}

/// As the engine's `auth` does: pick the backend explicitly (an Err means one is installed).
fn install_provider() {
    let _ = CryptoProvider::install_default(&rust_crypto::DEFAULT_PROVIDER);
}
