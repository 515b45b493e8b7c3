//! Member records, SWIM precedence, suspicion timing and the redial circuit breaker.

use rand::Rng;

use crate::wire::MemberState;

/// Whether `new` (state, incarnation) overrides `old` by SWIM's rules (spec §3): a higher
/// incarnation always wins; at the same incarnation Alive < Leaving < Suspect < Dead < Left.
/// So Alive(i) beats Suspect(j) iff i > j, Suspect(i) beats Alive(j) iff i ≥ j, Dead/Left(i)
/// beat both for j ≤ i, and only a higher incarnation resurrects a dead member.
pub fn supersedes(new: (MemberState, u64), old: (MemberState, u64)) -> bool {
    (new.1, rank(new.0)) > (old.1, rank(old.0))
}

fn rank(s: MemberState) -> u8 {
    match s {
        MemberState::Alive => 0,
        MemberState::Leaving => 1,
        MemberState::Suspect => 2,
        MemberState::Dead => 3,
        MemberState::Left => 4,
    }
}

/// Suspicion timeout after `confirmations` independent reports (Lifeguard-style): starts at
/// `max_us`, shrinks linearly to `min_us` once half of the `others` (members other than us and
/// the suspect) confirm.
pub fn suspicion_timeout(max_us: u64, min_us: u64, confirmations: usize, others: usize) -> u64 {
    let needed = (others / 2).max(1) as u64;
    let c = (confirmations as u64).min(needed);
    max_us - (max_us - min_us) * c / needed
}

/// Consecutive failures before the breaker opens.
pub const BREAKER_OPEN_AFTER: u32 = 5;
/// Delay between attempts while the breaker is closed, in µs.
pub const BREAKER_CLOSED_RETRY_US: u64 = 200_000;
/// First delay once open, in µs (doubles per failure).
pub const BREAKER_OPEN_BASE_US: u64 = 1_000_000;
/// Longest delay, in µs.
pub const BREAKER_OPEN_MAX_US: u64 = 30_000_000;
/// Jitter applied to every delay, in percent either way.
pub const BREAKER_JITTER_PERCENT: u64 = 20;

/// Dial policy for one target (a member name or a seed address): not failure detection.
/// Closed: retry after a short delay; after [`BREAKER_OPEN_AFTER`] consecutive failures open:
/// 1 s doubling to 30 s, ±20 % jitter, one dial at a time (half-open).
#[derive(Debug, Clone, Default)]
pub struct Breaker {
    failures: u32,
    next_attempt: u64,
}

impl Breaker {
    /// Whether a dial may start now.
    pub fn ready(&self, now: u64) -> bool {
        now >= self.next_attempt
    }
    /// Whether the breaker is open.
    pub fn is_open(&self) -> bool {
        self.failures >= BREAKER_OPEN_AFTER
    }
    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
    /// A dial or handshake failed.
    pub fn failure(&mut self, now: u64, rng: &mut impl Rng) {
        self.failures = self.failures.saturating_add(1);
        let base = if self.failures < BREAKER_OPEN_AFTER {
            BREAKER_CLOSED_RETRY_US
        } else {
            let doublings = (self.failures - BREAKER_OPEN_AFTER).min(16);
            (BREAKER_OPEN_BASE_US << doublings).min(BREAKER_OPEN_MAX_US)
        };
        self.next_attempt = now + jitter(base, rng);
    }
    /// Waits at least `us` before the next attempt (a peer's `retry_after`).
    pub fn hold_off(&mut self, now: u64, us: u64) {
        self.next_attempt = self.next_attempt.max(now + us);
    }
    /// A session was established.
    pub fn success(&mut self) {
        self.failures = 0;
        self.next_attempt = 0;
    }
}

/// `base` ± [`BREAKER_JITTER_PERCENT`] %, so that nodes that lost a peer together do not redial
/// in lockstep.
pub fn jitter(base: u64, rng: &mut impl Rng) -> u64 {
    let span = base * BREAKER_JITTER_PERCENT / 100;
    base - span + rng.random_range(0..=2 * span)
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemberState::*;
    use rand::SeedableRng;

    #[test]
    fn swim_precedence_table() {
        assert!(supersedes((Alive, 2), (Suspect, 1)));
        assert!(!supersedes((Alive, 1), (Suspect, 1)));
        assert!(supersedes((Suspect, 1), (Alive, 1)));
        assert!(!supersedes((Suspect, 1), (Alive, 2)));
        assert!(supersedes((Dead, 1), (Suspect, 1)));
        assert!(supersedes((Dead, 1), (Alive, 1)));
        assert!(!supersedes((Alive, 1), (Dead, 1)));
        assert!(!supersedes((Suspect, 1), (Dead, 1)));
        assert!(
            supersedes((Alive, 2), (Dead, 1)),
            "a higher incarnation resurrects"
        );
        assert!(supersedes((Leaving, 1), (Alive, 1)));
        assert!(supersedes((Left, 1), (Dead, 1)));
        assert!(
            !supersedes((Suspect, 1), (Suspect, 1)),
            "same report again is a confirmation, not news"
        );
    }

    #[test]
    fn suspicion_shrinks_with_confirmations() {
        assert_eq!(suspicion_timeout(4_000, 1_000, 0, 6), 4_000);
        assert_eq!(suspicion_timeout(4_000, 1_000, 1, 6), 3_000);
        assert_eq!(suspicion_timeout(4_000, 1_000, 3, 6), 1_000);
        assert_eq!(suspicion_timeout(4_000, 1_000, 9, 6), 1_000);
        assert_eq!(
            suspicion_timeout(4_000, 1_000, 1, 1),
            1_000,
            "one other member: its report suffices"
        );
        assert_eq!(suspicion_timeout(4_000, 1_000, 0, 0), 4_000);
    }

    #[test]
    fn breaker_opens_after_five_failures_and_backs_off_with_jitter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Breaker::default();
        let mut now = 0;
        let mut delays = Vec::new();
        for _ in 0..12 {
            assert!(b.ready(now));
            b.failure(now, &mut rng);
            let d = b.next_attempt - now;
            delays.push(d);
            now += d;
        }
        assert!(b.is_open());
        for d in &delays[..4] {
            assert!((160_000..=240_000).contains(d), "{d}");
        }
        assert!((800_000..=1_200_000).contains(&delays[4]), "{}", delays[4]);
        assert!(
            (1_600_000..=2_400_000).contains(&delays[5]),
            "{}",
            delays[5]
        );
        for d in &delays[9..] {
            assert!(
                (24_000_000..=36_000_000).contains(d),
                "capped at 30 s ± 20 %: {d}"
            );
        }
        assert!(delays[9..].windows(2).any(|w| w[0] != w[1]), "jittered");
        b.success();
        assert!(b.ready(now) && !b.is_open());
    }
}
