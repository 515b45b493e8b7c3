//! A drain's close frames, spread out: a shard that closed all its connections at once would
//! have them all reconnect elsewhere at once (a thundering herd on the surviving servers).
//!
//! Owns: the connections a drain has yet to close and when the next batch is due. Never: decides
//! when the drain ends (`Shard::is_drained`: every connection gone, or the deadline).
//!
//! Invariant: batches go out every [`DRAIN_BATCH_INTERVAL`] from the drain's start, the last no
//! later than [`DRAIN_CLOSE_SPREAD_PERCENT`] of the drain timeout; the rest of the timeout is
//! left to the last batch's close handshakes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::ConnKey;

/// Share of the drain timeout over which the close frames are spread, percent. The remainder is
/// what the last batch has to answer its close frame before the drain times out.
pub const DRAIN_CLOSE_SPREAD_PERCENT: u32 = 50;
/// Time between two batches of close frames during a drain.
pub const DRAIN_BATCH_INTERVAL: Duration = Duration::from_millis(100);

/// A shard's drain: whether one has started, until when it may run, and the close frames it
/// has still to send.
#[derive(Debug, Default)]
pub(super) struct Drain {
    /// When the drain ends at the latest (`None`: not draining).
    until: Option<Instant>,
    closes: Option<DrainCloses>,
}

impl Drain {
    /// A drain has started.
    pub fn is_draining(&self) -> bool {
        self.until.is_some()
    }

    /// When the drain ends at the latest.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Starts a drain closing `keys` with `code` and `reason` from `now`, ending at `until` at
    /// the latest. `false` (and nothing changes) when one is already under way.
    pub fn begin(
        &mut self,
        code: u16,
        reason: &str,
        keys: Vec<ConnKey>,
        now: Instant,
        until: Instant,
    ) -> bool {
        if self.until.is_some() {
            return false;
        }
        self.until = Some(until);
        let timeout = until.saturating_duration_since(now);
        self.closes = Some(DrainCloses::new(code, reason, keys, now, timeout));
        true
    }

    /// When the next batch of close frames is due.
    pub fn next_batch_at(&self) -> Option<Instant> {
        self.closes.as_ref().and_then(DrainCloses::poll_timeout)
    }

    /// The close code, reason and connections of the batch due at `now` (`None` when not
    /// draining; no connections before the next batch is due).
    pub fn due(&mut self, now: Instant) -> Option<(u16, Arc<str>, Vec<ConnKey>)> {
        let plan = self.closes.as_mut()?;
        Some((plan.code, plan.reason.clone(), plan.handle_timeout(now)))
    }
}

/// The closes a drain has still to send.
#[derive(Debug)]
struct DrainCloses {
    code: u16,
    reason: Arc<str>,
    /// Connections not closed yet, in the order they will be (last first: popped from the end).
    left: Vec<ConnKey>,
    /// Connections closed per batch: all of them spread over the batches the spread allows.
    per_batch: usize,
    /// When the next batch is due.
    next_at: Instant,
}

impl DrainCloses {
    /// Plans the closes of `keys` for a drain from `now` with `timeout` to go.
    pub fn new(
        code: u16,
        reason: &str,
        mut keys: Vec<ConnKey>,
        now: Instant,
        timeout: Duration,
    ) -> Self {
        let spread = timeout * DRAIN_CLOSE_SPREAD_PERCENT / 100;
        let batches = (spread.as_nanos() / DRAIN_BATCH_INTERVAL.as_nanos()).max(1) as usize;
        let per_batch = keys.len().div_ceil(batches).max(1);
        // Popped from the end: the oldest connections go first.
        keys.reverse();
        Self {
            code,
            reason: Arc::from(reason),
            left: keys,
            per_batch,
            next_at: now,
        }
    }

    /// When the next batch is due; `None` once every close went out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.left.is_empty()).then_some(self.next_at)
    }

    /// The connections to close now (empty before the next batch is due).
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<ConnKey> {
        if self.left.is_empty() || now < self.next_at {
            return Vec::new();
        }
        let n = self.per_batch.min(self.left.len());
        let batch = self.left.split_off(self.left.len() - n);
        self.next_at += DRAIN_BATCH_INTERVAL;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_are_spread_over_half_the_timeout_in_order() {
        let t0 = Instant::now();
        let mut d = DrainCloses::new(4300, "bye", (0..25).collect(), t0, Duration::from_secs(2));
        let mut closed = Vec::new();
        let mut last_batch_at = t0;
        while let Some(at) = d.poll_timeout() {
            let batch = d.handle_timeout(at);
            assert!(!batch.is_empty());
            assert!(
                d.handle_timeout(at).is_empty(),
                "a second batch at the same instant"
            );
            closed.extend(batch.into_iter().rev());
            last_batch_at = at;
        }
        assert_eq!(closed, (0..25).collect::<Vec<_>>());
        // 1 s of spread in 100 ms steps allows 10 batches; 3 per batch makes 9 (the last of 1).
        assert_eq!(last_batch_at - t0, DRAIN_BATCH_INTERVAL * 8);
    }

    #[test]
    fn a_short_timeout_closes_everything_at_once() {
        let t0 = Instant::now();
        let mut d = DrainCloses::new(4300, "", (0..5).collect(), t0, Duration::from_millis(50));
        assert_eq!(d.handle_timeout(t0).len(), 5);
        assert_eq!(d.poll_timeout(), None);
    }
}
