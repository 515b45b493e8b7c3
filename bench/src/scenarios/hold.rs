//! `hold`: open N connections, subscribe each to K topics, and hold them for `--duration`
//! answering the server's pings like the Python client. Reports survival (connections never
//! closed), unexpected closes and reconnects, and the memory N idle connections cost the server:
//! RSS (`/proc/<pid>/status` VmRSS, with `--server-pid`) and kernel TCP memory
//! (`/proc/net/sockstat`), each sampled before opening and after all are subscribed and settled.
//!
//! Kernel TCP memory is machine-wide and includes our client sockets: on loopback both ends of
//! each connection are counted, so it is an upper bound for the server's share.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;

use super::{
    LoadCpu, Phase, Progress, Setup, Shared, join_all, open_planned, parse_duration, reached,
    ser_duration, sleep_with_progress, spawn_workers, wait_until,
};
use crate::conn::{Conn, ConnError};
use crate::report::Report;
use crate::stats::Tally;
use crate::sys;

/// Read buffer per held connection: pings and acks are small; it grows if needed.
const READ_BUF: usize = 512;

#[derive(clap::Args, Clone, Debug, Serialize)]
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
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
    /// Wait after the last subscription before sampling memory.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    #[serde(serialize_with = "ser_duration")]
    pub settle: Duration,
    /// Do not reopen connections the server closes during the hold.
    #[arg(long)]
    pub no_reconnect: bool,
}

#[derive(Default)]
struct ThreadResult {
    errors: Tally,
    /// Closes after the connection was ready, by kind.
    unexpected_closes: Tally,
    reconnects: u64,
    /// Connections whose first session is still open.
    survivors: u64,
    ready: u64,
    pings_answered: u64,
    messages: u64,
}

/// Runs the scenario and returns its report.
pub fn run(setup: &Setup, args: &HoldArgs) -> Report {
    let n = args.connections;
    let mut report = setup.report("hold", args);
    setup.check_nofile(n, &mut report);
    let rss_before = setup.server_sample();
    let sock_before = sys::sockstat();
    let shared = setup.shared(setup.plans(n, "hold"));
    let tids = Arc::new(Mutex::new(Vec::new()));
    let args2 = args.clone();
    let workers = {
        let shared = shared.clone();
        spawn_workers(setup.threads, "hold", &tids, move |i| {
            thread_main(shared.clone(), args2.clone(), i)
        })
    };
    let start = Instant::now();
    let p = &shared.progress;
    let mut complete = wait_until(
        setup,
        start + setup.common.open_timeout,
        || Progress::get(&p.ready) + Progress::get(&p.failed) >= n as u64,
        || shared.progress_line(n),
    );
    let open_s = start.elapsed().as_secs_f64();
    let ready = Progress::get(&p.ready);
    setup.log(&format!(
        "{ready} connections subscribed in {open_s:.2}s; settling"
    ));
    if ready == 0 {
        report.note("no connection could be opened: nothing to hold");
        complete = false;
    } else {
        complete &= sleep_with_progress(setup, args.settle, || shared.progress_line(n));
    }
    let rss_settled = setup.server_sample();
    let sock_settled = sys::sockstat();
    shared.set_phase(Phase::Measure);
    let cpu = LoadCpu::start(&tids.lock().unwrap_or_else(|e| e.into_inner()));
    if ready > 0 {
        complete &= sleep_with_progress(setup, args.duration, || shared.progress_line(n));
    }
    cpu.finish(&mut report, "");
    let rss_end = setup.server_sample();
    let sock_end = sys::sockstat();
    shared.set_phase(Phase::Stop);

    let mut all = ThreadResult::default();
    for r in join_all(workers) {
        all.errors.merge(&r.errors);
        all.unexpected_closes.merge(&r.unexpected_closes);
        all.reconnects += r.reconnects;
        all.survivors += r.survivors;
        all.ready += r.ready;
        all.pings_answered += r.pings_answered;
        all.messages += r.messages;
    }
    report.partial = !complete;
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
    let per_conn = |bytes: f64| if ready > 0 { bytes / ready as f64 } else { 0.0 };
    if let (Some(b), Some(a)) = (rss_before, rss_settled) {
        report.set("server_rss_before_bytes", b.rss_bytes);
        report.set("server_rss_settled_bytes", a.rss_bytes);
        report.set(
            "server_rss_per_conn_bytes",
            per_conn(a.rss_bytes as f64 - b.rss_bytes as f64),
        );
    }
    if let Some(e) = rss_end {
        report.set("server_rss_end_bytes", e.rss_bytes);
    }
    if let (Some(a), Some(e)) = (rss_settled, rss_end) {
        report.set("server_cpu_s_during_hold", e.cpu_s - a.cpu_s);
    }
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
    if setup.common.server_pid.is_none() {
        report.note("no --server-pid: server RSS not measured");
    }
    report.note("kernel TCP memory is machine-wide and counts both ends of loopback connections");
    report
}

async fn thread_main(shared: Arc<Shared>, args: HoldArgs, i: usize) -> ThreadResult {
    let plans = shared.take_plans(i);
    let stats = Rc::new(RefCell::new(ThreadResult::default()));
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
async fn hold(mut conn: Conn, stats: &RefCell<ThreadResult>, shared: &Shared) -> ConnError {
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
