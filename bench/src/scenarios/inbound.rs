//! `inbound`: N connections each send application messages at `--rate` per second (open loop:
//! a connection that falls behind catches up in a burst). Reports what was sent, the server's
//! processed messages/s from its Prometheus endpoint (`--metrics-url`, counter
//! `wse_messages_in_total`, summed over label sets) and drops (`wse_dropped_total`), and the
//! `RATE_LIMITED` errors and `rate_limit_warning`s the connections received.
//!
//! The upstream peer has no metrics endpoint; without `--metrics-url` only client-side figures
//! are reported.

use std::cell::RefCell;
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::MissedTickBehavior;

use super::{
    Phase, Progress, Setup, Shared, join_all, open_planned, parse_duration, reached, secs,
    server_cpu, sleep_with_progress, spawn_workers, wait_until,
};
use crate::conn::{ConnError, is_type};
use crate::fleet::{Fleet, Running, Slice, Workload};
use crate::report::Report;
use crate::stats::Tally;
use crate::wire;

const READ_BUF: usize = 1024;
/// Counter of messages the server processed.
const METRIC_IN: &str = "wse_messages_in_total";
/// Counter of messages the server dropped (any reason).
const METRIC_DROPPED: &str = "wse_dropped_total";
const METRICS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
pub struct InboundArgs {
    /// Sending connections.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub connections: usize,
    /// Messages per second per connection.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Approximate message size, bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Measured time.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    #[serde(with = "secs")]
    pub duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    #[serde(with = "secs")]
    pub warmup: Duration,
    /// The server's Prometheus endpoint, e.g. http://127.0.0.1:5008/metrics.
    #[arg(long)]
    pub metrics_url: Option<String>,
}

/// One slice's figures (a thread's, then merged).
#[derive(Default, Serialize, Deserialize)]
pub struct InboundPart {
    sent: u64,
    rate_limited: u64,
    warnings: u64,
    other_errors: u64,
    failures: Tally,
    ready: u64,
}

/// The inbound workload: each connection sends on its schedule from `Warmup` on, counting from
/// `Measure`.
pub struct Inbound;

impl Workload for Inbound {
    const NAME: &'static str = "inbound";
    type Args = InboundArgs;
    type Part = InboundPart;

    fn connections(args: &InboundArgs) -> usize {
        args.connections
    }

    fn start(setup: &Setup, args: &InboundArgs, slice: Slice) -> Running<InboundPart> {
        let shared = setup.shared(setup.plans_slice(slice, "inbound"));
        let tids = Arc::new(Mutex::new(Vec::new()));
        let workers = {
            let (shared, args) = (shared.clone(), args.clone());
            spawn_workers(setup.threads, "inbound", &tids, move |i| {
                thread_main(shared.clone(), args.clone(), i)
            })
        };
        Running::new(shared, tids, move || {
            let mut all = InboundPart::default();
            for r in join_all(workers) {
                Inbound::merge(&mut all, r);
            }
            all
        })
    }

    fn merge(into: &mut InboundPart, o: InboundPart) {
        into.sent += o.sent;
        into.rate_limited += o.rate_limited;
        into.warnings += o.warnings;
        into.other_errors += o.other_errors;
        into.failures.merge(&o.failures);
        into.ready += o.ready;
    }
}

/// Runs the scenario and returns its report.
pub fn run(setup: &Setup, args: &InboundArgs) -> Report {
    let n = args.connections;
    let mut report = setup.report("inbound", args);
    if args.rate <= 0.0 || !args.rate.is_finite() {
        report.note("--rate must be positive");
        report.partial = true;
        return report;
    }
    let Some(fleet) = Fleet::<Inbound>::start(setup, args, &mut report) else {
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
    let metrics_before = args.metrics_url.as_deref().map(scrape);
    let server_before = setup.server_sample();
    let start = Instant::now();
    fleet.set_phase(Phase::Measure);
    complete &= sleep_with_progress(setup, args.duration, || fleet.snapshot().line(n));
    let wall = start.elapsed().as_secs_f64();
    let metrics_after = args.metrics_url.as_deref().map(scrape);
    let server_after = setup.server_sample();
    let all = fleet.finish(&mut report);

    report.partial |= !complete;
    report.set("connections_requested", n);
    report.set("connections_ready", all.ready);
    report.set("offered_per_s", all.ready as f64 * args.rate);
    report.set("sent_per_s", all.sent as f64 / wall);
    report.set("rate_limited_errors", all.rate_limited);
    report.set("rate_limit_warnings", all.warnings);
    report.set("other_errors", all.other_errors);
    report.set("connection_failures", all.failures.describe());
    match (metrics_before, metrics_after) {
        (Some(Ok(b)), Some(Ok(a))) => {
            let processed = a.messages_in.saturating_sub(b.messages_in);
            report.set("processed_per_s", processed as f64 / wall);
            report.set("dropped", a.dropped.saturating_sub(b.dropped));
            server_cpu(
                &mut report,
                server_before,
                server_after,
                wall,
                processed,
                "messages",
            );
        }
        (Some(Err(e)), _) | (_, Some(Err(e))) => report.note(format!("metrics: {e}")),
        _ => {
            report.note("no --metrics-url: server-side processed rate not measured");
            server_cpu(
                &mut report,
                server_before,
                server_after,
                wall,
                all.sent,
                "messages",
            );
        }
    }
    report
}

async fn thread_main(shared: Arc<Shared>, args: InboundArgs, i: usize) -> InboundPart {
    let plans = shared.take_plans(i);
    let stats = Rc::new(RefCell::new(InboundPart::default()));
    let permits = Rc::new(Semaphore::new(shared.inflight));
    let pad: Rc<str> = wire::padding(args.size).into();
    let period = Duration::from_secs_f64(1.0 / args.rate);
    for plan in plans {
        let (shared, stats, permits, pad) =
            (shared.clone(), stats.clone(), permits.clone(), pad.clone());
        tokio::task::spawn_local(async move {
            let conn = match open_planned(&plan, &shared, &permits, READ_BUF).await {
                Ok((conn, _, _permit)) => conn,
                Err(e) => {
                    stats.borrow_mut().failures.add(e.kind());
                    Progress::add(&shared.progress.failed, 1);
                    return;
                }
            };
            stats.borrow_mut().ready += 1;
            Progress::add(&shared.progress.ready, 1);
            let mut phase = shared.phase.subscribe();
            reached(&mut phase, Phase::Warmup).await;
            let e = send_loop(conn, &stats, &shared, &mut phase, period, &pad).await;
            if let Some(e) = e {
                stats.borrow_mut().failures.add(e.kind());
                Progress::add(&shared.progress.closed, 1);
            }
        });
    }
    let mut phase = shared.phase.subscribe();
    reached(&mut phase, Phase::Stop).await;
    stats.take()
}

/// Sends on schedule and reads what comes back until Stop (`None`) or a failure.
async fn send_loop(
    mut conn: crate::conn::Conn,
    stats: &RefCell<InboundPart>,
    shared: &Shared,
    phase: &mut tokio::sync::watch::Receiver<Phase>,
    period: Duration,
    pad: &str,
) -> Option<ConnError> {
    // Spread the connections' first sends over one period so they do not fire in lockstep.
    let offset = period.mul_f64(rand::random::<f64>());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut seq = 0u64;
    let mut json = Vec::with_capacity(pad.len() + 64);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                wire::inbound_event(&mut json, seq, pad);
                conn.queue_text(&json);
                if *phase.borrow() == Phase::Measure {
                    stats.borrow_mut().sent += 1;
                }
                Progress::add(&shared.progress.messages, 1);
            }
            r = conn.recv(|m| classify(m, stats)) => {
                if let Err(e) = r {
                    return Some(e);
                }
            }
            () = reached(phase, Phase::Stop) => return None,
        }
        if let Err(e) = conn.flush().await {
            return Some(e.into());
        }
    }
}

fn classify(m: &[u8], stats: &RefCell<InboundPart>) {
    let mut s = stats.borrow_mut();
    if is_type(m, b"rate_limit_warning") {
        s.warnings += 1;
    } else if is_type(m, b"error") {
        if wire::str_field(m, "code") == Some(b"RATE_LIMITED") {
            s.rate_limited += 1;
        } else {
            s.other_errors += 1;
        }
    }
}

/// The counters read from one scrape.
#[derive(Clone, Copy, Debug, Default)]
struct Scrape {
    messages_in: u64,
    dropped: u64,
}

/// GETs a Prometheus text endpoint (plain HTTP/1.0) and sums the counters we need.
fn scrape(url: &str) -> Result<Scrape, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// is supported"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, METRICS_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(METRICS_TIMEOUT))
        .map_err(|e| e.to_string())?;
    // One write: `write!` on an unbuffered stream would send the request in pieces.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    let status = body.split_whitespace().nth(1);
    if !body.starts_with("HTTP/1.") || status != Some("200") {
        return Err(format!(
            "{url}: {}",
            body.lines().next().unwrap_or("no response")
        ));
    }
    Ok(Scrape {
        messages_in: sum_metric(&body, METRIC_IN),
        dropped: sum_metric(&body, METRIC_DROPPED),
    })
}

/// Sums every sample of metric `name` (all label sets) in Prometheus text format.
fn sum_metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            let value = rest.rsplit_once('}').map_or(rest, |(_, v)| v);
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum::<f64>() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# HELP wse_messages_in_total x\n# TYPE wse_messages_in_total counter\n\
                    wse_messages_in_total{shard=\"0\"} 10\nwse_messages_in_total{shard=\"1\"} 5\n\
                    wse_messages_in_total_other 99\nwse_dropped_total{reason=\"a b\"} 2\nwse_dropped_total 1\n";
        assert_eq!(sum_metric(text, METRIC_IN), 15);
        assert_eq!(sum_metric(text, METRIC_DROPPED), 3);
        assert_eq!(sum_metric(text, "absent"), 0);
    }
}
