//! The attack summary: what a shard refused, in its log, at a bounded rate.
//!
//! Owns: the kinds of refusal an operator should hear about (failed authentication, bad, slow or
//! surplus upgrades, descriptor exhaustion, evictions, rate-limit and size closes, protocol
//! violations, too-deep JSON, a full event queue), which counters each is read from, their values
//! at the last summary and when the next one is due. Never: counts (the shard's [`ShardMetrics`]
//! do, where things happen), logs (the shard writes one `warn!` per line this returns, target
//! `wse_shards::alarms`), or reads a clock.
//!
//! Why a summary: each of these is cheap for a client to cause, so a log line per occurrence
//! would let an attacker flood the log (descriptor exhaustion used to warn every 100 ms per
//! shard), and none at all left the operator with only the metrics. So every
//! `log.attack_summary_interval` each shard says, once per kind whose count moved, how many
//! happened since its last summary; a quiet shard says nothing.
//!
//! Calling order: [`AttackSummary::poll_timeout`] tells the shard when to wake;
//! [`AttackSummary::handle_timeout`] at or after it returns the lines and arms the next one.
//!
//! Beside the summary, [`LineBudget`] lets a shard log some refusals one by one (the reason and
//! the peer's address, which a count cannot say) without letting a flood of them flood the log.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::auth::AuthError;
use crate::close::CloseCode;
use crate::metrics::{DropReason, RejectReason, ShardMetrics};
use crate::protocol::JSON_DEPTH_MAX;

/// Lines per second one shard logs about individual authentication refusals (at info). Past it
/// they are counted, and the next line logged says how many were left out.
pub const AUTH_REFUSAL_LINES_PER_SEC: u32 = 10;

/// A per-second budget of log lines: at most `per_sec` lines in any one-second window from the
/// first line of that window; the rest are counted as suppressed.
#[derive(Debug)]
pub struct LineBudget {
    per_sec: u32,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LineBudget {
    /// A budget of `per_sec` lines in each one-second window.
    pub fn new(per_sec: u32) -> Self {
        Self {
            per_sec,
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged at `now`: `Some(n)` with the lines suppressed since the last
    /// one logged (to be mentioned in it), `None` when over the budget (counted).
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used >= self.per_sec {
            self.suppressed += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// One kind of refusal and where its count comes from.
struct Kind {
    /// Completes "`<count>` ...": what happened, with the limit or close code involved.
    what: &'static str,
    count: fn(&ShardMetrics) -> u64,
}

/// Every kind summarised, in the order the lines come out.
const KINDS: [Kind; 13] = [
    Kind {
        what: "connections failed authentication (closed 4401)",
        count: |m| m.auth_failures_total.get(),
    },
    Kind {
        what: "WebSocket upgrades refused as malformed (HTTP 4xx)",
        count: |m| m.rejected(RejectReason::BadHandshake).get(),
    },
    Kind {
        what: "connections dropped for not completing the upgrade within limits.handshake_timeout",
        count: |m| m.rejected(RejectReason::HandshakeTimeout).get(),
    },
    Kind {
        what: "connections refused over limits.max_pending_handshakes (HTTP 503)",
        count: |m| m.rejected(RejectReason::PendingHandshakes).get(),
    },
    Kind {
        what: "connections closed over server.max_connections (1013)",
        count: |m| m.rejected(RejectReason::MaxConnections).get(),
    },
    Kind {
        what: "accepts failed for lack of file descriptors (each pauses accepting for 100ms)",
        count: |m| m.rejected(RejectReason::FdLimit).get(),
    },
    Kind {
        what: "slow consumers evicted (4413)",
        count: |m| m.dropped(DropReason::SlowConsumer).get(),
    },
    Kind {
        what: "connections closed for rate-limit abuse (4429)",
        count: |m| m.closes(CloseCode::RateLimited.code()).get(),
    },
    Kind {
        what: "messages dropped by the rate limit",
        count: |m| m.dropped(DropReason::RateLimited).get(),
    },
    Kind {
        what: "connections closed for a message over limits.max_message_size (1009)",
        count: |m| m.closes(CloseCode::MessageTooBig.code()).get(),
    },
    Kind {
        what: "connections failed for WebSocket protocol violations (1002, 1007)",
        count: |m| {
            m.closes(CloseCode::ProtocolError.code()).get()
                + m.closes(CloseCode::InvalidPayload.code()).get()
        },
    },
    Kind {
        what: "messages refused for nesting deeper than JSON_DEPTH_MAX levels",
        count: |m| m.dropped(DropReason::JsonTooDeep).get(),
    },
    Kind {
        what: "application events dropped because the event queue was full",
        count: |m| m.dropped(DropReason::AppEventOverflow).get(),
    },
];

/// One shard's summariser.
#[derive(Debug)]
pub struct AttackSummary {
    /// The [`KINDS`] counts at the last summary.
    seen: [u64; KINDS.len()],
    /// The auth failures by reason at the last summary, in [`AuthError::ALL`] order.
    seen_auth: [u64; AuthError::ALL.len()],
    last_at: Instant,
    next_at: Instant,
}

impl AttackSummary {
    /// Starts counting from what `metrics` hold now; the first summary is due after `interval`.
    pub fn new(now: Instant, interval: Duration, metrics: &ShardMetrics) -> Self {
        let mut summary = Self {
            seen: [0; KINDS.len()],
            seen_auth: [0; AuthError::ALL.len()],
            last_at: now,
            next_at: now + interval,
        };
        summary.take(metrics, |_| {});
        summary.take_auth(metrics);
        summary
    }

    /// When the next summary is due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_at
    }

    /// At or past [`AttackSummary::poll_timeout`]: appends to `lines` one line per kind whose
    /// count moved since the last summary, and arms the next one `interval` from `now` (the
    /// interval is read each time, so a reload applies from the next summary). Before it:
    /// nothing.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        interval: Duration,
        metrics: &ShardMetrics,
        lines: &mut Vec<String>,
    ) {
        if now < self.next_at {
            return;
        }
        let since = seconds(now.saturating_duration_since(self.last_at));
        let auth = self.take_auth(metrics);
        self.take(metrics, |(i, moved)| {
            let what = KINDS[i]
                .what
                .replace("JSON_DEPTH_MAX", &JSON_DEPTH_MAX.to_string());
            let mut line = format!("{moved} {what} in the last {since}");
            if i == 0 && !auth.is_empty() {
                let _ = write!(line, ": {}", auth.join(", "));
            }
            lines.push(line);
        });
        self.last_at = now;
        self.next_at = now + interval;
    }

    /// Records the current counts, calling `moved` with (kind, increase) for each that grew.
    fn take(&mut self, metrics: &ShardMetrics, mut moved: impl FnMut((usize, u64))) {
        for (i, (kind, seen)) in KINDS.iter().zip(&mut self.seen).enumerate() {
            let now = (kind.count)(metrics);
            let grew = now.wrapping_sub(std::mem::replace(seen, now));
            if grew > 0 {
                moved((i, grew));
            }
        }
    }

    /// Records the auth failures by reason; returns `"<reason> <increase>"` for each that grew.
    fn take_auth(&mut self, metrics: &ShardMetrics) -> Vec<String> {
        let mut grown = Vec::new();
        let counters = AuthError::ALL.iter().zip(&metrics.auth_failures);
        for ((why, counter), seen) in counters.zip(&mut self.seen_auth) {
            let now = counter.get();
            let grew = now.wrapping_sub(std::mem::replace(seen, now));
            if grew > 0 {
                grown.push(format!("{why} {grew}"));
            }
        }
        grown
    }
}

/// `10s`, `1.5s`, `0.25s`: the interval as the line states it.
fn seconds(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        let text = format!("{:.3}", d.as_secs_f64());
        format!("{}s", text.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_budget_admits_per_second_and_reports_what_it_left_out() {
        let t0 = Instant::now();
        let mut b = LineBudget::new(2);
        assert_eq!(b.admit(t0), Some(0));
        assert_eq!(b.admit(t0), Some(0));
        assert_eq!(b.admit(t0 + Duration::from_millis(500)), None);
        assert_eq!(b.admit(t0 + Duration::from_millis(999)), None);
        assert_eq!(b.admit(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(b.admit(t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(b.admit(t0 + Duration::from_secs(1)), None);
    }

    const SECOND: Duration = Duration::from_secs(1);

    fn summary_at(s: &mut AttackSummary, now: Instant, m: &ShardMetrics) -> Vec<String> {
        let mut lines = Vec::new();
        s.handle_timeout(now, 10 * SECOND, m, &mut lines);
        lines
    }

    #[test]
    fn one_line_per_kind_that_moved_once_per_interval() {
        let t0 = Instant::now();
        let m = ShardMetrics::default();
        // What happened before the summariser started is not reported.
        m.auth_failed(&AuthError::Expired);
        let mut s = AttackSummary::new(t0, 10 * SECOND, &m);
        assert_eq!(s.poll_timeout(), t0 + 10 * SECOND);

        for _ in 0..1200 {
            m.auth_failed(&AuthError::BadSignature);
        }
        m.auth_failed(&AuthError::Expired);
        for _ in 0..100 {
            m.rejected(RejectReason::FdLimit).inc();
        }
        m.closed_with(4429);
        m.closed_with(1002);
        m.closed_with(1007);
        m.closed_with(1000); // a normal close: not an alarm
        m.dropped(DropReason::JsonTooDeep).inc();

        assert!(
            summary_at(&mut s, t0 + 9 * SECOND, &m).is_empty(),
            "not due"
        );
        let lines = summary_at(&mut s, t0 + 10 * SECOND, &m);
        assert_eq!(
            lines,
            [
                "1201 connections failed authentication (closed 4401) in the last 10s: \
                 invalid signature 1200, token expired 1",
                "100 accepts failed for lack of file descriptors (each pauses accepting for \
                 100ms) in the last 10s",
                "1 connections closed for rate-limit abuse (4429) in the last 10s",
                "2 connections failed for WebSocket protocol violations (1002, 1007) in the \
                 last 10s",
                "1 messages refused for nesting deeper than 64 levels in the last 10s",
            ]
        );
        assert_eq!(s.poll_timeout(), t0 + 20 * SECOND);

        // Quiet: nothing said. Then only what moved since.
        assert!(summary_at(&mut s, t0 + 20 * SECOND, &m).is_empty());
        m.rejected(RejectReason::FdLimit).inc();
        m.dropped(DropReason::SlowConsumer).add(3);
        let lines = summary_at(&mut s, t0 + 31 * SECOND, &m);
        assert_eq!(
            lines,
            [
                "1 accepts failed for lack of file descriptors (each pauses accepting for \
                 100ms) in the last 11s",
                "3 slow consumers evicted (4413) in the last 11s",
            ]
        );
    }

    #[test]
    fn every_kind_has_a_line() {
        let t0 = Instant::now();
        let m = ShardMetrics::default();
        let mut s = AttackSummary::new(t0, SECOND, &m);
        m.auth_failed(&AuthError::Missing);
        for r in RejectReason::ALL {
            m.rejected(r).inc();
        }
        for r in DropReason::ALL {
            m.dropped(r).inc();
        }
        for code in [4429, 1009, 1002] {
            m.closed_with(code);
        }
        let mut lines = Vec::new();
        s.handle_timeout(t0 + SECOND, SECOND, &m, &mut lines);
        assert_eq!(lines.len(), KINDS.len(), "{lines:#?}");
        assert!(lines[0].ends_with("in the last 1s: authentication required 1"));
    }

    #[test]
    fn seconds_are_short() {
        assert_eq!(seconds(10 * SECOND), "10s");
        assert_eq!(seconds(Duration::from_millis(1500)), "1.5s");
        assert_eq!(seconds(Duration::from_millis(250)), "0.25s");
    }
}
