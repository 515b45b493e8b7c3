//! The one monotonic clock every thread of the load generator stamps and measures with.
//!
//! Publishers write the *scheduled* send time as nanoseconds since `EPOCH`; subscribers on
//! other threads subtract it from their receive time. Both read the same `Instant` base in the
//! same process, so there is no clock skew to correct.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The shared epoch (set on first use).
pub fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the shared epoch.
#[inline]
pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// The `Instant` that is `ns` after the epoch.
pub fn instant_at(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}
