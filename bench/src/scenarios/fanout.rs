//! `fanout`: S subscriber connections over T topics (S/T each) and P publisher connections
//! publishing P-byte messages at a fixed open-loop rate R (publications/s, all publishers
//! together), or `--rate max`: the highest rate with zero gaps and p99 under `--p99-max`.
//!
//! Honesty rules:
//! - Every publication carries its *scheduled* send time ([`wire::Stamp`]). Publication `g` of
//!   a step is due at `start + g/R`; a publisher that falls behind sends late but keeps the
//!   stamp, so the delay shows as latency, never as a quietly lower rate.
//! - Publishers run on threads of their own with blocking sockets and precise sleeps, sending
//!   everything that is due in one write per wake-up; their lateness (wake-up time minus due
//!   time) is reported as `publisher_lag_*` so the load generator's share of latency is visible.
//! - Gaps are counted per (subscriber, publisher, topic) from sequence numbers, against what the
//!   publishers report they sent: a publication some subscriber never got within `--drain` after
//!   the step is a gap, wherever it was lost.
//! - Each step (warm-up, measurement, each search step) has its own id in the stamp; messages of
//!   another step are counted as `other_step`, never mixed in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::{
    LoadCpu, Phase, Progress, Setup, Shared, join_all, open_planned, parse_duration, reached,
    ser_duration, sleep_with_progress, spawn_workers, stop_requested, wait_until,
};
use crate::clock;
use crate::conn::{BlockingWriter, Conn, ConnError, is_type};
use crate::report::Report;
use crate::search::RateSearch;
use crate::stats::{Deliveries, Latency, LatencySummary, Seen, SeqTracker, Tally};
use crate::wire::{self, Stamp};

/// Subscriber read buffer: large enough to take many deliveries per read.
const SUB_READ_BUF: usize = 16 * 1024;
/// Most frames a publisher coalesces into one write.
const PUBLISH_BATCH_MAX: usize = 512;
/// Lead time between planning a step and its first publication, so every publisher is waiting.
const STEP_LEAD: Duration = Duration::from_millis(50);
/// Sleeps shorter than this are not worth a syscall: the publisher sends a little early.
const SLEEP_MIN: Duration = Duration::from_micros(20);
/// How long after a step's end to wait for a publisher's report before giving up on it.
const PUBLISHER_REPORT_GRACE: Duration = Duration::from_secs(30);
/// Precision at which `--rate max` stops bisecting (10 %).
const SEARCH_PRECISION: f64 = 0.1;

#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct FanoutArgs {
    /// Subscriber connections (S).
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Topics (T); subscriber i takes topic i mod T.
    #[arg(long, default_value_t = 10)]
    pub topics: usize,
    /// Publisher connections (P). Both servers rate-limit each connection's inbound messages
    /// (10 000/s refill by default): use more publishers for higher rates.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Size of each publication's data object, bytes (approximate).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Publications per second (all publishers together), or `max` to search.
    #[arg(long, default_value = "1000")]
    pub rate: RateArg,
    /// Measured time (fixed rate).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
    /// Unmeasured time at the same rate before each measured run or search step.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    #[serde(serialize_with = "ser_duration")]
    pub warmup: Duration,
    /// How long to wait after a step for deliveries still in flight.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    #[serde(serialize_with = "ser_duration")]
    pub drain: Duration,
    /// `--rate max`: a step passes with zero gaps/duplicates/closes and p99 under this.
    #[arg(long, value_parser = parse_duration, default_value = "50ms")]
    #[serde(serialize_with = "ser_duration")]
    pub p99_max: Duration,
    /// `--rate max`: measured time of each search step.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    #[serde(serialize_with = "ser_duration")]
    pub step_duration: Duration,
    /// `--rate max`: first rate tried.
    #[arg(long, default_value_t = 1000)]
    pub rate_start: u64,
    /// `--rate max`: never try above this.
    #[arg(long, default_value_t = 1_000_000)]
    pub rate_ceiling: u64,
    /// `--rate max`: most search steps.
    #[arg(long, default_value_t = 10)]
    pub max_steps: u32,
}

/// `--rate`: a number or `max`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum RateArg {
    Fixed(f64),
    Max,
}

impl std::str::FromStr for RateArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(RateArg::Max);
        }
        match s.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Ok(RateArg::Fixed(r)),
            _ => Err(format!(
                "{s:?}: a positive number of publications/s, or max"
            )),
        }
    }
}

/// One subscriber thread's figures for the current step; the coordinator takes them at the
/// end of each step. Locked once per socket read by the thread, once per poll by the
/// coordinator.
#[derive(Default)]
struct SubStats {
    /// Messages stamped with another step are not counted below.
    step: u32,
    latency: Latency,
    deliveries: Deliveries,
    /// Connection failures, over the whole run.
    failures: Tally,
}

/// What subscriber threads and the coordinator share beyond [`Shared`].
struct Subs {
    stats: Vec<Mutex<SubStats>>,
    /// Live subscribers per topic: the multiplier of each publication in expected deliveries.
    per_topic: Vec<AtomicU64>,
}

impl Subs {
    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, SubStats> {
        self.stats[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn distinct(&self) -> u64 {
        (0..self.stats.len())
            .map(|i| self.lock(i).deliveries.distinct)
            .sum()
    }
}

/// A publisher's instruction: publish `step` at `rate` (all publishers together) from
/// `start_ns` to `end_ns` on the shared clock.
#[derive(Clone, Copy, Debug)]
pub(super) struct StepCmd {
    pub step: u32,
    pub rate: f64,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// A publisher's account of one [`StepCmd`].
#[derive(Debug, Default)]
pub(super) struct StepDone {
    /// Publications sent, per topic (each topic's last sequence number).
    pub sent: Vec<u64>,
    /// Wake-up lateness against the schedule, per batch.
    pub lag: Latency,
    pub failure: Option<String>,
}

/// One publisher thread as the coordinator sees it. Dropping `cmds` ends it.
pub(super) struct Publisher {
    pub cmds: mpsc::Sender<StepCmd>,
    pub done: mpsc::Receiver<StepDone>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Figures of one measured step.
#[derive(Debug, Default)]
struct StepResult {
    rate: f64,
    measured_s: f64,
    publications: u64,
    expected: u64,
    deliveries: Deliveries,
    latency: LatencySummary,
    publisher_lag: LatencySummary,
    publisher_errors: Tally,
    subscriber_closes: u64,
    server_cpu: Option<(f64, f64)>,
    loadgen: (f64, f64),
    complete: bool,
}

impl StepResult {
    fn gaps(&self) -> u64 {
        self.expected.saturating_sub(self.deliveries.distinct)
    }

    fn passed(&self, p99_max: Duration) -> bool {
        self.complete
            && self.gaps() == 0
            && self.deliveries.duplicates == 0
            && self.deliveries.wrong_topic == 0
            && self.subscriber_closes == 0
            && self.publisher_errors.total() == 0
            && self.latency.p99_ms <= p99_max.as_secs_f64() * 1e3
    }

    /// The figures, in display order.
    fn figures(&self) -> IndexMap<String, Value> {
        let mut r = Report::new("step", crate::sys::Environment::read(0));
        let d = &self.deliveries;
        r.set("rate_target_per_s", self.rate);
        r.set("measured_s", self.measured_s);
        r.set("publications", self.publications);
        r.set(
            "publications_per_s",
            self.publications as f64 / self.measured_s,
        );
        r.set("deliveries", d.distinct);
        r.set("deliveries_per_s", d.distinct as f64 / self.measured_s);
        r.set("deliveries_expected", self.expected);
        r.set("gaps", self.gaps());
        r.set("gap_events", d.gap_events);
        r.set("duplicates", d.duplicates);
        r.set("reordered", d.reordered);
        r.set("other_step", d.stale);
        r.set("unparsable", d.unparsable);
        r.set("wrong_topic", d.wrong_topic);
        r.set("delivered_mb_per_s", d.bytes as f64 / self.measured_s / 1e6);
        r.latency("latency", &self.latency);
        r.set("publisher_lag_p99_ms", self.publisher_lag.p99_ms);
        r.set("publisher_lag_max_ms", self.publisher_lag.max_ms);
        r.set("publisher_errors", self.publisher_errors.total());
        r.set("subscriber_closes", self.subscriber_closes);
        if let Some((cpu, wall)) = self.server_cpu {
            r.set("server_cpu_cores", cpu / wall.max(1e-9));
            if d.distinct > 0 {
                r.set(
                    "server_cpu_s_per_million_deliveries",
                    cpu / (d.distinct as f64 / 1e6),
                );
            }
        }
        r.set("loadgen_cpu_cores", self.loadgen.0);
        r.set("loadgen_busiest_thread_util", self.loadgen.1);
        r.results
    }
}

/// Runs the scenario and returns its report.
pub fn run(setup: &Setup, args: &FanoutArgs) -> Report {
    let topic_names = (0..args.topics.max(1)).map(topic_name).collect();
    run_with(setup, args, "fanout", |setup, tids| {
        start_publishers(setup, args.publishers, topic_names, args.size, tids)
    })
}

/// The scenario with the publishers `publishers` starts (given the setup and the list the
/// load generator's thread ids go to): `fanout`'s publisher connections, or the `floor`'s
/// sender. Reported as `scenario`.
pub(super) fn run_with(
    setup: &Setup,
    args: &FanoutArgs,
    scenario: &'static str,
    publishers: impl FnOnce(&Setup, &Arc<Mutex<Vec<u32>>>) -> Vec<Result<Publisher, String>>,
) -> Report {
    let mut report = setup.report(scenario, args);
    if !setup.local_only(
        scenario,
        "latency is measured against one process's monotonic clock",
        &mut report,
    ) {
        return report;
    }
    let (s, t, p) = (args.subscribers, args.topics.max(1), args.publishers.max(1));
    setup.check_nofile(s + p, &mut report);
    let subs = Arc::new(Subs {
        stats: (0..setup.threads).map(|_| Mutex::default()).collect(),
        per_topic: (0..t).map(|_| AtomicU64::new(0)).collect(),
    });
    let shared = setup.shared(setup.plans(s, "sub"));
    let tids = Arc::new(Mutex::new(Vec::new()));
    let workers = {
        let (shared, subs) = (shared.clone(), subs.clone());
        spawn_workers(setup.threads, "sub", &tids, move |i| {
            subscriber_thread(shared.clone(), subs.clone(), t, i)
        })
    };
    let publishers = publishers(setup, &tids);
    let prog = &shared.progress;
    let mut complete = wait_until(
        setup,
        Instant::now() + setup.common.open_timeout,
        || Progress::get(&prog.ready) + Progress::get(&prog.failed) >= s as u64,
        || shared.progress_line(s),
    );
    let ready = Progress::get(&prog.ready);
    report.set("subscribers_ready", ready);
    let publishers: Vec<Publisher> = publishers
        .into_iter()
        .filter_map(|p| match p {
            Ok(p) => Some(p),
            Err(e) => {
                report.note(format!("publisher failed to connect: {e}"));
                None
            }
        })
        .collect();
    report.set("publishers_ready", publishers.len());
    if publishers.is_empty() || ready == 0 {
        report.note("nothing to measure: no publisher or no subscriber connected");
        complete = false;
    } else {
        shared.set_phase(Phase::Measure);
        let tids = tids.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut run = StepRunner {
            setup,
            args,
            shared: &shared,
            subs: &subs,
            publishers: &publishers,
            tids: &tids,
            next_step: 1,
        };
        complete &= match args.rate {
            RateArg::Fixed(rate) => run.fixed(rate, &mut report),
            RateArg::Max => run.search(&mut report),
        };
    }
    shared.set_phase(Phase::Stop);
    for p in publishers {
        drop(p.cmds);
        let _ = p.thread.join();
    }
    join_all(workers);
    let failures = (0..subs.stats.len()).fold(Tally::default(), |mut all, i| {
        all.merge(&subs.lock(i).failures);
        all
    });
    report.set("subscriber_failures", failures.total());
    if failures.total() > 0 {
        report.note(format!(
            "subscriber connection failures: {}",
            failures.describe()
        ));
    }
    report.partial |= !complete;
    report
}

/// Drives publishers and subscribers through measured steps.
struct StepRunner<'a> {
    setup: &'a Setup,
    args: &'a FanoutArgs,
    shared: &'a Shared,
    subs: &'a Subs,
    publishers: &'a [Publisher],
    tids: &'a [u32],
    next_step: u32,
}

impl StepRunner<'_> {
    /// One warm-up and one measured run at `rate`; the step's figures become the results.
    fn fixed(&mut self, rate: f64, report: &mut Report) -> bool {
        let result = self.step(rate, self.args.duration);
        report.results.extend(result.figures());
        self.note_errors(&result, report);
        result.complete
    }

    /// The `--rate max` search; the best passing step's figures become the results.
    fn search(&mut self, report: &mut Report) -> bool {
        let a = self.args;
        let mut search =
            RateSearch::new(a.rate_start, a.rate_ceiling, a.max_steps, SEARCH_PRECISION);
        let mut best: Option<StepResult> = None;
        let mut complete = true;
        while let Some(rate) = search.next_rate() {
            let result = self.step(rate as f64, a.step_duration);
            let passed = result.passed(a.p99_max);
            self.setup.log(&format!(
                "step at {rate}/s: {} (deliveries/s {:.0}, p99 {:.2} ms, gaps {}, closes {}, publisher errors {})",
                if passed { "PASS" } else { "FAIL" },
                result.deliveries.distinct as f64 / result.measured_s,
                result.latency.p99_ms,
                result.gaps(),
                result.subscriber_closes,
                result.publisher_errors.total(),
            ));
            let mut figures = IndexMap::new();
            figures.insert("passed".to_owned(), Value::from(passed));
            figures.extend(result.figures());
            report.steps.push(figures);
            if !result.complete {
                complete = false;
                break;
            }
            search.record(rate, passed);
            self.note_errors(&result, report);
            if passed {
                best = Some(result);
            }
        }
        report.set("max_rate_per_s", search.best().unwrap_or(0));
        report.set("p99_max_ms", a.p99_max.as_secs_f64() * 1e3);
        match best {
            Some(b) => report.results.extend(b.figures()),
            None => report.note(
                "no step passed: even the lowest rate tried had gaps or a p99 over --p99-max",
            ),
        }
        complete
    }

    fn note_errors(&self, r: &StepResult, report: &mut Report) {
        if r.loadgen.1 > 0.9 {
            report.note(format!(
                "at {}/s the busiest load-generator thread used {:.0}% of a core: the client may \
                 be the bottleneck (add --threads or cores)",
                r.rate,
                r.loadgen.1 * 100.0
            ));
        }
        if r.publisher_errors.total() > 0 {
            report.note(format!(
                "at {}/s publishers got errors: {} (rate limits are per connection: try more --publishers)",
                r.rate,
                r.publisher_errors.describe()
            ));
        }
        if r.subscriber_closes > 0 {
            report.note(format!(
                "at {}/s {} subscribers were closed by the server",
                r.rate, r.subscriber_closes
            ));
        }
    }

    /// Runs `warmup` (unmeasured) then `duration` (measured) at `rate`, waits for the
    /// deliveries still in flight, and collects the figures.
    fn step(&mut self, rate: f64, duration: Duration) -> StepResult {
        let (warm_step, step) = (self.next_step, self.next_step + 1);
        self.next_step += 2;
        // Subscribers count only the measured step from now on; warm-up messages are `other_step`.
        for i in 0..self.subs.stats.len() {
            let mut s = self.subs.lock(i);
            s.step = step;
            s.latency = Latency::default();
            s.deliveries = Deliveries::default();
        }
        let start_ns = clock::now_ns() + STEP_LEAD.as_nanos() as u64;
        let measure_ns = start_ns + self.args.warmup.as_nanos() as u64;
        let end_ns = measure_ns + duration.as_nanos() as u64;
        for p in self.publishers {
            let warm = StepCmd {
                step: warm_step,
                rate,
                start_ns,
                end_ns: measure_ns,
            };
            let measured = StepCmd {
                step,
                rate,
                start_ns: measure_ns,
                end_ns,
            };
            let _ = p.cmds.send(warm);
            let _ = p.cmds.send(measured);
        }
        let closes_before = Progress::get(&self.shared.progress.closed);
        let progress = || {
            format!(
                "step at {rate}/s: {} deliveries received",
                Progress::get(&self.shared.progress.messages)
            )
        };
        let mut complete = sleep_until_ns(self.setup, measure_ns, progress);
        let server_before = self.setup.server_sample();
        let cpu = LoadCpu::start(self.tids);
        let window = Instant::now();
        complete &= sleep_until_ns(self.setup, end_ns, progress);
        // On Ctrl-C the publishers stop here too: rates are over the time actually measured.
        let measured_s =
            (clock::now_ns().min(end_ns).saturating_sub(measure_ns) as f64 / 1e9).max(1e-3);
        // Publisher reports: the warm-up one is only waited for; the measured one counts.
        let mut sent = vec![0u64; self.args.topics.max(1)];
        let mut lag = Latency::default();
        let mut publisher_errors = Tally::default();
        for p in self.publishers {
            for which in [warm_step, step] {
                match p.done.recv_timeout(PUBLISHER_REPORT_GRACE) {
                    Ok(done) => {
                        if let Some(f) = &done.failure {
                            publisher_errors.add(f.clone());
                        }
                        if which == step {
                            for (t, n) in done.sent.iter().enumerate() {
                                sent[t] += n;
                            }
                            lag.merge(&done.lag);
                        }
                    }
                    Err(_) => {
                        publisher_errors.add("no report");
                        complete = false;
                    }
                }
            }
        }
        let expected: u64 = sent
            .iter()
            .zip(&self.subs.per_topic)
            .map(|(n, subs)| n * subs.load(Ordering::Relaxed))
            .sum();
        let subs = self.subs;
        let drained = wait_until(
            self.setup,
            Instant::now() + self.args.drain,
            || subs.distinct() >= expected,
            || format!("draining: {} of {expected} deliveries", subs.distinct()),
        );
        complete &= drained || !stop_requested();
        let wall = window.elapsed().as_secs_f64();
        let server_after = self.setup.server_sample();
        let mut loadgen = cpu.measure();
        if !self.setup.server_tids.is_empty()
            && let Some((b, a)) = server_before.zip(server_after)
        {
            // The floor's sender runs in this process: its share is the server's, not ours.
            loadgen.0 = (loadgen.0 - (a.cpu_s - b.cpu_s) / wall.max(1e-9)).max(0.0);
        }
        let mut latency = Latency::default();
        let mut deliveries = Deliveries::default();
        for i in 0..subs.stats.len() {
            let mut s = subs.lock(i);
            latency.merge(&s.latency);
            deliveries.merge(&s.deliveries);
            s.step = 0;
        }
        StepResult {
            rate,
            measured_s,
            publications: sent.iter().sum(),
            expected,
            deliveries,
            latency: latency.summary(),
            publisher_lag: lag.summary(),
            publisher_errors,
            subscriber_closes: Progress::get(&self.shared.progress.closed) - closes_before,
            server_cpu: server_before
                .zip(server_after)
                .map(|(b, a)| (a.cpu_s - b.cpu_s, wall)),
            loadgen,
            complete: complete && !stop_requested(),
        }
    }
}

/// Sleeps until `ns` on the shared clock unless Ctrl-C, with progress lines; returns whether
/// it got there.
pub(super) fn sleep_until_ns(setup: &Setup, ns: u64, progress: impl Fn() -> String) -> bool {
    let d = Duration::from_nanos(ns.saturating_sub(clock::now_ns()));
    sleep_with_progress(setup, d, progress)
}

// ------------------------------------------------------------------------------------------------
// Subscribers
// ------------------------------------------------------------------------------------------------

async fn subscriber_thread(shared: Arc<Shared>, subs: Arc<Subs>, topics: usize, i: usize) {
    let plans = shared.take_plans(i);
    let permits = std::rc::Rc::new(Semaphore::new(shared.inflight));
    for plan in plans {
        let (shared, subs, permits) = (shared.clone(), subs.clone(), permits.clone());
        tokio::task::spawn_local(async move {
            let topic = plan.index % topics;
            let mut phase = shared.phase.subscribe();
            let conn = async {
                let (mut conn, _, _permit) =
                    open_planned(&plan, &shared, &permits, SUB_READ_BUF).await?;
                tokio::time::timeout(shared.connect_timeout, conn.subscribe(&[topic_name(topic)]))
                    .await
                    .unwrap_or(Err(ConnError::Timeout("subscribe")))?;
                Ok::<_, ConnError>(conn)
            };
            let conn = match conn.await {
                Ok(c) => c,
                Err(e) => {
                    subs.lock(i).failures.add(e.kind());
                    Progress::add(&shared.progress.failed, 1);
                    return;
                }
            };
            subs.per_topic[topic].fetch_add(1, Ordering::Relaxed);
            Progress::add(&shared.progress.ready, 1);
            let why = tokio::select! {
                e = receive(conn, topic as u32, &subs, i, &shared) => Some(e),
                () = reached(&mut phase, Phase::Stop) => None,
            };
            if let Some(e) = why {
                subs.per_topic[topic].fetch_sub(1, Ordering::Relaxed);
                subs.lock(i).failures.add(e.kind());
                Progress::add(&shared.progress.closed, 1);
            }
        });
    }
    let mut phase = shared.phase.subscribe();
    reached(&mut phase, Phase::Stop).await;
}

/// Receives until the connection fails. Per socket read: scan each message for its stamp
/// (no allocation), read the clock once, lock the thread's stats once.
async fn receive(
    mut conn: Conn,
    topic: u32,
    subs: &Subs,
    thread: usize,
    shared: &Shared,
) -> ConnError {
    // One stream per publisher (and topic): few, so a linear scan beats hashing.
    let mut trackers: Vec<((u32, u32), SeqTracker)> = Vec::new();
    let mut tracker_step = 0u32;
    let mut batch: Vec<(Stamp, usize)> = Vec::with_capacity(64);
    let mut unparsable = 0u64;
    loop {
        let result = conn
            .recv(|m| match wire::parse_stamp(m) {
                Some(stamp) => batch.push((stamp, m.len())),
                None if is_type(m, wire::BENCH_EVENT.as_bytes()) => unparsable += 1,
                None => {}
            })
            .await;
        if conn.queued() > 0
            && let Err(e) = conn.flush().await
        {
            return e.into();
        }
        if !batch.is_empty() || unparsable > 0 {
            let n = batch.len() as u64;
            let now = clock::now_ns();
            let mut s = subs.lock(thread);
            s.deliveries.unparsable += std::mem::take(&mut unparsable);
            if tracker_step != s.step {
                trackers.clear();
                tracker_step = s.step;
            }
            for (stamp, len) in batch.drain(..) {
                if stamp.step != s.step {
                    s.deliveries.stale += 1;
                    continue;
                }
                if stamp.topic != topic {
                    s.deliveries.wrong_topic += 1;
                    continue;
                }
                let key = (stamp.publisher, stamp.topic);
                let i = match trackers.iter().position(|(k, _)| *k == key) {
                    Some(i) => i,
                    None => {
                        trackers.push((key, SeqTracker::default()));
                        trackers.len() - 1
                    }
                };
                let seen = trackers[i].1.observe(stamp.seq);
                s.deliveries.count(seen, len);
                if matches!(seen, Seen::New { .. } | Seen::Late) {
                    s.latency.record_ns(now.saturating_sub(stamp.scheduled_ns));
                }
            }
            drop(s);
            Progress::add(&shared.progress.messages, n);
        }
        if let Err(e) = result {
            return e;
        }
    }
}

fn topic_name(t: usize) -> String {
    format!("bench.{t}")
}

// ------------------------------------------------------------------------------------------------
// Publishers
// ------------------------------------------------------------------------------------------------

/// Starts `p` publisher threads over `topic_names` (publication `g` goes to topic `g mod T`)
/// with `size`-byte payloads; each connects and then waits for step commands.
pub(super) fn start_publishers(
    setup: &Setup,
    p: usize,
    topic_names: Vec<String>,
    size: usize,
    tids: &Arc<Mutex<Vec<u32>>>,
) -> Vec<Result<Publisher, String>> {
    let p = p.max(1);
    let token: Arc<str> = setup.token(super::PUBLISHER_SUB, true).into();
    let handles: Vec<_> = (0..p)
        .map(|j| {
            let (cmd_tx, cmd_rx) = mpsc::channel::<StepCmd>();
            let (done_tx, done_rx) = mpsc::channel::<StepDone>();
            let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
            // Publishers use the URLs and sources in reverse order from the subscribers'
            // start, so with several targets they spread too.
            let endpoint = setup.wse_endpoint(usize::MAX - j);
            let (token, tids) = (token.clone(), tids.clone());
            let job = PublisherJob {
                index: j as u32,
                publishers: p as u32,
                topics: topic_names.len(),
                topic_names: topic_names.clone(),
                pad: wire::padding(size),
                connect_timeout: setup.common.connect_timeout,
                hello: !setup.common.no_hello,
            };
            let thread = std::thread::Builder::new()
                .name(format!("pub-{j}"))
                .spawn(move || {
                    if let Some(tid) = crate::sys::current_tid() {
                        tids.lock().unwrap_or_else(|e| e.into_inner()).push(tid);
                    }
                    job.run(&endpoint, &token, &ready_tx, &cmd_rx, &done_tx);
                })
                .expect("spawning a publisher thread");
            (cmd_tx, done_rx, ready_rx, thread)
        })
        .collect();
    handles
        .into_iter()
        .map(|(cmds, done, ready, thread)| {
            match ready
                .recv()
                .unwrap_or_else(|_| Err("publisher thread died".into()))
            {
                Ok(()) => Ok(Publisher { cmds, done, thread }),
                Err(e) => {
                    let _ = thread.join();
                    Err(e)
                }
            }
        })
        .collect()
}

/// What one publisher thread needs.
struct PublisherJob {
    index: u32,
    publishers: u32,
    topics: usize,
    /// Topic names, built once: publishing allocates nothing per message.
    topic_names: Vec<String>,
    pad: String,
    connect_timeout: Duration,
    hello: bool,
}

impl PublisherJob {
    fn run(
        &self,
        endpoint: &crate::conn::Endpoint,
        token: &str,
        ready: &mpsc::Sender<Result<(), String>>,
        cmds: &mpsc::Receiver<StepCmd>,
        done: &mpsc::Sender<StepDone>,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let opened = rt.block_on(async {
            let mut conn = Conn::open(endpoint, token, 4096, self.connect_timeout).await?;
            if self.hello {
                tokio::time::timeout(self.connect_timeout, conn.hello())
                    .await
                    .unwrap_or(Err(ConnError::Timeout("hello")))?;
            }
            conn.into_blocking().map_err(ConnError::Io)
        });
        let (mut writer, reader) = match opened {
            Ok(halves) => halves,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        // The reader notes errors the server sends back (RATE_LIMITED, FORBIDDEN, ...) and how
        // the connection ended; each step report carries what it saw since the last one.
        let errors: Arc<Mutex<Tally>> = Arc::default();
        let reader_errors = errors.clone();
        let reader_thread = std::thread::Builder::new()
            .name(format!("pub-{}-rx", self.index))
            .spawn(move || {
                let end = reader.run(|m| {
                    if is_type(m, b"error") || is_type(m, b"publish_error") {
                        let code = wire::str_field(m, "code").unwrap_or(b"publish_error");
                        reader_errors
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .add(String::from_utf8_lossy(code));
                    }
                });
                reader_errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .add(format!("publisher connection ended: {}", end.kind()));
            })
            .expect("spawning a publisher reader");
        let _ = ready.send(Ok(()));
        while let Ok(cmd) = cmds.recv() {
            let mut report = self.publish(&mut writer, cmd);
            let seen = std::mem::take(&mut *errors.lock().unwrap_or_else(|e| e.into_inner()));
            if report.failure.is_none() && seen.total() > 0 {
                report.failure = Some(seen.describe());
            }
            if done.send(report).is_err() {
                break;
            }
        }
        writer.close();
        let _ = reader_thread.join();
    }

    /// Publishes one step on schedule. Publication `g` (over all publishers) is due at
    /// `start + g/rate` and goes to topic `g mod T`; this publisher takes every P-th `g`.
    fn publish(&self, writer: &mut BlockingWriter, cmd: StepCmd) -> StepDone {
        let mut done = StepDone {
            sent: vec![0; self.topics],
            ..StepDone::default()
        };
        let period_ns = 1e9 / cmd.rate;
        let due = |k: u64| {
            let g = k * u64::from(self.publishers) + u64::from(self.index);
            (cmd.start_ns as f64 + g as f64 * period_ns) as u64
        };
        let mut json = Vec::with_capacity(self.pad.len() + 160);
        let mut k = 0u64;
        loop {
            if stop_requested() {
                // Not a failure: the step is marked incomplete by the coordinator.
                break;
            }
            let next = due(k);
            if next >= cmd.end_ns {
                break;
            }
            let now = clock::now_ns();
            if next > now {
                let wait = Duration::from_nanos(next - now);
                if wait >= SLEEP_MIN {
                    std::thread::sleep(wait);
                    continue;
                }
            }
            done.lag.record_ns(now.saturating_sub(next));
            for _ in 0..PUBLISH_BATCH_MAX {
                let at = due(k);
                if at > now.max(next) || at >= cmd.end_ns {
                    break;
                }
                let g = k * u64::from(self.publishers) + u64::from(self.index);
                let topic = (g % self.topics as u64) as usize;
                done.sent[topic] += 1;
                let stamp = Stamp {
                    step: cmd.step,
                    publisher: self.index,
                    topic: topic as u32,
                    seq: done.sent[topic],
                    scheduled_ns: at,
                };
                wire::publish(&mut json, &self.topic_names[topic], &stamp, &self.pad);
                writer.queue_text(&json);
                k += 1;
            }
            if let Err(e) = writer.flush() {
                done.failure = Some(format!("publisher write failed: {e}"));
                break;
            }
        }
        done
    }
}
