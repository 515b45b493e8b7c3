//! Host limits that cap how many connections this process can hold, checked at start-up and on
//! each reload: the open-file limit (one descriptor per connection) and the system-wide file
//! table. `tuning/check-host` reports the kernel's side in full; this is the part the process
//! can see and, for the soft limit, fix itself.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors the process needs besides its connections: stdio, the control plane's listener
/// and its clients, the allocator and runtime internals, a margin for what libraries open.
const FD_BASE: u64 = 64;
/// Descriptors per shard besides its connections: its listener, its io_uring, its waker's
/// eventfd, and a margin.
const FD_PER_SHARD: u64 = 4;

/// The open-file limit as the server runs with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit, after [`raise_nofile`] (`None` = unlimited).
    pub soft: Option<u64>,
    pub hard: Option<u64>,
    /// The soft limit before start-up raised it, when it did.
    pub raised_from: Option<u64>,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, as daemons do: the soft limit protects
/// programs that use select(2), which this one does not, and is often left at 1024 by login
/// sessions and container runtimes while the hard limit allows far more.
pub fn raise_nofile() -> Nofile {
    let before = getrlimit(Resource::Nofile);
    let mut now = Nofile {
        soft: before.current,
        hard: before.maximum,
        raised_from: None,
    };
    if before.current != before.maximum {
        let raised = Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                now.soft = before.maximum;
                now.raised_from = before.current;
            }
            Err(e) => tracing::debug!(error = %e, "cannot raise the soft RLIMIT_NOFILE"),
        }
    }
    now
}

/// The most connections `soft` descriptors allow with `shards` shards.
pub fn connection_cap(soft: u64, shards: usize) -> u64 {
    soft.saturating_sub(FD_BASE + FD_PER_SHARD * shards as u64)
}

/// Logs a warning for each limit that holds connections below `max_connections`; returns the
/// warnings (for the tests).
pub fn warn_if_capped(nofile: &Nofile, max_connections: usize, shards: usize) -> Vec<String> {
    let mut warnings = Vec::new();
    let max = max_connections as u64;
    if let Some(soft) = nofile.soft {
        let cap = connection_cap(soft, shards);
        if cap < max {
            warnings.push(format!(
                "RLIMIT_NOFILE is {soft} open files, which caps connections at about {cap}, \
                 below server.max_connections = {max_connections}; past it accepts fail and are \
                 counted in wse_rejected_total{{reason=\"fd_limit\"}}. Raise LimitNOFILE= in the \
                 systemd unit (or ulimit -n), and fs.nr_open if the hard limit is at it \
                 (see tuning/check-host)"
            ));
        }
    }
    if let Some(file_max) = read_u64("/proc/sys/fs/file-max")
        && file_max < max
    {
        warnings.push(format!(
            "fs.file-max is {file_max}, which caps open files for the whole host below \
             server.max_connections = {max_connections}; see tuning/sysctl.d/60-wse.conf"
        ));
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    warnings
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nofile(soft: u64) -> Nofile {
        Nofile {
            soft: Some(soft),
            hard: Some(soft),
            raised_from: None,
        }
    }

    #[test]
    fn cap_leaves_room_for_the_process_itself() {
        assert_eq!(connection_cap(1024, 2), 1024 - 64 - 8);
        assert_eq!(connection_cap(10, 4), 0);
    }

    #[test]
    fn warns_only_below_max_connections() {
        let w = warn_if_capped(&nofile(1024), 100_000, 2);
        assert!(
            w.iter()
                .any(|w| w.contains("caps connections at about 952") && w.contains("100000")),
            "{w:?}"
        );
        let w = warn_if_capped(&nofile(1 << 20), 1000, 2);
        assert!(!w.iter().any(|w| w.contains("RLIMIT_NOFILE")), "{w:?}");
        let unlimited = Nofile {
            soft: None,
            hard: None,
            raised_from: None,
        };
        assert!(
            !warn_if_capped(&unlimited, usize::MAX, 2)
                .iter()
                .any(|w| w.contains("RLIMIT_NOFILE"))
        );
    }
}
