//! `hold`: open N connections, subscribe each to K topics, and hold them for `--duration`
//! answering the server's pings like the Python client. Reports survival (connections never
//! closed), unexpected closes and reconnects, and the memory N idle connections cost the server:
//! RSS (`/proc/<pid>/status` VmRSS, with `--server-pid`) and kernel TCP memory
//! (`/proc/net/sockstat`), each sampled before opening and after all are subscribed and settled;
//! the server's RSS also every 500 ms while holding, for its floor (`server_rss_floor_*`): an
//! allocator may keep memory freed during the connect storm resident until it next runs, which
//! for an idle server can be seconds later, so the settled sample can overstate what holding
//! the connections costs.
//!
//! Kernel TCP memory is machine-wide and includes our client sockets: on loopback both ends of
//! each connection are counted, so it is an upper bound for the server's share.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{
    Phase, Progress, Setup, Shared, join_all, open_planned, parse_duration, reached, secs,
    sleep_with_progress, spawn_workers, stop_requested, wait_until,
};
use crate::conn::{Conn, ConnError};
use crate::fleet::{Fleet, Running, Slice, Workload};
use crate::report::Report;
use crate::stats::Tally;
use crate::sys;

/// How often the server's RSS is sampled while holding, for its floor.
const RSS_FLOOR_SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// Read buffer per held connection: pings and acks are small; it grows if needed.
const READ_BUF: usize = 512;

#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
pub struct HoldArgs {
    /// Connections to open and hold.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: usize,
    /// Topics each connection subscribes to (K).
    #[arg(long, default_value_t = 1)]
    pub topics_per_conn: usize,
    /// Distinct topics the subscriptions are spread over.
    #[arg(long, default_value_t = 100)]
    pub topics: usize,
    /// How long to hold once all are subscribed.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    #[serde(with = "secs")]
    pub duration: Duration,
    /// Wait after the last subscription before sampling memory.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    #[serde(with = "secs")]
    pub settle: Duration,
    /// Do not reopen connections the server closes during the hold.
    #[arg(long)]
    pub no_reconnect: bool,
}

/// One slice's figures (a thread's, then merged).
#[derive(Default, Serialize, Deserialize)]
pub struct HoldPart {
    errors: Tally,
    /// Closes after the connection was ready, by kind.
    unexpected_closes: Tally,
    reconnects: u64,
    /// Connections whose first session is still open.
    survivors: u64,
    ready: u64,
    /// Ready connections per `--url` (index), for memory per connection per server.
    ready_per_target: Vec<u64>,
    pings_answered: u64,
    messages: u64,
}

impl HoldPart {
    fn merge(&mut self, o: &HoldPart) {
        self.errors.merge(&o.errors);
        self.unexpected_closes.merge(&o.unexpected_closes);
        self.reconnects += o.reconnects;
        self.survivors += o.survivors;
        self.ready += o.ready;
        add_per_target(&mut self.ready_per_target, &o.ready_per_target);
        self.pings_answered += o.pings_answered;
        self.messages += o.messages;
    }
}

/// Adds `o` to `into` index by index, growing `into` as needed.
fn add_per_target(into: &mut Vec<u64>, o: &[u64]) {
    if into.len() < o.len() {
        into.resize(o.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(o) {
        *a += b;
    }
}

/// The hold workload: each slice opens, subscribes and holds its connections.
pub struct Hold;

impl Workload for Hold {
    const NAME: &'static str = "hold";
    type Args = HoldArgs;
    type Part = HoldPart;

    fn connections(args: &HoldArgs) -> usize {
        args.connections
    }

    fn start(setup: &Setup, args: &HoldArgs, slice: Slice) -> Running<HoldPart> {
        let shared = setup.shared(setup.plans_slice(slice, "hold"));
        let tids = Arc::new(Mutex::new(Vec::new()));
        let targets = setup.target_count();
        let workers = {
            let (shared, args) = (shared.clone(), args.clone());
            spawn_workers(setup.threads, "hold", &tids, move |i| {
                thread_main(shared.clone(), args.clone(), targets, i)
            })
        };
        Running::new(shared, tids, move || {
            let mut all = HoldPart::default();
            for r in join_all(workers) {
                all.merge(&r);
            }
            all
        })
    }

    fn merge(into: &mut HoldPart, other: HoldPart) {
        into.merge(&other);
    }
}

/// Runs the scenario and returns its report.
pub fn run(setup: &Setup, args: &HoldArgs) -> Report {
    let n = args.connections;
    let mut report = setup.report("hold", args);
    let rss_before = setup.server_samples();
    let sock_before = sys::sockstat();
    let Some(fleet) = Fleet::<Hold>::start(setup, args, &mut report) else {
        return report;
    };
    let start = Instant::now();
    let mut complete = wait_until(
        setup,
        start + setup.common.open_timeout,
        || fleet.snapshot().settled() >= n as u64,
        || fleet.snapshot().line(n),
    );
    let open_s = start.elapsed().as_secs_f64();
    let ready = fleet.snapshot().ready;
    setup.log(&format!(
        "{ready} connections subscribed in {open_s:.2}s; settling"
    ));
    if ready == 0 {
        report.note("no connection could be opened: nothing to hold");
        complete = false;
    } else {
        complete &= sleep_with_progress(setup, args.settle, || fleet.snapshot().line(n));
    }
    let rss_settled = setup.server_samples();
    let sock_settled = sys::sockstat();
    fleet.set_phase(Phase::Measure);
    // The lowest RSS seen while holding: memory the server freed (handshake buffers, grown
    // tables) can stay resident until its allocator next runs, which for an idle server is its
    // next timer; the floor is what holding the connections really costs.
    let mut rss_floor: Option<u64> = None;
    if ready > 0 {
        let mut next_sample = Instant::now();
        let stopped = wait_until(
            setup,
            Instant::now() + args.duration,
            || {
                if Instant::now() >= next_sample {
                    next_sample += RSS_FLOOR_SAMPLE_EVERY;
                    lower_floor(&mut rss_floor, setup.server_samples().as_deref());
                }
                stop_requested()
            },
            || fleet.snapshot().line(n),
        );
        complete &= !stopped;
    }
    let rss_end = setup.server_samples();
    let sock_end = sys::sockstat();
    let all = fleet.finish(&mut report);

    report.partial |= !complete;
    report.set("connections_requested", n);
    report.set("connections_ready", all.ready);
    report.set("connections_failed", all.errors.total());
    report.set("open_s", open_s);
    report.set("hold_s", args.duration.as_secs_f64());
    report.set("survivors", all.survivors);
    report.set("unexpected_closes", all.unexpected_closes.total());
    report.set("unexpected_close_kinds", all.unexpected_closes.describe());
    report.set("reconnects", all.reconnects);
    report.set("pings_answered", all.pings_answered);
    report.set("messages_received", all.messages);
    server_memory(
        &mut report,
        [&rss_before, &rss_settled, &rss_end],
        &all.ready_per_target,
    );
    // The end sample closes the window the floor is taken over.
    lower_floor(&mut rss_floor, rss_end.as_deref());
    if let (Some(floor), Some(b)) = (rss_floor, &rss_before) {
        let before = total_rss(b);
        report.set("server_rss_floor_bytes", floor);
        report.set(
            "server_rss_floor_per_conn_bytes",
            (floor as f64 - before as f64) / all.ready.max(1) as f64,
        );
    }
    let per_conn = |bytes: f64| {
        if all.ready > 0 {
            bytes / all.ready as f64
        } else {
            0.0
        }
    };
    report.set("kernel_tcp_mem_before_bytes", sock_before.tcp_mem_bytes);
    report.set("kernel_tcp_mem_settled_bytes", sock_settled.tcp_mem_bytes);
    report.set("kernel_tcp_mem_end_bytes", sock_end.tcp_mem_bytes);
    report.set(
        "kernel_tcp_mem_per_conn_bytes",
        per_conn(sock_settled.tcp_mem_bytes as f64 - sock_before.tcp_mem_bytes as f64),
    );
    report.set("kernel_tcp_inuse_settled", sock_settled.tcp_inuse);
    report.set("kernel_tcp_time_wait_settled", sock_settled.tcp_time_wait);
    if all.errors.total() > 0 {
        report.note(format!("failed connections: {}", all.errors.describe()));
    }
    if setup.common.server_pid.is_empty() {
        report.note("no --server-pid: server RSS not measured");
    }
    report.note("kernel TCP memory is machine-wide and counts both ends of loopback connections");
    report
}

/// RSS summed over the sampled servers.
fn total_rss(samples: &[super::ServerSample]) -> u64 {
    samples.iter().map(|s| s.rss_bytes).sum()
}

/// Lowers `floor` to the total RSS of `samples`, when there are samples.
fn lower_floor(floor: &mut Option<u64>, samples: Option<&[super::ServerSample]>) {
    if let Some(rss) = samples.map(total_rss) {
        *floor = Some(floor.map_or(rss, |f| f.min(rss)));
    }
}

/// Server RSS before, settled and at the end (summed over `--server-pid`s), RSS per connection
/// over all servers, and — with one pid per `--url` — per server: the growth of each divided
/// by the connections it holds (`server_rss_per_conn_by_server`, and the worst).
fn server_memory(
    report: &mut Report,
    [before, settled, end]: [&Option<Vec<super::ServerSample>>; 3],
    ready_per_target: &[u64],
) {
    let ready: u64 = ready_per_target.iter().sum();
    if let (Some(b), Some(a)) = (before, settled) {
        report.set("server_rss_before_bytes", total_rss(b));
        report.set("server_rss_settled_bytes", total_rss(a));
        report.set(
            "server_rss_per_conn_bytes",
            if ready > 0 {
                (total_rss(a) as f64 - total_rss(b) as f64) / ready as f64
            } else {
                0.0
            },
        );
        if a.len() > 1 && a.len() == ready_per_target.len() {
            report.set("servers", a.len());
            let per: Vec<f64> = b
                .iter()
                .zip(a)
                .zip(ready_per_target)
                .map(|((b, a), &r)| (a.rss_bytes as f64 - b.rss_bytes as f64) / r.max(1) as f64)
                .collect();
            report.set(
                "server_rss_per_conn_max_bytes",
                per.iter().copied().fold(0.0, f64::max),
            );
            report.set(
                "server_rss_per_conn_by_server",
                per.iter()
                    .zip(ready_per_target)
                    .map(|(p, r)| format!("{p:.0} B x {r}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        } else if a.len() > 1 {
            report.note(format!(
                "{} server pids for {} URLs: per-server memory needs one pid per URL, in order",
                a.len(),
                ready_per_target.len()
            ));
        }
    }
    if let Some(e) = end {
        report.set("server_rss_end_bytes", total_rss(e));
    }
    if let (Some(a), Some(e)) = (settled, end) {
        let cpu = |v: &Vec<super::ServerSample>| v.iter().map(|s| s.cpu_s).sum::<f64>();
        report.set("server_cpu_s_during_hold", cpu(e) - cpu(a));
    }
}

async fn thread_main(shared: Arc<Shared>, args: HoldArgs, targets: usize, i: usize) -> HoldPart {
    let plans = shared.take_plans(i);
    let stats = Rc::new(RefCell::new(HoldPart {
        ready_per_target: vec![0; targets],
        ..HoldPart::default()
    }));
    let permits = Rc::new(Semaphore::new(shared.inflight));
    let args = Rc::new(args);
    for plan in plans {
        let (shared, stats, permits, args) =
            (shared.clone(), stats.clone(), permits.clone(), args.clone());
        tokio::task::spawn_local(async move {
            let topics: Vec<String> = (0..args.topics_per_conn)
                .map(|k| {
                    format!(
                        "hold.{}",
                        (plan.index * args.topics_per_conn + k) % args.topics.max(1)
                    )
                })
                .collect();
            let mut phase = shared.phase.subscribe();
            let mut first = true;
            loop {
                let conn = match open_and_subscribe(&plan, &shared, &permits, &topics).await {
                    Ok(c) => c,
                    Err(e) => {
                        stats.borrow_mut().errors.add(e.kind());
                        Progress::add(&shared.progress.failed, 1);
                        return;
                    }
                };
                if first {
                    let mut s = stats.borrow_mut();
                    s.ready += 1;
                    s.ready_per_target[plan.index % targets] += 1;
                    s.survivors += 1;
                    Progress::add(&shared.progress.ready, 1);
                } else {
                    stats.borrow_mut().reconnects += 1;
                }
                let close = tokio::select! {
                    e = hold(conn, &stats, &shared) => e,
                    () = reached(&mut phase, Phase::Stop) => return,
                };
                {
                    let mut s = stats.borrow_mut();
                    s.unexpected_closes.add(close.kind());
                    if first {
                        s.survivors -= 1;
                    }
                }
                Progress::add(&shared.progress.closed, 1);
                first = false;
                if args.no_reconnect || *phase.borrow() >= Phase::Stop {
                    return;
                }
            }
        });
    }
    let mut phase = shared.phase.subscribe();
    reached(&mut phase, Phase::Stop).await;
    stats.take()
}

async fn open_and_subscribe(
    plan: &super::Plan,
    shared: &Shared,
    permits: &Semaphore,
    topics: &[String],
) -> Result<Conn, ConnError> {
    let (mut conn, _, _permit) = open_planned(plan, shared, permits, READ_BUF).await?;
    if !topics.is_empty() {
        tokio::time::timeout(shared.connect_timeout, conn.subscribe(topics))
            .await
            .unwrap_or(Err(ConnError::Timeout("subscribe")))?;
    }
    Ok(conn)
}

/// Reads (answering pings) until the connection fails; returns why.
async fn hold(mut conn: Conn, stats: &RefCell<HoldPart>, shared: &Shared) -> ConnError {
    loop {
        let mut messages = 0u64;
        let pings_before = conn.pings_answered;
        let result = conn.recv(|_| messages += 1).await;
        let pings = conn.pings_answered - pings_before;
        if let Err(e) = conn.flush().await {
            return e.into();
        }
        {
            let mut s = stats.borrow_mut();
            s.messages += messages;
            s.pings_answered += pings;
        }
        Progress::add(&shared.progress.messages, messages + pings);
        if let Err(e) = result {
            return e;
        }
    }
}
