//! The systemd notification protocol (sd_notify(3)): readiness, reloads, stopping, status and
//! watchdog keep-alives, sent as datagrams to `$NOTIFY_SOCKET`.
//!
//! Hand-written rather than a crate: the protocol is one `sendto` of `KEY=VALUE` lines to a Unix
//! datagram socket, which the standard library covers (abstract addresses included), so a crate
//! would add a dependency for twenty lines. Without `$NOTIFY_SOCKET` (not started by systemd with
//! `Type=notify`) every call does nothing.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`. A value that is not a usable address is logged and ignored: the
    /// server runs the same without a supervisor.
    pub fn from_env() -> Self {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self { target: None };
        };
        let target = socket_addr(value.as_encoded_bytes())
            .and_then(|addr| Ok((UnixDatagram::unbound()?, addr)));
        match target {
            Ok(target) => Self {
                target: Some(target),
            },
            Err(e) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET is unusable; not notifying systemd");
                Self { target: None }
            }
        }
    }

    /// Sends one notification (`KEY=VALUE` lines). Failures are logged, never fatal: a
    /// supervisor that has gone away must not take the server with it.
    pub fn notify(&self, state: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }

    /// `READY=1`: serving. Also ends a reload.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1`, with the `MONOTONIC_USEC` that `Type=notify-reload` (systemd 253+)
    /// requires; `ready` ends it.
    pub fn reloading(&self) {
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration",
            monotonic_usec()
        ));
    }

    /// `STOPPING=1`: draining.
    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={status}"));
    }

    /// `WATCHDOG=1`: the keep-alive that `WatchdogSec=` expects.
    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }
}

/// `@name` is an abstract socket (a leading NUL on the wire), anything else a path.
fn socket_addr(value: &[u8]) -> io::Result<SocketAddr> {
    match value {
        [] => Err(io::Error::new(io::ErrorKind::InvalidInput, "empty")),
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        [b'/', ..] => {
            let path = std::str::from_utf8(value)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not UTF-8"))?;
            SocketAddr::from_pathname(path)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither an absolute path nor @abstract",
        )),
    }
}

/// The interval at which to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled(3)
/// advises, when systemd asked this process (`$WATCHDOG_PID`, when set, must be ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?;
    watchdog_interval_from(&usec, std::env::var("WATCHDOG_PID").ok().as_deref())
}

fn watchdog_interval_from(usec: &str, pid: Option<&str>) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = usec.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_paths_or_abstract() {
        let a = socket_addr(b"/run/systemd/notify").unwrap();
        assert_eq!(
            a.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let a = socket_addr(b"@wse/notify").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"wse/notify"[..]));
        assert!(socket_addr(b"").is_err());
        assert!(socket_addr(b"relative").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_and_for_this_process_only() {
        let me = std::process::id().to_string();
        assert_eq!(
            watchdog_interval_from("10000000", None),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            watchdog_interval_from("10000000", Some(&me)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(watchdog_interval_from("10000000", Some("1")), None);
        assert_eq!(watchdog_interval_from("0", None), None);
        assert_eq!(watchdog_interval_from("soon", None), None);
    }

    #[test]
    fn notifications_arrive_as_one_datagram() {
        let dir = std::env::temp_dir().join(format!("wse-notify-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
        };
        n.ready("serving");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        n.reloading();
        let len = listener.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
