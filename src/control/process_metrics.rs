//! `/metrics`, the process's side: CPU time, resident memory and descriptors (the names every
//! Prometheus client library uses, so stock dashboards work), `wse_build_info`, and the
//! configured limits that alerts compare the live figures against (`wse_max_connections`, …).
//!
//! Owns: reading `/proc/self` at scrape time. Never: caches a figure, or fails a scrape because
//! `/proc` is unreadable (a figure it cannot read is left out, never reported as zero).

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use wse_shards::Config;

/// Writes the process figures, the build info and the configured limits.
pub(super) fn encode(cfg: &Config, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let process = ProcessStats::read();
    if let Some(cpu) = process.cpu_seconds {
        let mut m = encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent by the process, in seconds",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, f64, f64>(&cpu, None::<&Exemplar<NoLabelSet, f64>>)?;
    }
    let gauges = [
        (
            "process_resident_memory_bytes",
            "Resident memory of the process, in bytes",
            process.resident_bytes,
        ),
        (
            "process_open_fds",
            "File descriptors the process has open (sockets included)",
            process.open_fds,
        ),
        (
            "process_max_fds",
            "The process's soft RLIMIT_NOFILE: the open-descriptor limit process_open_fds runs into",
            process.max_fds,
        ),
        (
            "process_start_time_seconds",
            "When the process started, in seconds since the Unix epoch",
            process.start_time_seconds,
        ),
    ];
    for (name, help, value) in gauges {
        if let Some(v) = value {
            gauge(encoder, name, help, v)?;
        }
    }

    let mut m = encoder.encode_descriptor(
        "wse_build_info",
        "Always 1; the labels say which build is running",
        None,
        MetricType::Gauge,
    )?;
    m.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?
        .encode_gauge(&1i64)?;

    // The configured limits, read at each scrape so that a reload shows at once. Each shares
    // its name with its configuration key.
    let limits = [
        (
            "wse_max_connections",
            "Configured server.max_connections: past it new WebSocket connections are closed \
             with 1013 (compare sum(wse_connections))",
            cfg.server.max_connections,
        ),
        (
            "wse_app_event_queue_capacity",
            "Configured limits.app_event_queue_capacity, events per shard: past it the oldest \
             application event is dropped (compare max(wse_app_event_queue_depth))",
            cfg.limits.app_event_queue_capacity,
        ),
        (
            "wse_control_max_connections",
            "Configured control.max_connections: past it new control-plane connections are \
             closed at accept (compare wse_control_connections)",
            cfg.control.max_connections,
        ),
    ];
    for (name, help, value) in limits {
        gauge(encoder, name, help, value as f64)?;
    }
    Ok(())
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

/// What `/proc/self` says about this process; `None` for what could not be read.
#[derive(Debug, Default)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
    start_time_seconds: Option<f64>,
}

impl ProcessStats {
    fn read() -> Self {
        let ticks = clock_ticks_per_second();
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().and_then(stat_fields);
        let field = |i: usize| -> Option<f64> { fields.as_ref()?.get(i)?.parse().ok() };
        // Fields after the command name, counted from `state` (field 3 of proc(5)) as 0.
        let (utime, stime, starttime, rss_pages) = (field(11), field(12), field(19), field(21));
        let page = rustix::param::page_size() as f64;
        let boot = boot_time_seconds();
        Self {
            cpu_seconds: utime.zip(stime).map(|(u, s)| (u + s) / ticks),
            resident_bytes: rss_pages.map(|p| p * page),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as f64),
            max_fds: rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .map(|n| n as f64),
            start_time_seconds: starttime.zip(boot).map(|(t, b)| b + t / ticks),
        }
    }
}

/// The fields of `/proc/self/stat` after the command name (which may hold spaces and
/// parentheses: it ends at the last `)`).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// `btime` from `/proc/stat`: when the host booted, in seconds since the epoch.
fn boot_time_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// USER_HZ, the unit of the CPU times in `/proc`: 100 on every Linux architecture this builds
/// for (the kernel's ABI fixes it, whatever the kernel's internal HZ).
fn clock_ticks_per_second() -> f64 {
    const USER_HZ: f64 = 100.0;
    USER_HZ
}

#[cfg(test)]
mod tests {
    use prometheus_client::collector::Collector;
    use prometheus_client::registry::Registry;

    use super::*;

    #[derive(Debug)]
    struct Process(Config);

    impl Collector for Process {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            encode(&self.0, &mut encoder)
        }
    }

    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn process_figures_are_this_process() {
        let mut cfg = Config::default();
        cfg.server.max_connections = 1234;
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Process(cfg)));
        // Burn a little CPU and hold a descriptor, so the figures cannot be zero.
        let _held = std::fs::File::open("/proc/self/stat").unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(value(&text, "process_cpu_seconds_total") > 0.0, "{text}");
        let rss = value(&text, "process_resident_memory_bytes");
        assert!(rss > 1e6 && rss < 1e11, "{rss}");
        let open = value(&text, "process_open_fds");
        let max = value(&text, "process_max_fds");
        assert!(open >= 4.0 && open < max, "{open} of {max}");
        let started = value(&text, "process_start_time_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            started <= now + 1.0 && started > now - 86_400.0,
            "{started} vs {now}"
        );
        assert_eq!(value(&text, "wse_max_connections"), 1234.0);
        assert_eq!(value(&text, "wse_control_max_connections"), 512.0);
        let build = format!(
            "wse_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == build), "{text}");
    }
}
