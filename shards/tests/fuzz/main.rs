//! Property-based fuzzing of everything in the engine that parses peer input: the RFC 6455 frame
//! decoder, the HTTP upgrade parser, the WSE message decoder (JSON, `C:` zlib, `M:` MessagePack),
//! the Centrifuge session (JSON lines and protobuf)
//! and a whole connection fed arbitrary bytes after a valid upgrade.
//!
//! Each property says more than "does not panic": results do not depend on how the input was
//! split into reads, and every buffer and output stays under the limit configured for it (the
//! "bounded memory" of issue 10, measured as sizes, not RSS).
//!
//! Bounded time: the default case counts keep this binary at well under a minute in a debug
//! build on two cores, as CI runs it. For a longer local run set `PROPTEST_CASES`, which then
//! applies to every property here:
//!
//! ```text
//! PROPTEST_CASES=20000 cargo test --release -p wse-shards --test fuzz
//! ```
//!
//! Failures are not persisted to files: a case that once failed is kept as a named regression
//! test next to the property that found it.

mod centrifuge;
mod codec;
mod conn;
mod handshake;
mod protocol;

use proptest::test_runner::Config;

/// `default` cases, unless `PROPTEST_CASES` says otherwise.
pub fn cases(default: u32) -> Config {
    let mut config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default;
    }
    config
}
