//! One timer wheel per shard for every per-connection deadline (ping, idle, handshake, close).
//!
//! Owns: which connection keys are due at which tick. Never: knows what a deadline means; the
//! connection computes its next deadline and the shard re-arms it after each expiry.
//!
//! Design: a hashed wheel of [`SLOTS`] slots of [`TIMER_TICK`] each. Each connection has at most
//! one *current* entry: the shard remembers the tick it armed (`armed_tick`), and an expiry whose
//! tick no longer matches is stale and ignored. Activity never touches the wheel (the idle deadline
//! moves lazily: when the old deadline fires, the connection answers with its new one). Deadlines
//! past the horizon are parked at the horizon and re-armed when they fire.

use std::time::{Duration, Instant};

use crate::config::TIMER_TICK;

/// Number of slots; `SLOTS * TIMER_TICK` = 102 s of horizon, more than the default idle timeout.
pub const SLOTS: usize = 2048;

/// A tick number since the wheel's start.
pub type Tick = u64;

/// A hashed timer wheel of connection deadlines (pings, idle, handshake and close timeouts),
/// ticking every [`TIMER_TICK`]; arming and expiry are O(1), a key can be re-armed freely
/// (stale entries are skipped on expiry).
#[derive(Debug)]
pub struct TimerWheel {
    start: Instant,
    /// Every tick before this one has been expired.
    next_tick: Tick,
    /// `slots[t % SLOTS]` holds `(key, t)` for every entry armed at tick `t`.
    slots: Vec<Vec<(u32, Tick)>>,
    len: usize,
}

impl TimerWheel {
    /// An empty wheel whose tick 0 is `start`.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            next_tick: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            len: 0,
        }
    }

    /// Arms `key` to expire at the first tick at or after `at`; returns that tick, which the
    /// caller stores to recognise the entry when it fires.
    pub fn arm(&mut self, key: u32, at: Instant) -> Tick {
        let tick = self.arm_tick_for(at);
        self.slots[(tick % SLOTS as Tick) as usize].push((key, tick));
        self.len += 1;
        tick
    }

    /// The tick [`TimerWheel::arm`] would use for `at`, without arming.
    pub fn arm_tick_for(&self, at: Instant) -> Tick {
        self.tick_of(at)
            .max(self.next_tick)
            .min(self.next_tick + SLOTS as Tick - 1)
    }

    /// Moves every entry due by `now` into `expired` as `(key, tick)`. The caller drops the ones
    /// whose tick is not the key's current armed tick.
    pub fn expire(&mut self, now: Instant, expired: &mut Vec<(u32, Tick)>) {
        let now_tick = self.tick_of(now);
        while self.next_tick <= now_tick {
            let slot = &mut self.slots[(self.next_tick % SLOTS as Tick) as usize];
            let before = slot.len();
            let current = self.next_tick;
            slot.retain(|&(key, tick)| {
                debug_assert!(tick >= current, "entry for a past tick left in the wheel");
                if tick == current {
                    expired.push((key, tick));
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
            self.next_tick += 1;
            if self.len == 0 {
                // Nothing left anywhere: skip the empty ticks in one step.
                self.next_tick = self.next_tick.max(now_tick + 1);
            }
        }
    }

    /// When the next tick that may hold an entry starts; `None` when the wheel is empty.
    pub fn next_expiry(&self) -> Option<Instant> {
        (self.len > 0).then(|| self.start + TIMER_TICK * self.next_tick as u32)
    }

    /// Entries armed and not yet expired (stale re-armed ones included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing armed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn tick_of(&self, at: Instant) -> Tick {
        let since = at.saturating_duration_since(self.start);
        // Round up: a deadline never fires early.
        since.as_nanos().div_ceil(TIMER_TICK.as_nanos()) as Tick
    }
}

/// The longest a deadline may wait: past it, the entry sits at the horizon and is re-armed.
pub fn horizon() -> Duration {
    TIMER_TICK * (SLOTS as u32 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_or_after_the_deadline_never_before() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let tick = w.arm(7, t0 + Duration::from_millis(120));
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(100), &mut out);
        assert!(out.is_empty());
        w.expire(t0 + Duration::from_millis(150), &mut out);
        assert_eq!(out, vec![(7, tick)]);
        assert!(w.is_empty());
        assert_eq!(w.next_expiry(), None);
    }

    #[test]
    fn far_deadlines_park_at_the_horizon() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let tick = w.arm(1, t0 + Duration::from_secs(3600));
        assert_eq!(tick, SLOTS as Tick - 1);
        let mut out = Vec::new();
        w.expire(t0 + horizon(), &mut out);
        assert_eq!(out, vec![(1, tick)]);
    }

    #[test]
    fn entries_of_a_later_round_stay() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let mut out = Vec::new();
        // Advance so the slot of tick 5 is shared with tick 5 + SLOTS.
        w.arm(1, t0 + TIMER_TICK * 5);
        w.expire(t0 + TIMER_TICK * 6, &mut out);
        assert_eq!(out.len(), 1);
        let late = w.arm(2, t0 + TIMER_TICK * (5 + SLOTS as u32));
        w.arm(3, t0 + TIMER_TICK * 7);
        out.clear();
        w.expire(t0 + TIMER_TICK * 8, &mut out);
        assert_eq!(out.iter().map(|e| e.0).collect::<Vec<_>>(), vec![3]);
        out.clear();
        w.expire(t0 + TIMER_TICK * (5 + SLOTS as u32), &mut out);
        assert_eq!(out, vec![(2, late)]);
    }

    #[test]
    fn past_deadlines_fire_on_the_next_expire() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_secs(1), &mut out);
        // A deadline already past is due at the next tick, not in the tick just expired.
        w.arm(9, t0);
        w.expire(t0 + Duration::from_secs(1), &mut out);
        assert!(out.is_empty());
        w.expire(t0 + Duration::from_secs(1) + TIMER_TICK, &mut out);
        assert_eq!(out.len(), 1);
    }
}
