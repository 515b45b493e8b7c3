//! `connect-storm`: open N connections as fast as the server accepts them, at most `--inflight`
//! handshakes at a time, and report the accept rate and handshake latency.
//!
//! A handshake is TCP connect + HTTP upgrade + JWT check + `server_ready` (+ `client_hello` →
//! `server_hello` unless `--no-hello`); with `--protocol centrifuge`, TCP connect, HTTP upgrade
//! and `connect` with the JWT until its reply. Latency runs from the start of connect() to
//! `server_ready`; the rate counts completed handshakes (with hello) over the time from the
//! start signal to the last completion. Connections stay open until all are done, so the
//! server holds N at the end, then they are closed.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{
    Phase, Progress, Setup, Shared, join_all, open_planned, reached, server_cpu, spawn_workers,
    wait_until,
};
use crate::clock;
use crate::conn::Conn;
use crate::fleet::{Fleet, Running, Slice, Workload};
use crate::report::Report;
use crate::stats::{Latency, Tally};

/// Read buffer per connection: handshake replies are small; it grows if needed.
const READ_BUF: usize = 1024;

#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
pub struct StormArgs {
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: usize,
}

/// One slice's figures.
#[derive(Default, Serialize, Deserialize)]
pub struct StormPart {
    ready: Latency,
    hello: Latency,
    errors: Tally,
    opened: u64,
    /// Seconds from the start signal (`Measure`) to the slice's last successful handshake, on
    /// the slice's own clock: the storm lasts as long as its slowest slice.
    busy_s: f64,
}

/// One thread's figures.
#[derive(Default)]
struct ThreadResult {
    part: StormPart,
    /// `clock::now_ns()` of the start signal and of this thread's last successful handshake.
    start_ns: u64,
    last_done_ns: u64,
}

/// The storm workload: each slice opens its connections once the phase is `Measure`.
pub struct Storm;

impl Workload for Storm {
    const NAME: &'static str = "connect-storm";
    type Args = StormArgs;
    type Part = StormPart;

    fn connections(args: &StormArgs) -> usize {
        args.connections
    }

    fn start(setup: &Setup, _args: &StormArgs, slice: Slice) -> Running<StormPart> {
        let shared = setup.shared(setup.plans_slice(slice, "storm"));
        let tids = Arc::new(Mutex::new(Vec::new()));
        let workers = {
            let shared = shared.clone();
            spawn_workers(setup.threads, "storm", &tids, move |i| {
                thread_main(shared.clone(), i)
            })
        };
        Running::new(shared, tids, move || {
            let mut all = StormPart::default();
            for r in join_all(workers) {
                let busy = r.last_done_ns.saturating_sub(r.start_ns) as f64 / 1e9;
                Storm::merge(
                    &mut all,
                    StormPart {
                        busy_s: busy,
                        ..r.part
                    },
                );
            }
            all
        })
    }

    fn merge(into: &mut StormPart, o: StormPart) {
        into.ready.merge(&o.ready);
        into.hello.merge(&o.hello);
        into.errors.merge(&o.errors);
        into.opened += o.opened;
        into.busy_s = into.busy_s.max(o.busy_s);
    }
}

/// Runs the scenario and returns its report.
pub fn run(setup: &Setup, args: &StormArgs) -> Report {
    let n = args.connections;
    let mut report = setup.report("connect-storm", args);
    let Some(fleet) = Fleet::<Storm>::start(setup, args, &mut report) else {
        return report;
    };
    let server_before = setup.server_sample();
    let start = Instant::now();
    fleet.set_phase(Phase::Measure);
    let complete = wait_until(
        setup,
        start + setup.common.open_timeout,
        || fleet.snapshot().opened + fleet.snapshot().failed >= n as u64,
        || fleet.snapshot().line(n),
    );
    let wall = start.elapsed().as_secs_f64();
    let server_after = setup.server_sample();
    let all = fleet.finish(&mut report);

    let busy_s = all.busy_s;
    report.partial |= !complete;
    report.set("connections_requested", n);
    report.set("connections_opened", all.opened);
    report.set("connections_failed", all.errors.total());
    // Still handshaking when --open-timeout or Ctrl-C ended the storm.
    report.set(
        "connections_abandoned",
        (n as u64).saturating_sub(all.opened + all.errors.total()),
    );
    report.set("errors", all.errors.describe());
    report.set(
        "handshakes_per_s",
        if busy_s > 0.0 {
            all.opened as f64 / busy_s
        } else {
            0.0
        },
    );
    report.set("storm_s", busy_s);
    report.set("inflight", setup.common.inflight);
    report.latency("ready_latency", &all.ready.summary());
    report.histogram("ready_latency", &all.ready);
    // A Centrifuge handshake has no hello: `connect` is all of it.
    if !setup.common.no_hello && setup.common.protocol == super::Protocol::Wse {
        report.latency("hello_latency", &all.hello.summary());
        report.histogram("hello_latency", &all.hello);
    }
    server_cpu(
        &mut report,
        server_before,
        server_after,
        wall,
        all.opened,
        "connections",
    );
    if all.errors.total() > 0 {
        report.note(format!("failed handshakes: {}", all.errors.describe()));
    }
    report
}

async fn thread_main(shared: Arc<Shared>, i: usize) -> ThreadResult {
    let plans = shared.take_plans(i);
    let stats = Rc::new(RefCell::new(ThreadResult::default()));
    let open: Rc<RefCell<Vec<Conn>>> = Rc::new(RefCell::new(Vec::with_capacity(plans.len())));
    let permits = Rc::new(Semaphore::new(shared.inflight));
    let mut phase = shared.phase.subscribe();
    reached(&mut phase, Phase::Measure).await;
    stats.borrow_mut().start_ns = clock::now_ns();
    for plan in plans {
        let (shared, stats, open, permits) =
            (shared.clone(), stats.clone(), open.clone(), permits.clone());
        tokio::task::spawn_local(async move {
            match open_planned(&plan, &shared, &permits, READ_BUF).await {
                Ok((conn, t, _permit)) => {
                    let mut s = stats.borrow_mut();
                    s.part.ready.record_ns(t.ready.as_nanos() as u64);
                    s.part.hello.record_ns(t.hello.as_nanos() as u64);
                    s.part.opened += 1;
                    s.last_done_ns = clock::now_ns();
                    open.borrow_mut().push(conn);
                }
                Err(e) => {
                    stats.borrow_mut().part.errors.add(e.kind());
                    Progress::add(&shared.progress.failed, 1);
                }
            }
        });
    }
    reached(&mut phase, Phase::Stop).await;
    for conn in open.take() {
        conn.close();
    }
    stats.take()
}
