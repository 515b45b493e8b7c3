//! The `--rate max` search: the highest publication rate a server sustains with zero gaps and a
//! p99 latency under the bound, found by doubling from a start rate until a step fails, then
//! bisecting between the best pass and the lowest failure.
//!
//! Never: runs anything. The fan-out scenario asks [`RateSearch::next_rate`], runs a short
//! measured step at that rate and reports the verdict with [`RateSearch::record`].

/// State of one search.
#[derive(Clone, Debug)]
pub struct RateSearch {
    /// Highest rate that passed.
    pass: Option<u64>,
    /// Lowest rate that failed.
    fail: Option<u64>,
    /// Rate of the step to run next; `None` when the search is over.
    next: Option<u64>,
    steps_left: u32,
    ceiling: u64,
    /// Stop bisecting once `fail - pass <= pass * precision`.
    precision: f64,
}

impl RateSearch {
    /// A search starting at `start` publications/s, never above `ceiling`, running at most
    /// `max_steps` steps and stopping when the bracket is within `precision` (e.g. 0.1 = 10 %).
    pub fn new(start: u64, ceiling: u64, max_steps: u32, precision: f64) -> Self {
        let start = start.clamp(1, ceiling.max(1));
        Self {
            pass: None,
            fail: None,
            next: (max_steps > 0).then_some(start),
            steps_left: max_steps,
            ceiling: ceiling.max(1),
            precision,
        }
    }

    /// The rate of the next step, or `None` when done.
    pub fn next_rate(&self) -> Option<u64> {
        self.next
    }

    /// The highest rate that passed so far.
    pub fn best(&self) -> Option<u64> {
        self.pass
    }

    /// Records the verdict of a step at `rate` and chooses the next rate.
    pub fn record(&mut self, rate: u64, passed: bool) {
        if passed {
            self.pass = Some(self.pass.map_or(rate, |p| p.max(rate)));
        } else {
            self.fail = Some(self.fail.map_or(rate, |f| f.min(rate)));
        }
        self.steps_left = self.steps_left.saturating_sub(1);
        self.next = if self.steps_left == 0 {
            None
        } else {
            self.choose()
        };
    }

    fn choose(&self) -> Option<u64> {
        match (self.pass, self.fail) {
            // Still climbing: double, up to the ceiling once.
            (Some(p), None) => (p < self.ceiling).then(|| p.saturating_mul(2).min(self.ceiling)),
            // Even the start failed: halve until something passes.
            (None, Some(f)) => (f > 1).then_some(f / 2),
            (Some(p), Some(f)) => {
                if f <= p || (f - p) as f64 <= p as f64 * self.precision || f - p <= 1 {
                    None
                } else {
                    Some(p + (f - p) / 2)
                }
            }
            (None, None) => self.next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the search against a server that sustains exactly `capacity`.
    fn search(start: u64, capacity: u64, ceiling: u64, steps: u32) -> (Option<u64>, Vec<u64>) {
        let mut s = RateSearch::new(start, ceiling, steps, 0.05);
        let mut tried = Vec::new();
        while let Some(rate) = s.next_rate() {
            tried.push(rate);
            s.record(rate, rate <= capacity);
        }
        (s.best(), tried)
    }

    #[test]
    fn doubles_then_bisects() {
        let (best, tried) = search(1000, 5000, 1_000_000, 20);
        assert_eq!(&tried[..4], &[1000, 2000, 4000, 8000]);
        assert_eq!(tried[4], 6000);
        let best = best.unwrap();
        assert!(
            best <= 5000 && best as f64 >= 5000.0 * 0.95,
            "{best} {tried:?}"
        );
    }

    #[test]
    fn halves_when_the_start_fails() {
        let (best, tried) = search(1000, 300, 1_000_000, 20);
        assert_eq!(&tried[..3], &[1000, 500, 250]);
        let best = best.unwrap();
        assert!((285..=300).contains(&best), "{best} {tried:?}");
    }

    #[test]
    fn stops_at_the_ceiling_and_the_step_budget() {
        let (best, tried) = search(1000, u64::MAX, 3000, 20);
        assert_eq!(tried, vec![1000, 2000, 3000]);
        assert_eq!(best, Some(3000));
        let (_, tried) = search(1000, 5000, 1_000_000, 3);
        assert_eq!(tried.len(), 3);
        let (best, tried) = search(1000, 0, 1_000_000, 40);
        assert_eq!(best, None);
        assert_eq!(*tried.last().unwrap(), 1);
        assert!(RateSearch::new(10, 100, 0, 0.1).next_rate().is_none());
    }
}
