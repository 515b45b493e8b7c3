//! Operating the binary on a host: the systemd units, the reference configuration, the systemd
//! notifications, reloading on SIGHUP, the start-up limit check and the tuning scripts.

mod support;

use std::io::Read;
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{
    Wse, close_code, frames_until_close, raw_upgrade, rss_bytes, server_frames, token_signed,
};
use wse_shards::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_wse-server");
/// Bound on every wait for the server to do something.
const WAIT: Duration = Duration::from_secs(20);

/// A directory of its own per test (pid + name), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("wse-ops-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path(relative: &str) -> PathBuf {
    Path::new(ROOT).join(relative)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The binary with no `WSE_*` variables inherited, so the caller's environment cannot leak in.
fn wse_server() -> Command {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WSE_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the command runs")
}

/// Fails (never skips) when a tool a test needs is missing, naming the Debian install command
/// (`.ci/run` installs these on a fresh machine).
fn require_tool(tool: &str, install: &str) {
    let found = Command::new(tool).arg("--version").output().is_ok();
    assert!(found, "{tool} is not installed; install it with: {install}");
}

// ------------------------------------------------------------------------------------------------
// deploy/
// ------------------------------------------------------------------------------------------------

/// `systemd-analyze verify` on both units and the example drop-in. It insists that `ExecStart=`
/// names an existing executable, so the copies verified here name the binary under test instead
/// of /usr/local/bin/wse-server; every other line is verbatim. It reports most problems (unknown
/// keys, bad values) as warnings with status 0, so the test requires silence.
#[test]
fn units_pass_systemd_analyze_verify() {
    require_tool("systemd-analyze", "apt-get install -y systemd");
    let dir = TempDir::new("units");
    for entry in std::fs::read_dir(path("deploy")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".service") {
            let unit = std::fs::read_to_string(entry.path()).unwrap();
            assert!(
                unit.contains("ExecStart=/usr/local/bin/wse-server "),
                "{name}"
            );
            let unit = unit.replace("/usr/local/bin/wse-server", BIN);
            std::fs::write(dir.0.join(&name), unit).unwrap();
        } else if name.ends_with(".service.d") {
            std::fs::create_dir_all(dir.0.join(&name)).unwrap();
            for conf in std::fs::read_dir(entry.path()).unwrap() {
                let conf = conf.unwrap();
                std::fs::copy(conf.path(), dir.0.join(&name).join(conf.file_name())).unwrap();
            }
        }
    }
    for unit in [
        "wse-server.service",
        "wse-server@.service",
        "wse-server@node0.service",
    ] {
        let out = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.0.join(unit))
            .current_dir(&dir.0));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify {unit}: {}\n{}",
            out.status,
            text(&out.stderr)
        );
    }
}

/// What the issue asks of the units, and the one relation between a unit and the configuration:
/// systemd must not kill a draining server.
#[test]
fn units_are_hardened_and_outlast_the_drain() {
    for unit in ["wse-server.service", "wse-server@.service"] {
        let text = std::fs::read_to_string(path("deploy").join(unit)).unwrap();
        let value = |key: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("{unit}: no {key}="))
                .to_owned()
        };
        for (key, want) in [
            ("Type", "notify"),
            ("LimitNOFILE", "1048576"),
            ("LimitMEMLOCK", "infinity"),
            ("Restart", "on-failure"),
            ("KillSignal", "SIGTERM"),
            ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
            ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("User", "wse"),
            ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ] {
            assert_eq!(value(key), want, "{unit}: {key}");
        }
        assert!(value("ExecStart").contains("--config /etc/wse/"), "{unit}");
        // SIGTERM → drain_timeout for the connections, then up to 5 s more to stop.
        let stop = humantime::parse_duration(&value("TimeoutStopSec")).unwrap();
        let drain = Config::default().server.drain_timeout;
        assert!(
            stop > drain + Duration::from_secs(5),
            "{unit}: TimeoutStopSec {stop:?} vs drain {drain:?}"
        );
        let watchdog = humantime::parse_duration(&value("WatchdogSec")).unwrap();
        assert!(watchdog >= Duration::from_secs(2), "{unit}");
    }
}

/// `deploy/wse.toml` is what the binary generates from the configuration struct, and reading it
/// gives the defaults. `WSE_BLESS=1` rewrites it.
#[test]
fn example_config_is_current_and_gives_the_defaults() {
    let out = run(wse_server().arg("--print-config-example"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let generated = text(&out.stdout);
    let file = path("deploy/wse.toml");
    if std::env::var_os("WSE_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&file, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&file).unwrap();
    assert!(
        committed == generated,
        "deploy/wse.toml is stale; regenerate it with: WSE_BLESS=1 cargo test --test ops example_config"
    );
    assert_eq!(
        toml::from_str::<Config>(&committed).unwrap(),
        Config::default()
    );
    let out = run(wse_server()
        .arg("--config")
        .arg(&file)
        .arg("--print-config"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        toml::from_str::<Config>(&text(&out.stdout)).unwrap(),
        Config::default()
    );
}

// ------------------------------------------------------------------------------------------------
// sd_notify
// ------------------------------------------------------------------------------------------------

/// Receives notifications until one starts with `prefix`; returns it.
fn expect_notification(socket: &UnixDatagram, prefix: &str) -> String {
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let Ok(n) = socket.recv(&mut buf) else { break };
        let message = text(&buf[..n]);
        if message.starts_with(prefix) {
            return message;
        }
        seen.push(message);
    }
    panic!("no {prefix} notification; received {seen:?}");
}

/// The fake systemd: a datagram socket at a path, as NOTIFY_SOCKET usually names.
#[test]
fn notifies_ready_watchdog_reload_and_stopping() {
    let dir = TempDir::new("notify");
    let socket_path = dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut wse = Wse::start_env(
        &["--cores", "2"],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            // 200 ms: a keep-alive every 100 ms.
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let ready = expect_notification(&socket, "READY=1");
    assert!(
        ready.contains(&format!("STATUS=serving ws={} shards=2", wse.ws)),
        "{ready}"
    );
    expect_notification(&socket, "WATCHDOG=1");
    expect_notification(&socket, "WATCHDOG=1");

    wse.sighup();
    let reloading = expect_notification(&socket, "RELOADING=1");
    assert!(reloading.contains("\nMONOTONIC_USEC="), "{reloading}");
    let ready = expect_notification(&socket, "READY=1");
    assert!(ready.contains("configuration reloaded"), "{ready}");

    wse.sigterm();
    let stopping = expect_notification(&socket, "STOPPING=1");
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
    let status = wse.wait_exit(WAIT).expect("exits after the drain");
    assert!(status.success(), "{status}");
}

/// systemd's own socket is abstract (`@/org/freedesktop/systemd1/notify/...`).
#[test]
fn notify_socket_may_be_abstract() {
    let name = format!("wse-ops-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    let _wse = Wse::start_env(&[], &[("NOTIFY_SOCKET", &format!("@{name}"))]);
    expect_notification(&socket, "READY=1");
}

// ------------------------------------------------------------------------------------------------
// SIGHUP
// ------------------------------------------------------------------------------------------------

/// Upgrades with `token` and reads the first frame: `server_ready` (true) or the
/// authentication error (false).
fn authenticates(addr: SocketAddr, token: &str) -> bool {
    let (mut s, mut buf) = raw_upgrade(addr, "/wse", &format!("Authorization: Bearer {token}\r\n"));
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((_, payload)) = server_frames(&buf).first() {
            let first = text(payload);
            if first.contains("\"server_ready\"") {
                return true;
            }
            assert!(first.contains("AUTH_FAILED"), "first frame: {first}");
            return false;
        }
        let n = s.read(&mut chunk).expect("a first frame in time");
        assert!(n > 0, "closed before the first frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The rotation an operator does: sign new tokens with key B while A is still accepted (A as
/// `previous_secret`), then, once A's tokens have expired, drop A. Along the way: a key that
/// needs a restart is reported and kept, a broken file is refused whole, and a protocol limit
/// changes live.
#[test]
fn sighup_rotates_the_jwt_key() {
    const KEY_A: &str = "key-a-0123456789abcdef0123456789abcdef";
    const KEY_B: &str = "key-b-0123456789abcdef0123456789abcdef";
    let dir = TempDir::new("rotation");
    let file = dir.0.join("wse.toml");
    let write = |rest: &str| {
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncores = 2\ndrain_timeout = \"3s\"\n\n\
             [control]\nlisten = \"127.0.0.1:0\"\n\n[auth]\nenabled = true\n{rest}"
        );
        std::fs::write(&file, config).unwrap();
    };
    write(&format!("secret = \"{KEY_A}\"\n"));
    // No --auth-secret flag: flags would override the file on every reload too.
    let wse = Wse::start_raw(&["--config", file.to_str().unwrap()]);
    let (a, b) = (token_signed(KEY_A, "alice"), token_signed(KEY_B, "bob"));
    assert!(authenticates(wse.ws, &a));
    assert!(!authenticates(wse.ws, &b));

    write(&format!(
        "secret = \"{KEY_B}\"\nprevious_secret = \"{KEY_A}\"\n\n[limits]\nfabric_queue_capacity = 128\n"
    ));
    wse.sighup();
    assert!(
        wse.wait_log("configuration reloaded", 1, WAIT),
        "{}",
        wse.log()
    );
    assert!(authenticates(wse.ws, &b), "the new key signs");
    assert!(authenticates(wse.ws, &a), "the previous key still verifies");
    assert!(
        wse.log()
            .contains("limits.fabric_queue_capacity changed, but takes effect only at a restart"),
        "{}",
        wse.log()
    );

    write("secret = \"too short\"\n");
    wse.sighup();
    assert!(wse.wait_log("reload refused", 1, WAIT), "{}", wse.log());
    assert!(wse.log().contains("auth.secret: must be at least 32 bytes"));
    assert!(
        authenticates(wse.ws, &a),
        "a refused reload changes nothing"
    );
    assert!(authenticates(wse.ws, &b));

    write(&format!(
        "secret = \"{KEY_B}\"\n\n[protocol]\nping_interval = \"100ms\"\nidle_timeout = \"400ms\"\n"
    ));
    wse.sighup();
    assert!(
        wse.wait_log("configuration reloaded", 2, WAIT),
        "{}",
        wse.log()
    );
    assert!(!authenticates(wse.ws, &a), "the previous key is gone");
    let (mut s, _) = raw_upgrade(wse.ws, "/wse", &format!("Authorization: Bearer {b}\r\n"));
    let frames = frames_until_close(&mut s, Duration::from_secs(10));
    assert_eq!(
        close_code(&frames),
        Some(4408),
        "the reloaded idle timeout closes a silent connection"
    );
}

// ------------------------------------------------------------------------------------------------
// Start-up: memory, and a start that fails half way
// ------------------------------------------------------------------------------------------------

/// Resident memory right after the ready line, with the default configuration, stays flat as
/// shards are added: the fabric's N² queues are allocated but not touched (it was 398 MB at 16
/// shards and 5 GB at 64 when they were, through huge pages), and the start-up log states the
/// fabric's budget.
#[test]
fn resident_memory_at_start_stays_flat_in_shards() {
    const MIB: u64 = 1 << 20;
    for (cores, ceiling) in [(16, 64 * MIB), (64, 256 * MIB)] {
        let mut wse = Wse::start(&["--cores", &cores.to_string()]);
        let rss = rss_bytes(wse.pid()).expect("VmRSS in /proc/<pid>/status");
        assert!(
            rss <= ceiling,
            "--cores {cores}: {} MiB resident after start, above {} MiB",
            rss / MIB,
            ceiling / MIB
        );
        let participants = format!("fabric: {} participants", cores + 2);
        assert!(wse.wait_log(&participants, 1, WAIT), "{}", wse.log());
        assert!(wse.log().contains("MiB in flight per participant"));
        wse.sigterm();
        assert!(wse.wait_exit(WAIT).is_some_and(|s| s.success()));
    }
}

/// The control port is taken: the shards have started by the time the control plane binds. The
/// process stops them, says why in one line and exits 1, promptly.
#[test]
fn control_port_taken_after_the_shards_started_exits_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = wse_server()
        .args(["--cores", "4", "--listen", "127.0.0.1:0"])
        .args(["--control-listen", &addr])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            panic!("still running {WAIT:?} after start with the control port taken");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?} to give up",
        started.elapsed()
    );
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "stderr: {err}");
    assert!(out.is_empty(), "no ready line: {out}");
    // The shards had started (the fabric's line is logged before the first one).
    assert!(err.contains("fabric: 6 participants"), "{err}");
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("wse-server:"))
        .collect();
    assert_eq!(ours.len(), 1, "one error line: {err}");
    assert!(
        ours[0].contains("control plane") && ours[0].contains(&addr),
        "{}",
        ours[0]
    );
    assert!(!err.contains("panicked") && !err.contains("ERROR"), "{err}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the process is gone"
    );
}

// ------------------------------------------------------------------------------------------------
// Start-up limit check
// ------------------------------------------------------------------------------------------------

/// Started from a shell with RLIMIT_NOFILE lowered (soft 1024, hard at most 4096): the server
/// raises its soft limit to the hard one, and warns when that still caps max_connections,
/// stating the cap.
#[test]
fn start_up_warns_when_rlimit_nofile_caps_max_connections() {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX).min(4096);
    assert!(
        hard >= 1024,
        "RLIMIT_NOFILE hard limit {hard} is below 1024: raise it (e.g. `ulimit -Hn 4096` as root) \
         to run this test"
    );
    let start = |max_connections: &str| {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!(
                "ulimit -Sn 1024 && ulimit -Hn {hard} && exec \"$0\" \"$@\""
            ))
            .args([
                BIN,
                "--listen",
                "127.0.0.1:0",
                "--control-enabled",
                "false",
                "--cores",
                "1",
                "--max-connections",
                max_connections,
            ])
            .env("RUST_LOG", "info");
        Wse::start_command(cmd)
    };

    let wse = start("100000");
    assert!(wse.wait_log("wse-server ready", 1, WAIT), "{}", wse.log());
    let log = wse.log();
    if hard > 1024 {
        assert!(
            log.contains(&format!(
                "raised the soft RLIMIT_NOFILE from 1024 to the hard limit, {hard}"
            )),
            "{log}"
        );
    }
    // 64 descriptors for the process, 4 for its one shard.
    let cap = hard - 68;
    assert!(
        log.contains(&format!(
            "RLIMIT_NOFILE is {hard} open files, which caps connections at about {cap}, below \
             server.max_connections = 100000"
        )),
        "{log}"
    );
    drop(wse);

    let wse = start("500");
    assert!(wse.wait_log("wse-server ready", 1, WAIT), "{}", wse.log());
    assert!(!wse.log().contains("caps connections"), "{}", wse.log());
}

// ------------------------------------------------------------------------------------------------
// tuning/
// ------------------------------------------------------------------------------------------------

#[test]
fn check_host_prints_each_limit_and_changes_nothing() {
    let out = run(Command::new(path("tuning/check-host")).args(["--connections", "1000000"]));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("ALLOWS (connections)"), "{stdout}");
    for row in [
        "RLIMIT_NOFILE",
        "fs.nr_open",
        "fs.file-max",
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.ipv4.tcp_mem",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "net.core.netdev_budget",
        "net.ipv4.tcp_migrate_req",
        "kernel memory per socket",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(row)),
            "no {row} row:\n{stdout}"
        );
    }
    let off = stdout.contains("\noff for 1000000 connections: ");
    assert!(off || stdout.contains("\nnothing off"), "{stdout}");
    // --strict fails exactly when something is off.
    let strict = run(Command::new(path("tuning/check-host")).arg("--strict"));
    assert_eq!(strict.status.code(), Some(if off { 1 } else { 0 }));
    let bad = run(Command::new(path("tuning/check-host")).arg("--connections"));
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn irq_affinity_is_a_dry_run_by_default() {
    let script = path("tuning/irq-affinity");
    let help = run(Command::new(&script).arg("--help"));
    assert!(help.status.success());
    assert!(text(&help.stdout).contains("--apply"));
    let missing = run(Command::new(&script).arg("no-such-interface0"));
    assert_eq!(missing.status.code(), Some(2));
    let bad_cpus = run(Command::new(&script).args(["--cpus", "x", "lo"]));
    assert_eq!(bad_cpus.status.code(), Some(2));
    // Any interface backed by a device: a plan (or no IRQs to plan for), never a change.
    for entry in std::fs::read_dir("/sys/class/net").into_iter().flatten() {
        let entry = entry.unwrap();
        if !entry.path().join("device").exists() {
            continue;
        }
        let iface = entry.file_name().to_string_lossy().into_owned();
        let out = run(Command::new(&script).args(["--cpus", "0", &iface]));
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        match out.status.code() {
            Some(0) => assert!(stdout.contains("dry run: nothing changed"), "{stdout}"),
            Some(1) => assert!(stderr.contains("no IRQs found"), "{stderr}"),
            other => panic!("{iface}: {other:?}\n{stdout}\n{stderr}"),
        }
    }
}

#[test]
fn scripts_pass_shellcheck() {
    require_tool("shellcheck", "apt-get install -y shellcheck");
    let out = run(Command::new("shellcheck")
        .arg(path("tuning/check-host"))
        .arg(path("tuning/irq-affinity")));
    assert!(out.status.success(), "{}", text(&out.stdout));
}

/// Every setting the issue lists is there, each under a comment saying why and what it costs,
/// and every line is one `sysctl.d` assignment.
#[test]
fn sysctl_file_sets_every_key_with_a_reason() {
    let file = std::fs::read_to_string(path("tuning/sysctl.d/60-wse.conf")).unwrap();
    let mut keys = Vec::new();
    let mut previous = "";
    let mut previous_assigns = false;
    for line in file.lines() {
        let trimmed = line.trim();
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            let (key, value) = trimmed
                .split_once('=')
                .unwrap_or_else(|| panic!("not an assignment: {line}"));
            let key = key.trim().trim_start_matches('-');
            assert!(
                key.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                "{line}"
            );
            assert!(!value.trim().is_empty(), "{line}");
            // Related keys may share the comment above the first of them.
            assert!(
                previous.starts_with('#') || previous_assigns,
                "{key} has no comment above it"
            );
            keys.push(key.to_owned());
        }
        previous_assigns = !trimmed.is_empty() && !trimmed.starts_with('#');
        previous = trimmed;
    }
    for key in [
        "fs.nr_open",
        "fs.file-max",
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_mem",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "net.core.netdev_budget",
        "net.ipv4.tcp_migrate_req",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing");
    }
}

#[test]
fn listeners_take_host_names_and_log_what_they_resolved_to() {
    let wse = Wse::start_raw(&[
        "--listen",
        "localhost:0",
        "--control-listen",
        "localhost:0",
        "--auth-enabled",
        "true",
        "--auth-secret",
        support::SECRET,
    ]);
    assert!(wse.ws.ip().is_loopback(), "{}", wse.ws);
    assert!(wse.control.is_some_and(|c| c.ip().is_loopback()));
    let log = wse.log();
    assert!(
        log.contains("server.listen: localhost:0 resolved to 127.0.0.1:0")
            && log.contains("control.listen: localhost:0 resolved to 127.0.0.1:0"),
        "{log}"
    );
    assert!(authenticates(
        wse.ws,
        &token_signed(support::SECRET, "alice")
    ));
}

/// The claims of a JWT, unverified (the server verifies; this reads what was minted).
fn claims_of(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("header.payload.signature");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// `wse-server token` mints what the same configuration accepts: the secret and issuer from the
/// file the server runs with; a server with another secret refuses it.
#[test]
fn token_subcommand_mints_what_the_server_accepts() {
    let dir = TempDir::new("token");
    let file = dir.0.join("wse.toml");
    std::fs::write(
        &file,
        format!(
            "[auth]\nenabled = true\nsecret = \"{}\"\nissuer = \"wse-dev\"\n",
            support::SECRET
        ),
    )
    .unwrap();
    let out = run(wse_server().args([
        "token",
        "--config",
        file.to_str().unwrap(),
        "--user",
        "alice",
        "--ttl",
        "2h",
        "--topics",
        "chat.*,news",
        "--publish",
        "chat.*",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    assert!(!token.contains(support::SECRET) && !text(&out.stderr).contains(support::SECRET));
    let c = claims_of(&token);
    assert_eq!(c["sub"], "alice");
    assert_eq!(c["iss"], "wse-dev");
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        7200
    );
    assert_eq!(
        c["wse_topics"],
        serde_json::json!({"allow": ["chat.*", "news"]})
    );
    assert_eq!(c["wse_publish"], serde_json::json!({"allow": ["chat.*"]}));

    let wse = Wse::start_raw(&[
        "--config",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--control-listen",
        "127.0.0.1:0",
    ]);
    assert!(authenticates(wse.ws, &token), "{}", wse.log());
    let other = Wse::start_raw(&[
        "--listen",
        "127.0.0.1:0",
        "--auth-enabled",
        "true",
        "--auth-secret",
        "another-secret-0123456789abcdef-xyz",
    ]);
    assert!(!authenticates(other.ws, &token));

    // No secret to sign with: one line naming what to give, exit 2.
    let out = run(wse_server().args(["token", "--user", "alice"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--auth-secret"),
        "{}",
        text(&out.stderr)
    );
}
