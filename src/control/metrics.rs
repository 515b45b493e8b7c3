//! `/metrics`: a prometheus-client [`Collector`] reading every shard's [`ShardMetrics`] at
//! scrape time.
//!
//! Owns: metric names, help texts and how shards are combined. Never: keeps a copy of the
//! figures (the shards own them; a scrape is a few hundred relaxed loads).
//!
//! Counters are summed across shards. Gauges that say where load sits (connections, queue
//! depths) stay per shard with a `shard="N"` label; `sum()` them for the total.
//! A shard's counters are read one by one while it runs, so a scrape is not an atomic snapshot.

use std::fmt;
use std::iter;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::registry::Unit;
use std::sync::atomic::Ordering;

use wse_shards::Server;
use wse_shards::metrics::{
    COUNTED_CLOSE_CODES, Counter, DropReason, HANDSHAKE_BUCKETS, RejectReason, ShardMetrics,
};

use crate::cluster::{ClusterMetrics, ClusterView, MEMBER_STATES};

use super::events::EventMetrics;
use super::listener::ControlMetrics;

type Field = fn(&ShardMetrics) -> &Counter;

/// Per-shard gauges: name, help, field.
const GAUGES: [(&str, &str, Field); 7] = [
    (
        "wse_connections",
        "WebSocket connections past the upgrade and not yet released",
        |m| &m.connections,
    ),
    (
        "wse_handshakes_pending",
        "Sockets still in the HTTP upgrade",
        |m| &m.handshakes_pending,
    ),
    (
        "wse_app_event_queue_depth",
        "Application events waiting in the shard's queue",
        |m| &m.app_event_queue_depth,
    ),
    (
        "wse_fabric_inbound_depth",
        "Cross-shard entries waiting in the shard's inbound queues",
        |m| &m.fabric_inbound_depth,
    ),
    (
        "wse_fabric_overflow_depth",
        "Cross-shard entries held back because a destination queue was full",
        |m| &m.fabric_overflow_depth,
    ),
    (
        "wse_fabric_inflight_bytes",
        "Bytes the shard sent across the fabric that their destination has not taken yet",
        |m| &m.fabric_inflight_bytes,
    ),
    (
        "wse_sockets",
        "Sockets the shard holds in any phase (what connection balancing compares)",
        |m| &m.sockets,
    ),
];

/// Counters summed over shards: name (the encoder appends `_total`), help, field.
const COUNTERS: [(&str, &str, Field); 12] = [
    (
        "wse_connections_accepted",
        "WebSocket connections accepted",
        |m| &m.connections_accepted_total,
    ),
    (
        "wse_connections_closed",
        "WebSocket connections closed",
        |m| &m.connections_closed_total,
    ),
    (
        "wse_messages_in",
        "Inbound data messages, after reassembly",
        |m| &m.messages_in_total,
    ),
    ("wse_bytes_in", "Bytes of inbound data messages", |m| {
        &m.bytes_in_total
    }),
    (
        "wse_messages_out",
        "Frames queued to connections, of any kind",
        |m| &m.messages_out_total,
    ),
    ("wse_bytes_out", "Bytes written to sockets", |m| {
        &m.bytes_out_total
    }),
    (
        "wse_deliveries",
        "Publications queued to subscribers, one per subscriber per publication",
        |m| &m.deliveries_total,
    ),
    (
        "wse_publications",
        "Publications sequenced by their topic's owner shard",
        |m| &m.publications_total,
    ),
    (
        "wse_auth_failures",
        "Connections refused for failed authentication",
        |m| &m.auth_failures_total,
    ),
    (
        "wse_rate_limited",
        "Inbound messages dropped by the rate limit",
        |m| &m.rate_limited_total,
    ),
    (
        "wse_app_events",
        "Application events queued for the event stream (connects, disconnects, client messages of application types, presence changes)",
        |m| &m.app_events_total,
    ),
    (
        "wse_handed_off",
        "Fresh sockets handed to a less loaded shard",
        |m| &m.handed_off_total,
    ),
];

/// Reads the shards of one [`Server`] on every scrape.
pub(super) struct ShardCollector {
    server: Arc<Server>,
    /// The event stream's delivery counters (the control plane's own, not a shard's).
    events: Arc<EventMetrics>,
    /// The control listener's own counters.
    listener: Arc<ControlMetrics>,
    /// The cluster core's snapshot, when `cluster.enabled` (no `wse_cluster_*` otherwise).
    cluster: Option<ClusterView>,
}

impl ShardCollector {
    pub(super) fn new(
        server: Arc<Server>,
        events: Arc<EventMetrics>,
        listener: Arc<ControlMetrics>,
        cluster: Option<ClusterView>,
    ) -> Self {
        Self {
            server,
            events,
            listener,
            cluster,
        }
    }
}

// `Collector` requires `Debug`; `Server` has none.
impl fmt::Debug for ShardCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardCollector")
            .field("shards", &self.server.shard_count())
            .finish()
    }
}

impl Collector for ShardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        encode_shards(self.server.metrics(), &mut encoder)?;
        encode_events(self.server.metrics(), &self.events, &mut encoder)?;
        encode_listener(&self.listener, &mut encoder)?;
        if let Some(view) = &self.cluster {
            encode_cluster(&view.metrics(), &mut encoder)?;
        }
        super::process_metrics::encode(&self.server.config(), &mut encoder)
    }
}

/// The control listener: connections open, and those refused or cut by a limit.
fn encode_listener(listener: &ControlMetrics, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut metric = encoder.encode_descriptor(
        "wse_control_rejected",
        "Control-plane connections or requests cut by a limit, by reason: max_connections \
         (closed at accept, control.max_connections open), header_timeout (no complete request \
         head within control.header_timeout, idle keep-alive included), request_timeout (408, \
         not answered within control.request_timeout)",
        None,
        MetricType::Counter,
    )?;
    let reasons = [
        ("max_connections", load(&listener.rejected_max_connections)),
        ("header_timeout", load(&listener.header_timeouts)),
        ("request_timeout", load(&listener.request_timeouts)),
    ];
    for (reason, value) in reasons {
        encode_counter(&mut metric.encode_family(&[("reason", reason)])?, value)?;
    }
    let open = i64::try_from(load(&listener.connections)).unwrap_or(i64::MAX);
    encoder
        .encode_descriptor(
            "wse_control_connections",
            "HTTP connections open on the control listener (event-stream sockets leave it once \
             upgraded)",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&open)
}

/// `wse_cluster_*`: the mesh as this node sees it. The `peer` label takes member names, at most
/// `cluster.max_members` of them (members are forgotten when their tombstone expires).
fn encode_cluster(m: &ClusterMetrics, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut metric = encoder.encode_descriptor(
        "wse_cluster_members",
        "Cluster members this node knows (itself excluded), by state: alive, suspect, leaving, \
         dead, left (dead and left ones are forgotten after cluster tombstone time, 5 min)",
        None,
        MetricType::Gauge,
    )?;
    for (state, count) in MEMBER_STATES.iter().zip(m.members) {
        metric
            .encode_family(&[("state", crate::cluster::state_name(*state))])?
            .encode_gauge(&gauge(count))?;
    }
    encoder
        .encode_descriptor(
            "wse_cluster_links_up",
            "Cluster members this node has a link to",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&gauge(m.links_up))?;
    let mut metric = encoder.encode_descriptor(
        "wse_cluster_peer_rtt",
        "Smoothed round-trip time of the link to each member (links up and measured only)",
        Some(&Unit::Seconds),
        MetricType::Gauge,
    )?;
    for p in &m.peers {
        if let Some(us) = p.rtt_us {
            metric
                .encode_family(&[("peer", p.name.as_str())])?
                .encode_gauge(&(us as f64 / 1e6))?;
        }
    }
    type Bytes = fn(&crate::cluster::PeerMetrics) -> u64;
    let per_peer: [(&str, &str, Bytes); 2] = [
        (
            "wse_cluster_sent",
            "Bytes written to each member's cluster links (after the handshake; sealed and framed)",
            |p| p.traffic.sent,
        ),
        (
            "wse_cluster_received",
            "Bytes read from each member's cluster links (after the handshake)",
            |p| p.traffic.received,
        ),
    ];
    for (name, help, field) in per_peer {
        let mut metric =
            encoder.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Counter)?;
        for p in &m.peers {
            encode_counter(
                &mut metric.encode_family(&[("peer", p.name.as_str())])?,
                field(p),
            )?;
        }
    }
    let counters = [
        (
            "wse_cluster_publications_sent",
            "Publications made here handed to the cluster (one each, whatever the number of \
             peers that want it)",
            m.publications_sent,
        ),
        (
            "wse_cluster_publications_received",
            "Publications from other nodes handed to this node's shards",
            m.publications_received,
        ),
        (
            "wse_cluster_sub_ack_timeouts",
            "Subscriptions acknowledged after cluster.sub_ack_timeout instead of the other \
             nodes' confirmation",
            m.sub_ack_timeouts,
        ),
        (
            "wse_cluster_resyncs",
            "Fresh interest snapshots asked of a member whose digest disagreed with its table here",
            m.resyncs,
        ),
    ];
    for (name, help, value) in counters {
        encode_counter(
            &mut encoder.encode_descriptor(name, help, None, MetricType::Counter)?,
            value,
        )?;
    }
    let mut metric = encoder.encode_descriptor(
        "wse_cluster_publications_dropped",
        "Cluster publications dropped, by reason: peer_queue_full (for one member, over \
         cluster.peer_queue_bytes or its hold buffer; in the dead letter queue), too_large (over \
         a cluster frame), shards_busy (from a member, refused by this node's \
         shards)",
        None,
        MetricType::Counter,
    )?;
    let reasons = [
        ("peer_queue_full", m.dropped_peer_queue),
        ("too_large", m.dropped_too_large),
        ("shards_busy", m.dropped_shards_busy),
    ];
    for (reason, value) in reasons {
        encode_counter(&mut metric.encode_family(&[("reason", reason)])?, value)?;
    }
    let ratio = if m.batch_bytes_wire == 0 {
        1.0
    } else {
        m.batch_bytes_raw as f64 / m.batch_bytes_wire as f64
    };
    encoder
        .encode_descriptor(
            "wse_cluster_compression_ratio",
            "Data batch bytes before compression per byte sent, every link since start (1 \
             before any batch, or with compression off)",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&ratio)?;
    encoder
        .encode_descriptor(
            "wse_cluster_dlq_entries",
            "Dropped cluster publications kept for diagnosis (GET /api/v1/cluster/dlq)",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&gauge(m.dlq_entries))
}

/// The event stream: where application events were lost, by reason, and what was delivered.
fn encode_events(
    shards: &[Arc<ShardMetrics>],
    events: &EventMetrics,
    encoder: &mut DescriptorEncoder,
) -> fmt::Result {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut metric = encoder.encode_descriptor(
        "wse_inbound_dropped",
        "Application events dropped before reaching the backend, by reason: queue_full (a \
         shard's queue, oldest first), consumer_slow (a consumer's queue, oldest first), \
         no_consumer (held past the bound while no consumer was connected), webhook_failed (a \
         batch given up after every retry)",
        None,
        MetricType::Counter,
    )?;
    let reasons = [
        (
            "queue_full",
            sum(shards, |m| m.dropped(DropReason::AppEventOverflow)),
        ),
        ("consumer_slow", load(&events.consumer_slow)),
        ("no_consumer", load(&events.no_consumer)),
        ("webhook_failed", load(&events.webhook_failed)),
    ];
    for (reason, value) in reasons {
        encode_counter(&mut metric.encode_family(&[("reason", reason)])?, value)?;
    }
    let mut metric = encoder.encode_descriptor(
        "wse_events_delivered",
        "Application events written to an event-stream consumer or accepted by the webhook",
        None,
        MetricType::Counter,
    )?;
    encode_counter(&mut metric, load(&events.delivered))?;
    let consumers = i64::try_from(load(&events.consumers)).unwrap_or(i64::MAX);
    encoder
        .encode_descriptor(
            "wse_event_consumers",
            "Event-stream consumers connected (GET /api/v1/events sockets)",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&consumers)
}

/// Everything `/metrics` shows, from the shards' metrics in shard order.
fn encode_shards(shards: &[Arc<ShardMetrics>], encoder: &mut DescriptorEncoder) -> fmt::Result {
    for (name, help, field) in GAUGES {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (shard, m) in shards.iter().enumerate() {
            // i64: the crate refuses u64::MAX as a gauge, which would fail the whole scrape.
            let value = i64::try_from(field(m).get()).unwrap_or(i64::MAX);
            metric
                .encode_family(&[("shard", shard)])?
                .encode_gauge(&value)?;
        }
    }
    for (name, help, field) in COUNTERS {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        encode_counter(&mut metric, sum(shards, |m| field(m)))?;
    }

    let mut metric = encoder.encode_descriptor(
        "wse_dropped",
        "Messages or connections dropped, by reason (application events a full shard queue \
         dropped are wse_inbound_dropped_total{reason=\"queue_full\"}, with the event stream's \
         other losses)",
        None,
        MetricType::Counter,
    )?;
    for (i, reason) in DropReason::ALL.iter().enumerate() {
        // One drop, one series: this one is reported by `encode_events`.
        if *reason == DropReason::AppEventOverflow {
            continue;
        }
        let family = &[("reason", reason.label())];
        encode_counter(
            &mut metric.encode_family(family)?,
            sum(shards, |m| &m.dropped[i]),
        )?;
    }

    let mut metric = encoder.encode_descriptor(
        "wse_rejected",
        "Connection attempts refused, by reason",
        None,
        MetricType::Counter,
    )?;
    for (i, reason) in RejectReason::ALL.iter().enumerate() {
        let family = &[("reason", reason.label())];
        encode_counter(
            &mut metric.encode_family(family)?,
            sum(shards, |m| &m.rejected[i]),
        )?;
    }

    let mut metric = encoder.encode_descriptor(
        "wse_closes",
        "Connections closed, by close code (\"other\" for codes not listed)",
        None,
        MetricType::Counter,
    )?;
    let codes = COUNTED_CLOSE_CODES
        .iter()
        .map(u16::to_string)
        .chain(iter::once("other".to_owned()));
    for (i, code) in codes.enumerate() {
        let family = &[("code", code)];
        encode_counter(
            &mut metric.encode_family(family)?,
            sum(shards, |m| &m.closes[i]),
        )?;
    }

    encode_handshake_histogram(shards, encoder)
}

/// `wse_handshake_duration_seconds`, merged over shards. The shards keep non-cumulative bucket
/// counts, which is what `encode_histogram` takes (it accumulates them); `f64::MAX` as the last
/// bound is how the crate's own `Histogram` marks `+Inf`.
fn encode_handshake_histogram(
    shards: &[Arc<ShardMetrics>],
    encoder: &mut DescriptorEncoder,
) -> fmt::Result {
    let mut buckets: Vec<(f64, u64)> = HANDSHAKE_BUCKETS
        .iter()
        .chain(iter::once(&f64::MAX))
        .map(|&bound| (bound, 0))
        .collect();
    let mut sum_micros = 0u64;
    for m in shards {
        let h = &m.handshake_latency;
        for (bucket, count) in buckets.iter_mut().zip(&h.buckets) {
            bucket.1 = bucket.1.wrapping_add(count.get());
        }
        sum_micros = sum_micros.wrapping_add(h.sum_micros.get());
    }
    // The count is taken from the buckets rather than the shards' `count`, read at another
    // instant, so that `_count` always equals the `+Inf` bucket as the format requires.
    let count = buckets.iter().map(|b| b.1).fold(0, u64::wrapping_add);
    let mut metric = encoder.encode_descriptor(
        "wse_handshake_duration",
        "Time from accept to server_ready queued",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    metric.encode_histogram::<NoLabelSet>(sum_micros as f64 / 1e6, count, &buckets, None)
}

fn encode_counter(
    metric: &mut prometheus_client::encoding::MetricEncoder<'_>,
    value: u64,
) -> fmt::Result {
    metric.encode_counter::<NoLabelSet, u64, u64>(&value, None::<&Exemplar<NoLabelSet, u64>>)
}

/// A counter summed over shards; each wraps at `u64::MAX` as the shards' own counters do.
fn sum(shards: &[Arc<ShardMetrics>], field: impl Fn(&ShardMetrics) -> &Counter) -> u64 {
    shards
        .iter()
        .map(|m| field(m).get())
        .fold(0, u64::wrapping_add)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::registry::Registry;
    use wse_shards::metrics::DropReason;

    use super::*;

    /// Renders what a scrape of these shards shows.
    fn render(shards: Vec<Arc<ShardMetrics>>) -> String {
        #[derive(Debug)]
        struct Fixed(Vec<Arc<ShardMetrics>>);
        impl Collector for Fixed {
            fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
                encode_shards(&self.0, &mut encoder)
            }
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed(shards)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    fn has_line(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }

    #[test]
    fn counters_sum_and_gauges_stay_per_shard() {
        let shards: Vec<Arc<ShardMetrics>> = (0..2).map(|_| Arc::default()).collect();
        shards[0].connections.set(3);
        shards[1].connections.set(4);
        shards[0].fabric_inbound_depth.set(9);
        shards[0].messages_in_total.add(5);
        shards[1].messages_in_total.add(6);
        shards[1].dropped(DropReason::SlowConsumer).add(2);
        shards[0].closed_with(1000);
        shards[1].closed_with(4413);
        shards[1].closed_with(3000);
        let text = render(shards);
        has_line(&text, "# TYPE wse_connections gauge");
        has_line(&text, "wse_connections{shard=\"0\"} 3");
        has_line(&text, "wse_connections{shard=\"1\"} 4");
        has_line(&text, "wse_fabric_inbound_depth{shard=\"0\"} 9");
        has_line(&text, "# TYPE wse_messages_in counter");
        has_line(&text, "wse_messages_in_total 11");
        has_line(&text, "wse_publications_total 0");
        has_line(&text, "wse_dropped_total{reason=\"slow_consumer\"} 2");
        has_line(&text, "wse_dropped_total{reason=\"fabric_overflow\"} 0");
        has_line(&text, "wse_rejected_total{reason=\"fd_limit\"} 0");
        assert!(!text.contains("app_event_overflow"), "{text}");
        has_line(&text, "wse_closes_total{code=\"1000\"} 1");
        has_line(&text, "wse_closes_total{code=\"4413\"} 1");
        has_line(&text, "wse_closes_total{code=\"other\"} 1");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn handshake_histogram_is_cumulative_with_seconds() {
        let shards: Vec<Arc<ShardMetrics>> = (0..2).map(|_| Arc::default()).collect();
        shards[0]
            .handshake_latency
            .observe(Duration::from_micros(200));
        shards[1]
            .handshake_latency
            .observe(Duration::from_millis(3));
        shards[1].handshake_latency.observe(Duration::from_secs(20));
        let text = render(shards);
        has_line(&text, "# TYPE wse_handshake_duration_seconds histogram");
        has_line(&text, "# UNIT wse_handshake_duration_seconds seconds");
        has_line(&text, "wse_handshake_duration_seconds_count 3");
        has_line(&text, "wse_handshake_duration_seconds_sum 20.0032");
        has_line(
            &text,
            "wse_handshake_duration_seconds_bucket{le=\"0.0001\"} 0",
        );
        has_line(
            &text,
            "wse_handshake_duration_seconds_bucket{le=\"0.00025\"} 1",
        );
        has_line(
            &text,
            "wse_handshake_duration_seconds_bucket{le=\"0.0025\"} 1",
        );
        has_line(
            &text,
            "wse_handshake_duration_seconds_bucket{le=\"0.005\"} 2",
        );
        has_line(
            &text,
            "wse_handshake_duration_seconds_bucket{le=\"10.0\"} 2",
        );
        has_line(
            &text,
            "wse_handshake_duration_seconds_bucket{le=\"+Inf\"} 3",
        );
    }
}
