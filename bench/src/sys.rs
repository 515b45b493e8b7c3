//! The operating system seen from the load generator: file-descriptor limits, `/proc` readers
//! (server RSS and CPU, our own CPU, kernel socket memory), source-address pools, outgoing
//! sockets, and the environment description stamped on every JSON result.
//!
//! Never: keeps state. Every reader returns `None` (or an empty figure) rather than failing a
//! run when `/proc` lacks what it looks for, so a missing `--server-pid` only costs figures.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use anyhow::{Context, bail};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};

/// Most addresses a `--source` range may expand to; a typo like `127.0.0.2-127.1.0.0` would
/// otherwise allocate a huge pool silently.
const SOURCE_POOL_MAX: u32 = 65_536;

/// Raises RLIMIT_NOFILE's soft limit to the hard limit and returns the new soft limit.
/// Each connection costs one descriptor; the rest of the process needs a few dozen.
pub fn raise_nofile_limit() -> u64 {
    let lim = getrlimit(Resource::Nofile);
    if let Some(max) = lim.maximum
        && lim.current != Some(max)
    {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Descriptors kept free for everything that is not a benchmark connection (stdio, epoll,
/// eventfds, `/proc` reads, publisher sockets).
pub const NOFILE_RESERVE: u64 = 64;

/// Parses `--source`: a comma-separated list of IPv4/IPv6 addresses and inclusive IPv4 ranges
/// `A-B`, e.g. `127.0.0.2-127.0.0.250,10.0.0.5`. Empty input gives an empty pool (the kernel
/// picks the source address).
///
/// # Errors
/// A malformed address, a range going backwards or crossing address families, or a pool
/// larger than 65 536 addresses.
pub fn parse_source_pool(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut pool = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once('-') {
            None => pool.push(
                item.parse::<IpAddr>()
                    .with_context(|| format!("bad source address {item:?}"))?,
            ),
            Some((a, b)) => {
                let a: Ipv4Addr = a
                    .trim()
                    .parse()
                    .with_context(|| format!("bad range start in {item:?}"))?;
                let b: Ipv4Addr = b
                    .trim()
                    .parse()
                    .with_context(|| format!("bad range end in {item:?} (ranges are IPv4 only)"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a {
                    bail!("source range {item:?} goes backwards");
                }
                if b - a >= SOURCE_POOL_MAX {
                    bail!("source range {item:?} is larger than {SOURCE_POOL_MAX} addresses");
                }
                pool.extend((a..=b).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))));
            }
        }
        if pool.len() > SOURCE_POOL_MAX as usize {
            bail!("source pool larger than {SOURCE_POOL_MAX} addresses");
        }
    }
    Ok(pool)
}

/// Opens a TCP connection to `addr`, bound to `source` (any port) when given.
///
/// With a source address the socket gets `IP_BIND_ADDRESS_NO_PORT` before `bind`, so the
/// kernel picks the port at `connect` time from the full 4-tuple space instead of reserving a
/// port per source address at `bind` (measured here: 99k connections took 47 s without it and
/// 22 s with it; 300k stalled). Nagle is off: requests are small and latency is the product.
///
/// # Errors
/// Socket creation, bind or connect failure.
pub async fn connect_tcp(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        set_bind_address_no_port(&socket)?;
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}

/// `setsockopt(IP_BIND_ADDRESS_NO_PORT, 1)`. Neither socket2 nor rustix wraps this option,
/// hence the one `unsafe` call of the crate.
fn set_bind_address_no_port(socket: &TcpSocket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the descriptor is a live socket owned by `socket` for the whole call; the option
    // value points to a c_int on our stack and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Resident set size of process `pid` (`VmRSS` in `/proc/<pid>/status`), bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system) of a process or thread, seconds, from a `/proc/.../stat` path:
/// `/proc/<pid>/stat`, `/proc/self/stat` or `/proc/self/task/<tid>/stat`.
pub fn cpu_seconds(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // The command name (field 2) may contain spaces and parentheses; fields after the last ')'
    // are plain. utime and stime are fields 14 and 15, i.e. 12th and 13th after field 2.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// CPU seconds of process `pid`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds of this whole process (every thread).
pub fn self_cpu_seconds() -> f64 {
    cpu_seconds("/proc/self/stat").unwrap_or(0.0)
}

/// The calling thread's kernel id, read from the `/proc/thread-self` link (`<pid>/task/<tid>`),
/// so another thread can later read its CPU time.
pub fn current_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// CPU seconds of one of our threads.
pub fn thread_cpu_seconds(tid: u32) -> Option<f64> {
    cpu_seconds(&format!("/proc/self/task/{tid}/stat"))
}

/// Kernel TCP socket figures from `/proc/net/sockstat`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SockStat {
    pub tcp_inuse: u64,
    pub tcp_orphan: u64,
    pub tcp_time_wait: u64,
    pub tcp_alloc: u64,
    /// Pages charged to TCP socket buffers (`mem`), times 4096.
    pub tcp_mem_bytes: u64,
}

/// Reads `/proc/net/sockstat`; zeros when unreadable.
pub fn sockstat() -> SockStat {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    parse_sockstat(&text)
}

fn parse_sockstat(text: &str) -> SockStat {
    let mut s = SockStat::default();
    let Some(line) = text.lines().find(|l| l.starts_with("TCP:")) else {
        return s;
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    for pair in words[1..].chunks(2) {
        let [key, value] = pair else { continue };
        let value: u64 = value.parse().unwrap_or(0);
        match *key {
            "inuse" => s.tcp_inuse = value,
            "orphan" => s.tcp_orphan = value,
            "tw" => s.tcp_time_wait = value,
            "alloc" => s.tcp_alloc = value,
            // The kernel counts TCP memory in pages of 4 KiB on every architecture we run on.
            "mem" => s.tcp_mem_bytes = value * 4096,
            _ => {}
        }
    }
    s
}

/// What machine and build produced a result; stamped on every JSON file.
#[derive(Clone, Debug, Serialize)]
pub struct Environment {
    pub wse_bench_version: &'static str,
    pub cpu_model: String,
    /// Cores this process may run on (its affinity mask, e.g. after `taskset`).
    pub cores_usable: usize,
    /// Cores online in the machine.
    pub cores_online: usize,
    pub kernel: String,
    pub nofile_limit: u64,
    pub timestamp_unix_s: u64,
}

impl Environment {
    pub fn read(nofile_limit: u64) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, m)| m.trim().to_owned());
        let cores_online = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
        Self {
            wse_bench_version: env!("CARGO_PKG_VERSION"),
            cpu_model,
            cores_usable: usable_cores(),
            cores_online,
            kernel,
            nofile_limit,
            timestamp_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// Cores in this process's affinity mask (what `taskset` left us).
pub fn usable_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ranges_expand_inclusively() {
        let pool = parse_source_pool("127.0.0.2-127.0.0.4, 10.0.0.1").unwrap();
        let want: Vec<IpAddr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "10.0.0.1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(pool, want);
        assert!(parse_source_pool("").unwrap().is_empty());
        assert_eq!(parse_source_pool("::1").unwrap().len(), 1);
        // Ranges crossing an octet boundary.
        assert_eq!(parse_source_pool("10.0.0.250-10.0.1.5").unwrap().len(), 12);
    }

    #[test]
    fn source_ranges_reject_nonsense() {
        assert!(parse_source_pool("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_pool("127.0.0.1-::1").is_err());
        assert!(parse_source_pool("10.0.0.0-10.2.0.0").is_err());
        assert!(parse_source_pool("localhost").is_err());
    }

    #[test]
    fn sockstat_parses_tcp_line() {
        let text =
            "sockets: used 300\nTCP: inuse 12 orphan 1 tw 40 alloc 15 mem 7\nUDP: inuse 1 mem 0\n";
        let s = parse_sockstat(text);
        assert_eq!(s.tcp_inuse, 12);
        assert_eq!(s.tcp_orphan, 1);
        assert_eq!(s.tcp_time_wait, 40);
        assert_eq!(s.tcp_alloc, 15);
        assert_eq!(s.tcp_mem_bytes, 7 * 4096);
    }

    #[test]
    fn proc_readers_see_ourselves() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        assert!(process_cpu_seconds(std::process::id()).is_some());
        let tid = current_tid().unwrap();
        assert!(thread_cpu_seconds(tid).is_some());
    }
}
