//! `ping`: application-level round trips. N connections each send
//! `{"c":"WSE","t":"ping","p":{"timestamp":ms}}` and wait for the server's `PONG`, in a closed
//! loop (one ping outstanding per connection) for `--duration` after `--warmup`. Reports RTT
//! percentiles (measured with the monotonic clock, not the payload's milliseconds) and pings/s.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{
    Phase, Progress, Setup, Shared, join_all, open_planned, parse_duration, reached, secs,
    server_cpu, sleep_with_progress, spawn_workers, wait_until,
};
use crate::conn::{Conn, ConnError, is_type};
use crate::fleet::{Fleet, Running, Slice, Workload};
use crate::report::Report;
use crate::stats::{Latency, Tally};
use crate::wire;

const READ_BUF: usize = 1024;

#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
pub struct PingArgs {
    /// Concurrent connections, each with one ping outstanding.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub connections: usize,
    /// Measured time.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    #[serde(with = "secs")]
    pub duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    #[serde(with = "secs")]
    pub warmup: Duration,
}

/// One slice's figures (a thread's, then merged).
#[derive(Default, Serialize, Deserialize)]
pub struct PingPart {
    rtt: Latency,
    errors: Tally,
    ready: u64,
}

/// The ping workload: each connection pings in a closed loop from `Warmup` on, recording from
/// `Measure`.
pub struct Ping;

impl Workload for Ping {
    const NAME: &'static str = "ping";
    type Args = PingArgs;
    type Part = PingPart;

    fn connections(args: &PingArgs) -> usize {
        args.connections
    }

    fn start(setup: &Setup, _args: &PingArgs, slice: Slice) -> Running<PingPart> {
        let shared = setup.shared(setup.plans_slice(slice, "ping"));
        let tids = Arc::new(Mutex::new(Vec::new()));
        let workers = {
            let shared = shared.clone();
            spawn_workers(setup.threads, "ping", &tids, move |i| {
                thread_main(shared.clone(), i)
            })
        };
        Running::new(shared, tids, move || {
            let mut all = PingPart::default();
            for r in join_all(workers) {
                Ping::merge(&mut all, r);
            }
            all
        })
    }

    fn merge(into: &mut PingPart, o: PingPart) {
        into.rtt.merge(&o.rtt);
        into.errors.merge(&o.errors);
        into.ready += o.ready;
    }
}

/// Runs the scenario and returns its report.
pub fn run(setup: &Setup, args: &PingArgs) -> Report {
    let n = args.connections;
    let mut report = setup.report("ping", args);
    let Some(fleet) = Fleet::<Ping>::start(setup, args, &mut report) else {
        return report;
    };
    let mut complete = wait_until(
        setup,
        Instant::now() + setup.common.open_timeout,
        || fleet.snapshot().settled() >= n as u64,
        || fleet.snapshot().line(n),
    );
    fleet.set_phase(Phase::Warmup);
    complete &= sleep_with_progress(setup, args.warmup, || fleet.snapshot().line(n));
    let server_before = setup.server_sample();
    let start = Instant::now();
    fleet.set_phase(Phase::Measure);
    complete &= sleep_with_progress(setup, args.duration, || fleet.snapshot().line(n));
    let wall = start.elapsed().as_secs_f64();
    let server_after = setup.server_sample();
    let all = fleet.finish(&mut report);

    let rtt = all.rtt.summary();
    report.partial |= !complete;
    report.set("connections_requested", n);
    report.set("connections_ready", all.ready);
    report.set("errors", all.errors.total());
    report.set("error_kinds", all.errors.describe());
    report.set("pings_per_s", rtt.count as f64 / wall);
    report.latency("rtt", &rtt);
    report.histogram("rtt", &all.rtt);
    server_cpu(
        &mut report,
        server_before,
        server_after,
        wall,
        rtt.count,
        "pings",
    );
    if all.errors.total() > 0 {
        report.note(format!("connection errors: {}", all.errors.describe()));
    }
    report
}

async fn thread_main(shared: Arc<Shared>, i: usize) -> PingPart {
    let plans = shared.take_plans(i);
    let stats = Rc::new(RefCell::new(PingPart::default()));
    let permits = Rc::new(Semaphore::new(shared.inflight));
    for plan in plans {
        let (shared, stats, permits) = (shared.clone(), stats.clone(), permits.clone());
        tokio::task::spawn_local(async move {
            let conn = match open_planned(&plan, &shared, &permits, READ_BUF).await {
                Ok((conn, _, _permit)) => conn,
                Err(e) => {
                    stats.borrow_mut().errors.add(e.kind());
                    Progress::add(&shared.progress.failed, 1);
                    return;
                }
            };
            stats.borrow_mut().ready += 1;
            Progress::add(&shared.progress.ready, 1);
            let mut phase = shared.phase.subscribe();
            reached(&mut phase, Phase::Warmup).await;
            let mut stop = shared.phase.subscribe();
            tokio::select! {
                e = ping_loop(conn, &stats, &shared, &phase) => {
                    stats.borrow_mut().errors.add(e.kind());
                    Progress::add(&shared.progress.closed, 1);
                }
                () = reached(&mut stop, Phase::Stop) => {}
            }
        });
    }
    let mut phase = shared.phase.subscribe();
    reached(&mut phase, Phase::Stop).await;
    stats.take()
}

/// Pings until the connection fails; returns why.
async fn ping_loop(
    mut conn: Conn,
    stats: &RefCell<PingPart>,
    shared: &Shared,
    phase: &tokio::sync::watch::Receiver<Phase>,
) -> ConnError {
    loop {
        let sent = Instant::now();
        conn.queue_text(&wire::ping(wire::wall_ms()));
        if let Err(e) = conn.flush().await {
            return e.into();
        }
        if let Err(e) = conn.wait_for(|m| is_type(m, b"PONG"), |_| {}).await {
            return e;
        }
        let rtt = sent.elapsed();
        if *phase.borrow() == Phase::Measure {
            stats.borrow_mut().rtt.record_ns(rtt.as_nanos() as u64);
        }
        Progress::add(&shared.progress.messages, 1);
    }
}
