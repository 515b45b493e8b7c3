//! `wse_server._wse_accel`: the wse-shards engine as a Python extension, with the names,
//! arguments, defaults and return shapes of upstream's (PyPI `wse-server` 2.5.1) compiled
//! module, so that `from wse_server import RustWSEServer` code runs unchanged on it.
//!
//! Owns: the Python face only. Never: networking or protocol (the engine does; this crate only
//! calls [`wse_shards::Server`]). See docs/PYTHON.md for what is implemented and what is not.

mod convert;
mod helpers;
mod jwt;
mod options;
mod server;

use pyo3::prelude::*;

/// The compiled core of the `wse_server` package (wse-shards engine).
#[pymodule]
fn _wse_accel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<server::RustWSEServer>()?;
    m.add_function(wrap_pyfunction!(jwt::rust_jwt_encode, m)?)?;
    m.add_function(wrap_pyfunction!(jwt::rust_jwt_decode, m)?)?;
    m.add_function(wrap_pyfunction!(helpers::rust_sha256, m)?)?;
    m.add_function(wrap_pyfunction!(helpers::rust_hmac_sha256, m)?)?;
    m.add_function(wrap_pyfunction!(helpers::rust_sign_message, m)?)?;
    m.add_function(wrap_pyfunction!(helpers::rust_compress, m)?)?;
    m.add_function(wrap_pyfunction!(helpers::rust_decompress, m)?)?;
    m.add_function(wrap_pyfunction!(helpers::rust_should_compress, m)?)?;
    m.add_function(wrap_pyfunction!(helpers::rust_aes_gcm_encrypt, m)?)?;
    m.add_function(wrap_pyfunction!(helpers::rust_aes_gcm_decrypt, m)?)?;
    m.add_function(wrap_pyfunction!(helpers::rust_ecdh_generate_keypair, m)?)?;
    m.add_function(wrap_pyfunction!(
        helpers::rust_ecdh_derive_shared_secret,
        m
    )?)?;
    m.add("ENGINE", "wse-shards")?;
    m.add("ENGINE_VERSION", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
