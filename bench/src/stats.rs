//! Measurement state: latency histograms (one per thread, merged at the end), per-stream
//! sequence tracking for gaps, duplicates and reordering, and error tallies.
//!
//! Never: reads clocks or sockets. Every type here is plain data that a thread fills and the
//! coordinator merges, so merging and accounting are unit-tested without a server.
//!
//! Everything merged also serialises, losslessly, so agents of a distributed run can send their
//! figures to the controller ([`crate::dist`]): histograms as HdrHistogram's V2 encoding
//! (deflated, base64 in JSON), counters as integers.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2DeflateSerializer};
use serde::{Deserialize, Serialize};

/// Highest latency a histogram tracks before it auto-resizes: one minute in nanoseconds.
const LATENCY_HIGHEST_NS: u64 = 60_000_000_000;
/// Significant figures kept: 3 gives 0.1% resolution at every magnitude.
const LATENCY_SIGFIG: u8 = 3;

/// A latency histogram in nanoseconds.
#[derive(Clone, Debug)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        let mut h = Histogram::new_with_bounds(1, LATENCY_HIGHEST_NS, LATENCY_SIGFIG)
            .expect("static bounds are valid");
        // A stall longer than a minute is still recorded rather than lost.
        h.auto(true);
        Self(h)
    }
}

impl Latency {
    /// Records one latency; zero (a clock read racing its stamp) is recorded as 1 ns.
    #[inline]
    pub fn record_ns(&mut self, ns: u64) {
        let _ = self.0.record(ns.max(1));
    }

    /// Adds every sample of `other` (another thread's histogram).
    pub fn merge(&mut self, other: &Latency) {
        self.0
            .add(&other.0)
            .expect("auto-resizing histograms always merge");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The value at quantile `q` (0..=1), nanoseconds; 0 when empty.
    pub fn value_at_quantile(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.value_at_quantile(q)
        }
    }

    /// The histogram in HdrHistogram's compressed V2 encoding, base64: what agents send and
    /// what `--json` keeps so `report` can plot whole percentile curves.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(&self.0, &mut bytes)
            .expect("serialising to memory cannot fail");
        BASE64.encode(bytes)
    }

    /// Reads what [`Latency::encode`] wrote.
    ///
    /// # Errors
    /// Not base64, or not a V2 (plain or deflated) histogram.
    pub fn decode(text: &str) -> Result<Self, String> {
        let bytes = BASE64.decode(text).map_err(|e| e.to_string())?;
        let mut h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| format!("{e:?}"))?;
        h.auto(true);
        Ok(Self(h))
    }

    /// The summary figures, in milliseconds.
    pub fn summary(&self) -> LatencySummary {
        let ms = |ns: u64| ns as f64 / 1e6;
        let empty = self.0.is_empty();
        let q = |q: f64| {
            if empty {
                0.0
            } else {
                ms(self.0.value_at_quantile(q))
            }
        };
        LatencySummary {
            count: self.0.len(),
            mean_ms: if empty { 0.0 } else { self.0.mean() / 1e6 },
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: if empty { 0.0 } else { ms(self.0.max()) },
        }
    }
}

impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::decode(&text).map_err(serde::de::Error::custom)
    }
}

/// Percentiles of a [`Latency`], milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// A histogram of plain counts (e.g. messages replayed per recovery), zero included.
#[derive(Clone, Debug)]
pub struct Counts(Histogram<u64>);

impl Default for Counts {
    fn default() -> Self {
        let mut h = Histogram::new(LATENCY_SIGFIG).expect("static bounds are valid");
        h.auto(true);
        Self(h)
    }
}

impl Counts {
    pub fn record(&mut self, n: u64) {
        let _ = self.0.record(n);
    }

    pub fn merge(&mut self, o: &Counts) {
        self.0
            .add(&o.0)
            .expect("auto-resizing histograms always merge");
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Mean, median, p99 and maximum (zeros when empty).
    pub fn summary(&self) -> (f64, u64, u64, u64) {
        if self.0.is_empty() {
            return (0.0, 0, 0, 0);
        }
        (
            self.0.mean(),
            self.0.value_at_quantile(0.5),
            self.0.value_at_quantile(0.99),
            self.0.max(),
        )
    }
}

/// What one sequence number meant for its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The next expected number, or a later one; `skipped` numbers between were not (yet) seen.
    New { skipped: u64 },
    /// A number below the highest seen, not seen before: it arrived out of order.
    Late,
    /// Seen before.
    Duplicate,
    /// Too far below the highest seen to tell whether it is new; not counted as received.
    OutOfWindow,
}

/// Sequence numbers remembered below the highest seen, to tell late from duplicate.
const SEQ_WINDOW: u64 = 4096;
const SEQ_WORDS: usize = (SEQ_WINDOW / 64) as usize;

/// Tracks one stream's sequence numbers (1, 2, 3, ... per publisher and topic).
///
/// A bitmap of the last `SEQ_WINDOW` numbers tells duplicates from late arrivals; `distinct`
/// counts numbers seen once, so at the end `expected_last - distinct` is exactly the number of
/// publications this stream never delivered (gaps inside and lost tail alike).
#[derive(Clone, Debug)]
pub struct SeqTracker {
    highest: u64,
    distinct: u64,
    /// Bit `seq % SEQ_WINDOW` is set when `seq` (within the window below `highest`) was seen.
    bits: [u64; SEQ_WORDS],
}

impl Default for SeqTracker {
    fn default() -> Self {
        Self {
            highest: 0,
            distinct: 0,
            bits: [0; SEQ_WORDS],
        }
    }
}

impl SeqTracker {
    /// Accounts for `seq` (numbers start at 1).
    pub fn observe(&mut self, seq: u64) -> Seen {
        if seq > self.highest {
            let skipped = seq - self.highest - 1;
            if skipped >= SEQ_WINDOW {
                self.bits = [0; SEQ_WORDS];
            } else {
                for s in self.highest + 1..seq {
                    self.clear(s);
                }
            }
            self.set(seq);
            self.highest = seq;
            self.distinct += 1;
            return Seen::New { skipped };
        }
        if seq == 0 || self.highest - seq >= SEQ_WINDOW {
            return Seen::OutOfWindow;
        }
        if self.is_set(seq) {
            return Seen::Duplicate;
        }
        self.set(seq);
        self.distinct += 1;
        Seen::Late
    }

    /// Distinct numbers seen.
    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    /// Numbers up to `expected_last` (the publisher's last) never seen.
    pub fn missing(&self, expected_last: u64) -> u64 {
        expected_last.max(self.highest) - self.distinct
    }

    fn slot(seq: u64) -> (usize, u64) {
        let bit = seq % SEQ_WINDOW;
        ((bit / 64) as usize, 1 << (bit % 64))
    }
    fn set(&mut self, seq: u64) {
        let (w, m) = Self::slot(seq);
        self.bits[w] |= m;
    }
    fn clear(&mut self, seq: u64) {
        let (w, m) = Self::slot(seq);
        self.bits[w] &= !m;
    }
    fn is_set(&self, seq: u64) -> bool {
        let (w, m) = Self::slot(seq);
        self.bits[w] & m != 0
    }
}

/// Delivery counters of one thread (or, merged, of the whole run).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deliveries {
    /// Benchmark messages received in the current step (duplicates included).
    pub received: u64,
    /// Received once per (subscriber, publisher, topic, seq).
    pub distinct: u64,
    pub duplicates: u64,
    /// Arrived after a higher sequence number of the same stream.
    pub reordered: u64,
    /// Jumps forward in a stream (each is one or more missing messages at the time).
    pub gap_events: u64,
    pub out_of_window: u64,
    /// Messages of an earlier step (late stragglers), not counted above.
    pub stale: u64,
    /// Messages without a parsable stamp.
    pub unparsable: u64,
    /// Messages of a topic the receiving connection did not subscribe to (a server bug).
    pub wrong_topic: u64,
    pub bytes: u64,
}

impl Deliveries {
    /// Counts one sequence observation.
    pub fn count(&mut self, seen: Seen, bytes: usize) {
        self.received += 1;
        self.bytes += bytes as u64;
        match seen {
            Seen::New { skipped } => {
                self.distinct += 1;
                if skipped > 0 {
                    self.gap_events += 1;
                }
            }
            Seen::Late => {
                self.distinct += 1;
                self.reordered += 1;
            }
            Seen::Duplicate => self.duplicates += 1,
            Seen::OutOfWindow => self.out_of_window += 1,
        }
    }

    pub fn merge(&mut self, o: &Deliveries) {
        self.received += o.received;
        self.distinct += o.distinct;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.gap_events += o.gap_events;
        self.out_of_window += o.out_of_window;
        self.stale += o.stale;
        self.unparsable += o.unparsable;
        self.wrong_topic += o.wrong_topic;
        self.bytes += o.bytes;
    }
}

/// Failures by kind (e.g. `connect:os99`, `closed:4413`, `server:AUTH_FAILED`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally(pub BTreeMap<String, u64>);

impl Tally {
    pub fn add(&mut self, kind: impl Into<String>) {
        *self.0.entry(kind.into()).or_default() += 1;
    }
    pub fn merge(&mut self, o: &Tally) {
        for (k, v) in &o.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
    /// `kind=count, ...`, or `-` when empty.
    pub fn describe(&self) -> String {
        if self.0.is_empty() {
            return "-".into();
        }
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_merge_across_threads() {
        let threads: Vec<Latency> = (0..4u64)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut h = Latency::default();
                    // Thread t records 1..=250 ms offset so the union is 1..=1000 ms.
                    for i in 1..=250u64 {
                        h.record_ns((t * 250 + i) * 1_000_000);
                    }
                    h
                })
            })
            .map(|j| j.join().unwrap())
            .collect();
        let mut all = Latency::default();
        for h in &threads {
            all.merge(h);
        }
        let s = all.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 500.0).abs() <= 1.0, "{s:?}");
        assert!((s.p99_ms - 990.0).abs() <= 1.0, "{s:?}");
        assert!((s.max_ms - 1000.0).abs() <= 1.0, "{s:?}");
        // Outliers beyond the initial bound are kept, not dropped.
        all.record_ns(2 * LATENCY_HIGHEST_NS);
        assert_eq!(all.count(), 1001);
        assert!(all.summary().max_ms >= 119_000.0);
        assert_eq!(Latency::default().summary(), LatencySummary::default());
    }

    #[test]
    fn histograms_merge_losslessly_through_serialisation() {
        // Two agents' histograms, one with an outlier past the initial bound.
        let mut a = Latency::default();
        let mut b = Latency::default();
        for i in 1..=10_000u64 {
            a.record_ns(i * 997);
            b.record_ns(i * 31_337 + 5);
        }
        b.record_ns(3 * LATENCY_HIGHEST_NS);
        let mut direct = a.clone();
        direct.merge(&b);
        // What the controller does: decode both JSON strings and merge.
        let wire = serde_json::to_string(&(&a, &b)).unwrap();
        let (a2, b2): (Latency, Latency) = serde_json::from_str(&wire).unwrap();
        let mut merged = a2;
        merged.merge(&b2);
        let buckets = |h: &Latency| {
            h.0.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect::<Vec<_>>()
        };
        assert_eq!(buckets(&merged), buckets(&direct));
        assert_eq!(merged.count(), 20_001);
        assert_eq!(merged.summary(), direct.summary());
        // The decoded histogram still grows for later outliers.
        merged.record_ns(10 * LATENCY_HIGHEST_NS);
        assert_eq!(merged.count(), 20_002);
        assert!(Latency::decode("not base64!").is_err());
        assert!(Latency::decode("AAAA").is_err());
        // Empty histograms travel too.
        let empty: Latency =
            serde_json::from_str(&serde_json::to_string(&Latency::default()).unwrap()).unwrap();
        assert_eq!(empty.count(), 0);
    }

    #[test]
    fn counters_round_trip_and_merge() {
        let mut d = Deliveries::default();
        d.count(Seen::New { skipped: 2 }, 10);
        d.count(Seen::Duplicate, 10);
        let back: Deliveries = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
        let mut total = Deliveries::default();
        total.merge(&d);
        total.merge(&back);
        assert_eq!(
            (total.received, total.distinct, total.gap_events),
            (4, 2, 2)
        );
        let mut t = Tally::default();
        t.add("closed:1000");
        let back: Tally = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }

    fn run(seqs: &[u64]) -> (SeqTracker, Deliveries) {
        let mut t = SeqTracker::default();
        let mut d = Deliveries::default();
        for &s in seqs {
            d.count(t.observe(s), 10);
        }
        (t, d)
    }

    #[test]
    fn in_order_stream_has_no_gaps() {
        let (t, d) = run(&[1, 2, 3, 4, 5]);
        assert_eq!(t.missing(5), 0);
        assert_eq!(d.distinct, 5);
        assert_eq!((d.duplicates, d.reordered, d.gap_events), (0, 0, 0));
    }

    #[test]
    fn gaps_inside_and_at_the_tail_are_missing() {
        let (t, d) = run(&[1, 2, 5, 6, 9]);
        assert_eq!(d.gap_events, 2);
        // 3, 4, 7, 8 lost inside; 10 lost at the tail (publisher sent 10).
        assert_eq!(t.missing(10), 5);
        assert_eq!(t.missing(9), 4);
        // Lost from the very start.
        let (t, _) = run(&[3, 4]);
        assert_eq!(t.missing(4), 2);
        // Nothing received at all.
        assert_eq!(SeqTracker::default().missing(7), 7);
    }

    #[test]
    fn duplicates_are_counted_once() {
        let (t, d) = run(&[1, 2, 2, 3, 1, 3]);
        assert_eq!(d.duplicates, 3);
        assert_eq!(d.distinct, 3);
        assert_eq!(t.missing(3), 0);
    }

    #[test]
    fn reordering_fills_gaps() {
        let (t, d) = run(&[1, 3, 2, 5, 4, 4]);
        assert_eq!(d.reordered, 2);
        assert_eq!(d.duplicates, 1);
        assert_eq!(d.gap_events, 2);
        assert_eq!(t.missing(5), 0);
    }

    #[test]
    fn window_edges() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe(1), Seen::New { skipped: 0 });
        assert_eq!(
            t.observe(SEQ_WINDOW * 3),
            Seen::New {
                skipped: SEQ_WINDOW * 3 - 2
            }
        );
        // Far below the window: cannot tell, not counted.
        assert_eq!(t.observe(2), Seen::OutOfWindow);
        // Just inside the window: a late arrival, then a duplicate.
        let s = SEQ_WINDOW * 3 - SEQ_WINDOW + 1;
        assert_eq!(t.observe(s), Seen::Late);
        assert_eq!(t.observe(s), Seen::Duplicate);
        // A bit reused by the ring after a short jump is cleared, not inherited.
        let mut t = SeqTracker::default();
        t.observe(5);
        t.observe(5 + SEQ_WINDOW);
        assert_eq!(
            t.observe(5 + 2 * SEQ_WINDOW - 1),
            Seen::New {
                skipped: SEQ_WINDOW - 2
            }
        );
        assert_eq!(t.observe(5 + SEQ_WINDOW + 1), Seen::Late);
        assert_eq!(t.observe(0), Seen::OutOfWindow);
    }

    #[test]
    fn counts_keep_zero_and_merge() {
        let mut a = Counts::default();
        for n in [0, 0, 5, 10] {
            a.record(n);
        }
        let mut b = Counts::default();
        b.record(1000);
        a.merge(&b);
        assert_eq!(a.len(), 5);
        let (mean, p50, _, max) = a.summary();
        assert_eq!((p50, max), (5, 1000));
        assert!((mean - 203.0).abs() < 1.0, "{mean}");
        assert_eq!(Counts::default().summary(), (0.0, 0, 0, 0));
    }

    #[test]
    fn tallies_merge() {
        let mut a = Tally::default();
        a.add("x");
        a.add("y");
        let mut b = Tally::default();
        b.add("x");
        a.merge(&b);
        assert_eq!(a.total(), 3);
        assert_eq!(a.describe(), "x=2, y=1");
    }
}
