//! `recovery`: subscribers disconnect and reconnect mid-stream, recovering what they missed
//! (protocol.md §5), while publishers run at a fixed open-loop rate; verifies that every
//! subscriber ends up with every publication exactly once, in order.
//!
//! How it runs:
//! - S subscribers over T fresh topics (`rec.<run id>.<t>`, so a server used before starts new
//!   histories), subscribed plainly before anything is published; P publishers (the fan-out
//!   scenario's) publish at `--rate` for `--warmup` + `--duration`.
//! - During `--duration`, every `--churn-batch / --churn-rate` seconds the next
//!   `--churn-batch` subscribers (round-robin over all) are disconnected (`--churn-mode`: a close
//!   frame, or just the socket closed). Each stays away `--offline`, reconnects (TCP, upgrade,
//!   JWT, hello) and subscribes with `"recover":true` and the epoch and offset of the last
//!   publication it received. A subscriber still away when its turn comes again is skipped.
//! - After publishing ends (`Drain`: no more churn), the run waits up to `--drain` for every
//!   subscriber to have everything.
//!
//! What is verified, per subscriber:
//! - every (publisher, sequence) of its topic exactly once — the benchmark stamp, independent of
//!   the server's numbering: `lost` (never received, against what the publishers say they sent),
//!   `duplicates`, `reordered`;
//! - the server's offsets consecutive across reconnects (`offset_gaps`, `offset_duplicates`;
//!   wse-server numbers from 1, upstream from 0, so only continuity is checked) within one epoch;
//! - every recovery answered `recovered: true`.
//!
//! Figures: recoveries, replay sizes (the acknowledgement's `count`, and what arrived before it),
//! reconnect latency (connect() start to the acknowledgement, replay included), and delivery
//! latency from the scheduled time for live and for replayed publications.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, Semaphore, watch};

use super::fanout::{self, Publisher, StepCmd};
use super::{
    Phase, Plan, Progress, Setup, Shared, join_all, open_planned, parse_duration, reached,
    ser_duration, spawn_workers, stop_requested, wait_until,
};
use crate::clock;
use crate::conn::{Conn, ConnError, is_type};
use crate::fleet::loadgen_figures;
use crate::report::Report;
use crate::stats::{Counts, Deliveries, Latency, Seen, SeqTracker, Tally};
use crate::wire;

/// Subscriber read buffer: a replay arrives in one burst; it grows if needed.
const READ_BUF: usize = 8 * 1024;
/// Lead time between planning the stream and its first publication.
const STREAM_LEAD: Duration = Duration::from_millis(50);
/// How long after publishing ends to wait for a publisher's report.
const PUBLISHER_REPORT_GRACE: Duration = Duration::from_secs(30);
/// Reconnection attempts after one disconnection before the subscriber gives up.
const RECONNECT_ATTEMPTS: u32 = 5;

#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct RecoveryArgs {
    /// Subscriber connections (S).
    #[arg(long, default_value_t = 200)]
    pub subscribers: usize,
    /// Topics (T); subscriber i takes topic i mod T.
    #[arg(long, default_value_t = 10)]
    pub topics: usize,
    /// Publisher connections.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Size of each publication's data object, bytes (approximate).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Publications per second, all publishers together (fixed, open loop).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Publishing time with churn.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
    /// Publishing time before churn starts (every subscriber learns its position).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    #[serde(serialize_with = "ser_duration")]
    pub warmup: Duration,
    /// Subscribers disconnected at a time (N).
    #[arg(long, default_value_t = 10)]
    pub churn_batch: usize,
    /// Disconnections per second, in batches of --churn-batch (0: none, a control run).
    #[arg(long, default_value_t = 50.0)]
    pub churn_rate: f64,
    /// Time a disconnected subscriber stays away before reconnecting.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    #[serde(serialize_with = "ser_duration")]
    pub offline: Duration,
    /// How a subscriber disconnects.
    #[arg(long, value_enum, default_value_t = ChurnMode::Close)]
    pub churn_mode: ChurnMode,
    /// How long to wait after publishing for reconnections and deliveries to complete.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    #[serde(serialize_with = "ser_duration")]
    pub drain: Duration,
}

/// How churned subscribers go away.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChurnMode {
    /// A WebSocket close frame, then the socket closes.
    Close,
    /// The socket closes without a close frame (as when a client dies).
    Drop,
}

/// What the coordinator and the subscriber threads share beyond [`Shared`].
struct Rec {
    args: RecoveryArgs,
    topic_names: Vec<String>,
    subscribers: usize,
    /// Distinct benchmark deliveries so far, all subscribers: the drain waits for the total.
    distinct: AtomicU64,
    /// Subscribers between a disconnection and the end of their reconnection (recovered or
    /// given up): the drain also waits for none to be away, or a subscriber churned just before
    /// the end, with nothing left to recover, would never be counted as reconnected.
    away: AtomicU64,
    /// Subscribers per topic that got ready.
    per_topic: Vec<AtomicU64>,
    /// What each publisher sent to each topic (`sent[publisher][topic]`), once publishing ended.
    sent: OnceLock<Vec<Vec<u64>>>,
}

/// One thread's figures, merged at the end.
#[derive(Default)]
struct RecStats {
    ready: u64,
    failures: Tally,
    deliveries: Deliveries,
    /// Publications never received (set when the subscriber finishes).
    lost: u64,
    /// Subscribers with every publication exactly once, in order, offsets consecutive.
    complete: u64,
    /// Subscribers that could not be checked (publishers' counts unknown: an interrupted run).
    unverified: u64,
    churned: u64,
    churn_skipped: u64,
    reconnects: u64,
    recovered: u64,
    not_recovered: u64,
    reconnect_failures: Tally,
    gave_up: u64,
    unexpected_closes: Tally,
    /// Benchmark messages that arrived before a recovery's acknowledgement.
    replayed_messages: u64,
    /// Sum of the acknowledgements' `count`.
    replay_acked: u64,
    replay_sizes: Counts,
    reconnect_latency: Latency,
    live_latency: Latency,
    replayed_latency: Latency,
    offset_gaps: u64,
    offset_duplicates: u64,
    epoch_changes: u64,
    /// Benchmark messages without a recovery stamp (recovery off on the server?).
    unstamped: u64,
}

impl RecStats {
    fn merge(&mut self, o: &RecStats) {
        self.ready += o.ready;
        self.failures.merge(&o.failures);
        self.deliveries.merge(&o.deliveries);
        self.lost += o.lost;
        self.complete += o.complete;
        self.unverified += o.unverified;
        self.churned += o.churned;
        self.churn_skipped += o.churn_skipped;
        self.reconnects += o.reconnects;
        self.recovered += o.recovered;
        self.not_recovered += o.not_recovered;
        self.reconnect_failures.merge(&o.reconnect_failures);
        self.gave_up += o.gave_up;
        self.unexpected_closes.merge(&o.unexpected_closes);
        self.replayed_messages += o.replayed_messages;
        self.replay_acked += o.replay_acked;
        self.replay_sizes.merge(&o.replay_sizes);
        self.reconnect_latency.merge(&o.reconnect_latency);
        self.live_latency.merge(&o.live_latency);
        self.replayed_latency.merge(&o.replayed_latency);
        self.offset_gaps += o.offset_gaps;
        self.offset_duplicates += o.offset_duplicates;
        self.epoch_changes += o.epoch_changes;
        self.unstamped += o.unstamped;
    }
}

/// Runs the scenario and returns its report.
pub fn run(setup: &Setup, args: &RecoveryArgs) -> Report {
    let mut report = setup.report("recovery", args);
    if !setup.local_only(
        "recovery",
        "its publishers' counts and its churn schedule live in one process",
        &mut report,
    ) {
        return report;
    }
    let (s, t, p) = (args.subscribers, args.topics.max(1), args.publishers.max(1));
    let rates_ok = args.rate > 0.0
        && args.rate.is_finite()
        && args.churn_rate.is_finite()
        && args.churn_rate >= 0.0;
    if !rates_ok {
        report.note("--rate must be positive and --churn-rate not negative");
        report.partial = true;
        return report;
    }
    setup.check_nofile(s + p, &mut report);
    let run_id: u32 = rand::random();
    let rec = Arc::new(Rec {
        args: args.clone(),
        topic_names: (0..t).map(|i| format!("rec.{run_id:08x}.{i}")).collect(),
        subscribers: s,
        distinct: AtomicU64::new(0),
        away: AtomicU64::new(0),
        per_topic: (0..t).map(|_| AtomicU64::new(0)).collect(),
        sent: OnceLock::new(),
    });
    let shared = setup.shared(setup.plans(s, "rec"));
    let tids = Arc::new(Mutex::new(Vec::new()));
    let workers = {
        let (shared, rec) = (shared.clone(), rec.clone());
        let threads = setup.threads;
        spawn_workers(threads, "rec", &tids, move |i| {
            subscriber_thread(shared.clone(), rec.clone(), threads, i)
        })
    };
    let publishers = fanout::start_publishers(setup, p, rec.topic_names.clone(), args.size, &tids);
    let prog = &shared.progress;
    let mut complete = wait_until(
        setup,
        Instant::now() + setup.common.open_timeout,
        || Progress::get(&prog.ready) + Progress::get(&prog.failed) >= s as u64,
        || shared.progress_line(s),
    );
    let ready = Progress::get(&prog.ready);
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
    report.set("subscribers_ready", ready);
    report.set("publishers_ready", publishers.len());
    // Server memory with every subscriber connected, and again after the churn with them all
    // back: recovery rings are preallocated, so churn must not grow it.
    let rss_ready = setup.server_samples();
    let mut stream = None;
    if publishers.is_empty() || ready == 0 {
        report.note("nothing to measure: no publisher or no subscriber connected");
        complete = false;
    } else {
        let tids = tids.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let outcome = publish_and_churn(setup, args, &shared, &rec, &publishers, &tids);
        complete &= outcome.complete;
        stream = Some(outcome);
        rss_figures(
            &mut report,
            rss_ready.as_deref(),
            setup.server_samples().as_deref(),
        );
    }
    shared.set_phase(Phase::Stop);
    for p in publishers {
        drop(p.cmds);
        let _ = p.thread.join();
    }
    let mut all = RecStats::default();
    for r in join_all(workers) {
        all.merge(&r);
    }
    report.partial |= !complete;
    if let Some(o) = stream {
        figures(&mut report, args, &o, &all);
    }
    report
}

/// Server RSS (summed over `--server-pid`s) before and after the churn, and the growth.
fn rss_figures(
    report: &mut Report,
    before: Option<&[super::ServerSample]>,
    after: Option<&[super::ServerSample]>,
) {
    let (Some(before), Some(after)) = (before, after) else {
        return;
    };
    let sum = |v: &[super::ServerSample]| v.iter().map(|s| s.rss_bytes).sum::<u64>();
    let (b, a) = (sum(before), sum(after));
    report.set("server_rss_ready_bytes", b);
    report.set("server_rss_after_churn_bytes", a);
    report.set("server_rss_growth_bytes", a as i64 - b as i64);
}

/// What the coordinator measured of the publishing window.
struct StreamOutcome {
    publications: u64,
    published_s: f64,
    expected: u64,
    publisher_errors: Tally,
    drained: bool,
    complete: bool,
    server_cpu_s: Option<f64>,
    loadgen: (f64, f64),
}

/// Publishes for warm-up + duration (churn during the duration), then drains.
fn publish_and_churn(
    setup: &Setup,
    args: &RecoveryArgs,
    shared: &Shared,
    rec: &Rec,
    publishers: &[Publisher],
    tids: &[u32],
) -> StreamOutcome {
    shared.set_phase(Phase::Warmup);
    let start_ns = clock::now_ns() + STREAM_LEAD.as_nanos() as u64;
    let churn_ns = start_ns + args.warmup.as_nanos() as u64;
    let end_ns = churn_ns + args.duration.as_nanos() as u64;
    // One step for the whole stream: every publication of the run is checked.
    for p in publishers {
        let _ = p.cmds.send(StepCmd {
            step: 1,
            rate: args.rate,
            start_ns,
            end_ns,
        });
    }
    let p = &shared.progress;
    let progress = || {
        format!(
            "subscribers ready {}/{}, unexpected closes {}, distinct deliveries {}",
            Progress::get(&p.ready),
            rec.subscribers,
            Progress::get(&p.closed),
            rec.distinct.load(Ordering::Relaxed)
        )
    };
    let mut complete = fanout::sleep_until_ns(setup, churn_ns, progress);
    let server_before = setup.server_sample();
    let cpu = super::LoadCpu::start(tids);
    shared.set_phase(Phase::Measure);
    complete &= fanout::sleep_until_ns(setup, end_ns, progress);
    shared.set_phase(Phase::Drain);
    let published_s = (clock::now_ns().min(end_ns).saturating_sub(start_ns) as f64 / 1e9).max(1e-3);
    let t = rec.topic_names.len();
    let mut sent = Vec::with_capacity(publishers.len());
    let mut publisher_errors = Tally::default();
    for p in publishers {
        match p.done.recv_timeout(PUBLISHER_REPORT_GRACE) {
            Ok(done) => {
                if let Some(f) = done.failure {
                    publisher_errors.add(f);
                }
                sent.push(done.sent);
            }
            Err(_) => {
                publisher_errors.add("no report");
                complete = false;
                sent.push(vec![0; t]);
            }
        }
    }
    let expected: u64 = (0..t)
        .map(|topic| {
            let published: u64 = sent.iter().map(|per| per[topic]).sum();
            published * rec.per_topic[topic].load(Ordering::Relaxed)
        })
        .sum();
    let publications = sent.iter().flatten().sum();
    let _ = rec.sent.set(sent);
    let drained = wait_until(
        setup,
        Instant::now() + args.drain,
        || {
            rec.distinct.load(Ordering::Relaxed) >= expected
                && rec.away.load(Ordering::Relaxed) == 0
        },
        || {
            format!(
                "draining: {} of {expected} deliveries, {} subscribers reconnecting",
                rec.distinct.load(Ordering::Relaxed),
                rec.away.load(Ordering::Relaxed)
            )
        },
    );
    complete &= drained || !stop_requested();
    let server_after = setup.server_sample();
    StreamOutcome {
        publications,
        published_s,
        expected,
        publisher_errors,
        drained,
        complete: complete && !stop_requested(),
        server_cpu_s: server_before
            .zip(server_after)
            .map(|(b, a)| a.cpu_s - b.cpu_s),
        loadgen: cpu.measure(),
    }
}

fn figures(report: &mut Report, args: &RecoveryArgs, o: &StreamOutcome, all: &RecStats) {
    let d = &all.deliveries;
    let lost = all.lost;
    report.set("publications", o.publications);
    report.set("publications_per_s", o.publications as f64 / o.published_s);
    report.set("deliveries_expected", o.expected);
    report.set("deliveries", d.distinct);
    report.set("lost", lost);
    report.set("duplicates", d.duplicates);
    report.set("reordered", d.reordered);
    report.set("subscribers_complete", all.complete);
    report.set("disconnects", all.churned);
    report.set("churn_skipped", all.churn_skipped);
    report.set("reconnects", all.reconnects);
    report.set("recovered", all.recovered);
    report.set("not_recovered", all.not_recovered);
    report.set("reconnect_failures", all.reconnect_failures.total());
    report.set("subscribers_gave_up", all.gave_up);
    report.set("unexpected_closes", all.unexpected_closes.total());
    report.set("replayed_messages", all.replayed_messages);
    report.set("replay_count_acked", all.replay_acked);
    let (mean, p50, p99, max) = all.replay_sizes.summary();
    report.set("replay_size_mean", mean);
    report.set("replay_size_p50", p50);
    report.set("replay_size_p99", p99);
    report.set("replay_size_max", max);
    report.latency("reconnect_latency", &all.reconnect_latency.summary());
    report.histogram("reconnect_latency", &all.reconnect_latency);
    report.latency("live_latency", &all.live_latency.summary());
    report.histogram("live_latency", &all.live_latency);
    report.latency("replayed_latency", &all.replayed_latency.summary());
    report.histogram("replayed_latency", &all.replayed_latency);
    report.set("offset_gaps", all.offset_gaps);
    report.set("offset_duplicates", all.offset_duplicates);
    report.set("epoch_changes", all.epoch_changes);
    report.set("unstamped", all.unstamped);
    report.set("wrong_topic", d.wrong_topic);
    report.set("unparsable", d.unparsable);
    report.set("publisher_errors", o.publisher_errors.total());
    if let Some(cpu) = o.server_cpu_s {
        report.set("server_cpu_s_during_churn", cpu);
    }
    loadgen_figures(
        report,
        &[crate::fleet::Loadgen {
            name: "local".into(),
            cores: o.loadgen.0,
            busiest: o.loadgen.1,
            usable: crate::sys::usable_cores(),
        }],
    );
    let ready = report.number("subscribers_ready").unwrap_or(0.0) as u64;
    let passed = o.complete
        && o.drained
        && all.unverified == 0
        && lost == 0
        && d.duplicates == 0
        && d.reordered == 0
        && d.wrong_topic == 0
        && d.unparsable == 0
        && all.not_recovered == 0
        && all.gave_up == 0
        && all.offset_gaps == 0
        && all.offset_duplicates == 0
        && all.unstamped == 0
        && all.complete == ready
        && o.publisher_errors.total() == 0;
    report.set("passed", passed);
    report.set(
        "verdict",
        if passed {
            "every subscriber got every publication exactly once, in order".to_owned()
        } else {
            format!(
                "FAILED: lost {lost}, duplicates {}, reordered {}, not recovered {}, offset gaps {}, \
                 subscribers complete {} of {ready}",
                d.duplicates, d.reordered, all.not_recovered, all.offset_gaps, all.complete
            )
        },
    );
    if all.unstamped > 0 {
        report.note(
            "publications arrived without recovery stamps: is recovery enabled on the server \
             (wse-server --recovery-enabled true, upstream --recovery)?",
        );
    }
    if all.churned == 0 && args.churn_rate > 0.0 {
        report.note("no subscriber was disconnected: --duration too short for --churn-rate?");
    }
    for (what, t) in [
        ("subscriber connection failures", &all.failures),
        ("reconnection failures", &all.reconnect_failures),
        ("unexpected closes", &all.unexpected_closes),
        ("publisher errors", &o.publisher_errors),
    ] {
        if t.total() > 0 {
            report.note(format!("{what}: {}", t.describe()));
        }
    }
    if !o.drained {
        report.note(format!(
            "not every delivery arrived within --drain {:?}",
            args.drain
        ));
    }
}

// ------------------------------------------------------------------------------------------------
// Subscribers
// ------------------------------------------------------------------------------------------------

/// A subscriber as its thread's churn driver sees it.
#[derive(Default)]
struct Handle {
    /// Connected and knows its position: it can be churned.
    online: Cell<bool>,
    /// Set by the churn driver; the subscriber disconnects when it sees it.
    requested: Cell<bool>,
    wake: Notify,
}

async fn subscriber_thread(
    shared: Arc<Shared>,
    rec: Arc<Rec>,
    threads: usize,
    i: usize,
) -> RecStats {
    let plans = shared.take_plans(i);
    let stats = Rc::new(RefCell::new(RecStats::default()));
    let permits = Rc::new(Semaphore::new(shared.inflight));
    let mut handles = HashMap::with_capacity(plans.len());
    let mut tasks = Vec::with_capacity(plans.len());
    for plan in plans {
        let handle = Rc::new(Handle::default());
        handles.insert(plan.index, handle.clone());
        let (shared, rec, stats, permits) =
            (shared.clone(), rec.clone(), stats.clone(), permits.clone());
        tasks.push(tokio::task::spawn_local(async move {
            subscriber(plan, &shared, &rec, &stats, &handle, &permits).await;
        }));
    }
    churn_driver(&shared, &rec, threads, i, &handles, &stats).await;
    let mut phase = shared.phase.subscribe();
    reached(&mut phase, Phase::Stop).await;
    // Every subscriber accounts for itself on Stop; wait for them before handing the figures.
    for t in tasks {
        let _ = t.await;
    }
    stats.take()
}

/// Disconnects this thread's share of each batch, every `batch / rate` seconds, from `Measure`
/// until `Drain`. Batch `k` is subscribers `k*N .. k*N + N` (mod S) over all threads; this thread
/// owns those whose plan it holds.
async fn churn_driver(
    shared: &Shared,
    rec: &Rec,
    threads: usize,
    thread: usize,
    handles: &HashMap<usize, Rc<Handle>>,
    stats: &RefCell<RecStats>,
) {
    let a = &rec.args;
    let mut phase = shared.phase.subscribe();
    reached(&mut phase, Phase::Measure).await;
    if a.churn_rate <= 0.0 || rec.subscribers == 0 {
        return;
    }
    let batch = a.churn_batch.max(1);
    let period = Duration::from_secs_f64(batch as f64 / a.churn_rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for k in 0usize.. {
        tokio::select! {
            _ = tick.tick() => {}
            () = reached(&mut phase, Phase::Drain) => return,
        }
        for j in 0..batch {
            let index = (k * batch + j) % rec.subscribers;
            if index % threads != thread {
                continue;
            }
            let Some(h) = handles.get(&index) else {
                continue;
            };
            let mut s = stats.borrow_mut();
            if h.online.get() {
                h.requested.set(true);
                h.wake.notify_one();
                // Away from this moment: the drain must not end before it is back.
                rec.away.fetch_add(1, Ordering::Relaxed);
                s.churned += 1;
            } else {
                s.churn_skipped += 1;
            }
        }
    }
}

/// Why a session ended.
enum End {
    Stop,
    Churned,
    Failed(ConnError),
}

/// One subscriber, over all its sessions.
async fn subscriber(
    plan: Plan,
    shared: &Shared,
    rec: &Rec,
    stats: &RefCell<RecStats>,
    handle: &Handle,
    permits: &Semaphore,
) {
    let topic = plan.index % rec.topic_names.len();
    let name = &rec.topic_names[topic];
    let mut phase = shared.phase.subscribe();
    let first = async {
        let (mut conn, _, _permit) = open_planned(&plan, shared, permits, READ_BUF).await?;
        tokio::time::timeout(
            shared.connect_timeout,
            conn.subscribe(std::slice::from_ref(name)),
        )
        .await
        .unwrap_or(Err(ConnError::Timeout("subscribe")))?;
        Ok::<_, ConnError>(conn)
    };
    let mut conn = tokio::select! {
        r = first => match r {
            Ok(c) => c,
            Err(e) => {
                stats.borrow_mut().failures.add(e.kind());
                Progress::add(&shared.progress.failed, 1);
                return;
            }
        },
        () = reached(&mut phase, Phase::Stop) => return,
    };
    rec.per_topic[topic].fetch_add(1, Ordering::Relaxed);
    stats.borrow_mut().ready += 1;
    Progress::add(&shared.progress.ready, 1);
    let mut sub = SubState::new(topic as u32);
    loop {
        let end = session(&mut conn, &mut sub, handle, stats, rec, &mut phase).await;
        handle.online.set(false);
        // A churn request the session did not act on was already counted as away.
        let counted_away = handle.requested.replace(false);
        match end {
            End::Stop => {
                if counted_away {
                    rec.away.fetch_sub(1, Ordering::Relaxed);
                }
                conn.close();
                break;
            }
            End::Churned => match rec.args.churn_mode {
                ChurnMode::Close => conn.close(),
                ChurnMode::Drop => drop(conn),
            },
            End::Failed(e) => {
                if !counted_away {
                    rec.away.fetch_add(1, Ordering::Relaxed);
                }
                stats.borrow_mut().unexpected_closes.add(e.kind());
                Progress::add(&shared.progress.closed, 1);
            }
        }
        let back = reconnect(&plan, shared, rec, &mut sub, stats, &mut phase).await;
        rec.away.fetch_sub(1, Ordering::Relaxed);
        match back {
            Some(c) => conn = c,
            None => break,
        }
    }
    sub.finish(rec, &mut stats.borrow_mut());
}

/// Receives until churned, closed or stopped.
async fn session(
    conn: &mut Conn,
    sub: &mut SubState,
    handle: &Handle,
    stats: &RefCell<RecStats>,
    rec: &Rec,
    phase: &mut watch::Receiver<Phase>,
) -> End {
    loop {
        handle.online.set(sub.epoch.is_some());
        let result = tokio::select! {
            r = conn.recv(|m| sub.on_message(m, false, stats, rec)) => r,
            () = handle.wake.notified() => Ok(()),
            () = reached(phase, Phase::Stop) => return End::Stop,
        };
        if conn.queued() > 0
            && let Err(e) = conn.flush().await
        {
            return End::Failed(e.into());
        }
        if let Err(e) = result {
            return End::Failed(e);
        }
        if handle.requested.take() {
            return End::Churned;
        }
    }
}

/// Waits `--offline`, then reconnects and recovers; a few attempts. `None` on Stop or when it
/// gives up.
async fn reconnect(
    plan: &Plan,
    shared: &Shared,
    rec: &Rec,
    sub: &mut SubState,
    stats: &RefCell<RecStats>,
    phase: &mut watch::Receiver<Phase>,
) -> Option<Conn> {
    for _ in 0..RECONNECT_ATTEMPTS {
        tokio::select! {
            () = tokio::time::sleep(rec.args.offline) => {}
            () = reached(phase, Phase::Stop) => return None,
        }
        let started = Instant::now();
        let attempt = tokio::time::timeout(
            shared.connect_timeout,
            resubscribe(plan, shared, rec, sub, stats),
        );
        let result = tokio::select! {
            r = attempt => r.unwrap_or(Err(ConnError::Timeout("recovery"))),
            () = reached(phase, Phase::Stop) => return None,
        };
        match result {
            Ok((conn, ack)) => {
                let mut s = stats.borrow_mut();
                s.reconnects += 1;
                s.reconnect_latency
                    .record_ns(started.elapsed().as_nanos() as u64);
                match ack {
                    Some(ack) if ack.recovered => {
                        s.recovered += 1;
                        s.replay_acked += ack.count;
                        s.replay_sizes.record(ack.count);
                    }
                    other => {
                        s.not_recovered += 1;
                        // Carry on from where the server says the topic is (protocol.md §5).
                        if let Some(ack) = other {
                            sub.epoch = ack.epoch;
                            if let Some(o) = ack.offset {
                                sub.last_offset = Some(o);
                            }
                        }
                    }
                }
                return Some(conn);
            }
            Err(e) => stats.borrow_mut().reconnect_failures.add(e.kind()),
        }
    }
    stats.borrow_mut().gave_up += 1;
    None
}

/// Opens a new connection and subscribes with recovery from the last position; the replay is
/// accounted for as it arrives.
async fn resubscribe(
    plan: &Plan,
    shared: &Shared,
    rec: &Rec,
    sub: &mut SubState,
    stats: &RefCell<RecStats>,
) -> Result<(Conn, Option<wire::RecoveryAck>), ConnError> {
    let mut conn = Conn::open(
        &plan.endpoint,
        &plan.token,
        READ_BUF,
        shared.connect_timeout,
    )
    .await?;
    if shared.hello {
        conn.hello().await?;
    }
    let request = wire::subscribe_recover(
        &rec.topic_names[sub.topic as usize],
        sub.epoch.as_deref(),
        sub.last_offset.unwrap_or(0),
    );
    let ack = conn
        .subscribe_with(&request, |m| sub.on_message(m, true, stats, rec))
        .await?;
    Ok((conn, wire::parse_recovery_ack(&ack)))
}

/// One subscriber's position and checks, kept across its sessions.
struct SubState {
    topic: u32,
    /// The epoch and offset of the last publication received (what a recovery asks from).
    epoch: Option<String>,
    last_offset: Option<u64>,
    /// One sequence tracker per publisher (few: a linear scan).
    trackers: Vec<(u32, SeqTracker)>,
    /// This subscriber's own duplicates, reorderings and offset faults (for `complete`).
    faults: u64,
}

impl SubState {
    fn new(topic: u32) -> Self {
        Self {
            topic,
            epoch: None,
            last_offset: None,
            trackers: Vec::new(),
            faults: 0,
        }
    }

    /// Accounts for one message, live or `replayed` (before a recovery's acknowledgement).
    fn on_message(&mut self, m: &[u8], replayed: bool, stats: &RefCell<RecStats>, rec: &Rec) {
        let Some(stamp) = wire::parse_stamp(m) else {
            if is_type(m, wire::BENCH_EVENT.as_bytes()) {
                stats.borrow_mut().deliveries.unparsable += 1;
            }
            return;
        };
        let now = clock::now_ns();
        let mut s = stats.borrow_mut();
        match wire::parse_recovery_stamp(m) {
            Some((epoch, offset)) => self.advance(epoch, offset, &mut s),
            None => s.unstamped += 1,
        }
        if stamp.topic != self.topic {
            s.deliveries.wrong_topic += 1;
            self.faults += 1;
            return;
        }
        let i = match self
            .trackers
            .iter()
            .position(|(p, _)| *p == stamp.publisher)
        {
            Some(i) => i,
            None => {
                self.trackers.push((stamp.publisher, SeqTracker::default()));
                self.trackers.len() - 1
            }
        };
        let seen = self.trackers[i].1.observe(stamp.seq);
        s.deliveries.count(seen, m.len());
        if replayed {
            s.replayed_messages += 1;
        }
        match seen {
            Seen::New { .. } | Seen::Late => {
                rec.distinct.fetch_add(1, Ordering::Relaxed);
                let latency = now.saturating_sub(stamp.scheduled_ns);
                if replayed {
                    s.replayed_latency.record_ns(latency);
                } else {
                    s.live_latency.record_ns(latency);
                }
                if seen == Seen::Late {
                    self.faults += 1;
                }
            }
            Seen::Duplicate | Seen::OutOfWindow => self.faults += 1,
        }
    }

    /// Checks that `offset` follows the last one in the same epoch, and moves the position.
    fn advance(&mut self, epoch: &[u8], offset: u64, s: &mut RecStats) {
        let same_epoch = self.epoch.as_deref().map(str::as_bytes) == Some(epoch);
        match (same_epoch, self.last_offset) {
            (true, Some(last)) if offset == last + 1 => {}
            (true, Some(last)) if offset <= last => {
                s.offset_duplicates += 1;
                self.faults += 1;
                return; // the position never moves back
            }
            (true, Some(last)) => {
                s.offset_gaps += offset - last - 1;
                self.faults += 1;
            }
            (false, _) if self.epoch.is_some() => s.epoch_changes += 1,
            _ => {}
        }
        if !same_epoch {
            self.epoch = Some(String::from_utf8_lossy(epoch).into_owned());
        }
        self.last_offset = Some(offset);
    }

    /// Counts what never arrived, against what the publishers sent to this topic.
    fn finish(&self, rec: &Rec, s: &mut RecStats) {
        let Some(sent) = rec.sent.get() else {
            s.unverified += 1;
            return;
        };
        let mut lost = 0;
        for (p, per_topic) in sent.iter().enumerate() {
            let expected = per_topic[self.topic as usize];
            lost += self
                .trackers
                .iter()
                .find(|(q, _)| *q as usize == p)
                .map_or(expected, |(_, t)| t.missing(expected));
        }
        s.lost += lost;
        if lost == 0 && self.faults == 0 {
            s.complete += 1;
        }
    }
}
