//! Per-connection inbound rate limit (protocol.md §7): a token bucket plus the throttles that keep
//! its notices to one per second and the abuse counter that decides close 4429.
//!
//! Owns: one connection's bucket state. Never: reads a clock (callers pass `now_ms`), sends
//! anything (it returns a [`Verdict`] the connection acts on).
//!
//! Invariant: `0 <= tokens <= capacity`.

/// A notice is sent at most once per this many milliseconds (protocol.md §7).
const NOTICE_INTERVAL_MS: u64 = 1000;
/// Below this share of the capacity the client is warned.
const WARN_FRACTION: f64 = 0.2;

/// The limits, copied from the config once per shard.
#[derive(Clone, Copy, Debug)]
pub struct RateLimits {
    /// Bucket size, messages.
    pub capacity: u32,
    /// Refill, messages per second.
    pub refill_per_sec: u32,
    /// Drops within one window that close the connection with 4429.
    pub abuse_drops: u32,
    /// Length of the abuse window, milliseconds.
    pub abuse_window_ms: u64,
}

/// What to do with one inbound message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// Process it.
    Allow,
    /// Process it and send `rate_limit_warning` with these figures.
    AllowAndWarn {
        /// Tokens left in the bucket.
        remaining: u32,
        /// Messages per second the connection is sending at.
        current_rate: u32,
    },
    /// Drop it; send `RATE_LIMITED` when `notify`.
    Drop {
        /// Tell the client (`RATE_LIMITED`): at most one notice a second, not one per drop.
        notify: bool,
    },
    /// Drop it and close the connection with 4429: it kept flooding past the limit.
    Abuse,
}

/// One connection's bucket. 40 bytes; lives inline in every live connection.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    tokens: f64,
    last_refill_ms: u64,
    last_warning_ms: Option<u64>,
    last_error_ms: Option<u64>,
    window_start_ms: u64,
    window_drops: u32,
    /// Messages accepted in the current one-second window, for `current_rate`.
    second_count: u32,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limits: &RateLimits, now_ms: u64) -> Self {
        Self {
            tokens: f64::from(limits.capacity),
            last_refill_ms: now_ms,
            last_warning_ms: None,
            last_error_ms: None,
            window_start_ms: now_ms,
            window_drops: 0,
            second_count: 0,
        }
    }

    /// Charges one message.
    pub fn check(&mut self, limits: &RateLimits, now_ms: u64) -> Verdict {
        self.refill(limits, now_ms);
        if now_ms.saturating_sub(self.window_start_ms) >= limits.abuse_window_ms {
            self.window_start_ms = now_ms;
            self.window_drops = 0;
        }
        if self.tokens < 1.0 {
            self.window_drops = self.window_drops.saturating_add(1);
            if self.window_drops >= limits.abuse_drops {
                return Verdict::Abuse;
            }
            let notify = due(&mut self.last_error_ms, now_ms);
            return Verdict::Drop { notify };
        }
        self.tokens -= 1.0;
        self.second_count = self.second_count.saturating_add(1);
        debug_assert!(self.tokens >= 0.0 && self.tokens <= f64::from(limits.capacity));
        if self.tokens < f64::from(limits.capacity) * WARN_FRACTION
            && due(&mut self.last_warning_ms, now_ms)
        {
            return Verdict::AllowAndWarn {
                remaining: self.tokens as u32,
                current_rate: self.second_count,
            };
        }
        Verdict::Allow
    }

    fn refill(&mut self, limits: &RateLimits, now_ms: u64) {
        let cap = f64::from(limits.capacity);
        // A reload may have lowered the capacity below what the bucket holds.
        self.tokens = self.tokens.min(cap);
        let elapsed = now_ms.saturating_sub(self.last_refill_ms);
        if elapsed == 0 {
            return;
        }
        self.tokens =
            (self.tokens + elapsed as f64 * f64::from(limits.refill_per_sec) / 1000.0).min(cap);
        // `current_rate` counts from the last refill that crossed a second boundary.
        if now_ms / 1000 != self.last_refill_ms / 1000 {
            self.second_count = 0;
        }
        self.last_refill_ms = now_ms;
    }
}

/// True (and records `now`) when no notice went out in the last second.
fn due(last: &mut Option<u64>, now_ms: u64) -> bool {
    match *last {
        Some(t) if now_ms.saturating_sub(t) < NOTICE_INTERVAL_MS => false,
        _ => {
            *last = Some(now_ms);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: RateLimits = RateLimits {
        capacity: 10,
        refill_per_sec: 5,
        abuse_drops: 20,
        abuse_window_ms: 10_000,
    };

    #[test]
    fn warns_once_below_twenty_percent_then_drops_with_one_notice_per_second() {
        let mut b = TokenBucket::new(&L, 0);
        let verdicts: Vec<Verdict> = (0..12).map(|_| b.check(&L, 0)).collect();
        assert!(verdicts[..8].iter().all(|v| *v == Verdict::Allow));
        // 9th message leaves 1 token (< 2 = 20 %).
        assert!(matches!(
            verdicts[8],
            Verdict::AllowAndWarn { remaining: 1, .. }
        ));
        assert_eq!(verdicts[9], Verdict::Allow); // warning throttled
        assert_eq!(verdicts[10], Verdict::Drop { notify: true });
        assert_eq!(verdicts[11], Verdict::Drop { notify: false });
        // One second later: 5 tokens back; the warning comes again once below 2.
        let later: Vec<Verdict> = (0..4).map(|_| b.check(&L, 1000)).collect();
        assert_eq!(&later[..3], &[Verdict::Allow; 3]);
        assert!(matches!(
            later[3],
            Verdict::AllowAndWarn { remaining: 1, .. }
        ));
    }

    #[test]
    fn refill_is_capped() {
        let mut b = TokenBucket::new(&L, 0);
        for _ in 0..10 {
            b.check(&L, 0);
        }
        b.refill(&L, 1_000_000);
        assert_eq!(b.tokens, 10.0);
    }

    #[test]
    fn persistent_flood_is_abuse() {
        let mut b = TokenBucket::new(&L, 0);
        let mut closed_at = None;
        for i in 0..100 {
            if b.check(&L, 0) == Verdict::Abuse {
                closed_at = Some(i);
                break;
            }
        }
        // 10 allowed, then the 20th drop in the window is abuse.
        assert_eq!(closed_at, Some(29));
    }

    #[test]
    fn abuse_window_resets() {
        let mut b = TokenBucket::new(&L, 0);
        for _ in 0..25 {
            b.check(&L, 0);
        }
        assert!(b.window_drops > 0);
        b.check(&L, 10_000);
        assert!(b.window_drops <= 1);
    }
}
