//! The engine without sockets: the protocol behaviours of one or several shards, driven through
//! the deterministic [`harness`] (fake sockets, a virtual clock, one thread), asserting the exact
//! frames each connection receives; and a property over random interleavings of subscribe,
//! unsubscribe, publish, disconnect and reconnect-with-recovery across shards.
//!
//! The end-to-end tests in the workspace's `tests/` keep proving that the wiring (io_uring,
//! sockets, threads, the binary) works; the behaviour itself is pinned down here, in
//! milliseconds. `PROPTEST_CASES` overrides the property's case count:
//!
//! ```text
//! PROPTEST_CASES=2000 cargo test --release -p wse-shards --test engine
//! ```

mod behaviours;
mod centrifuge;
mod cluster;
mod harness;
mod interleavings;

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
