//! The real binary's command line: configuration precedence, `--print-config`, `--help` and
//! the one-line errors with exit status 2. No test starts a server.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use wse_shards::Config;

/// A directory of its own per test (pid + name), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("wse-cli-it-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary with no `WSE_*` variables inherited, so the caller's environment cannot leak in.
fn wse_server() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wse-server"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WSE_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the wse-server binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn printed_config(out: &Output) -> Config {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(out));
    toml::from_str(&stdout(out)).expect("--print-config prints valid TOML")
}

/// Exit status 2 and exactly one line on stderr, prefixed as main prints it; returns the line.
fn config_error(out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(out));
    assert_eq!(err.lines().count(), 1, "stderr is not one line: {err:?}");
    assert!(err.ends_with('\n'), "{err:?}");
    assert!(err.starts_with("wse-server: "), "{err:?}");
    err.trim_end().to_owned()
}

#[test]
fn print_config_without_arguments_prints_the_defaults() {
    let out = run(wse_server().arg("--print-config"));
    assert_eq!(printed_config(&out), Config::default());
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn flags_beat_environment_beats_file() {
    let dir = TempDir::new("precedence");
    let file = dir.file(
        "wse.toml",
        "[server]\ncores = 3\n\n[protocol]\nidle_timeout = \"90s\"\nping_interval = \"20s\"\n",
    );
    let out = run(wse_server()
        .args(["--print-config", "--cores", "1"])
        .arg("--config")
        .arg(&file)
        .env("WSE_IDLE_TIMEOUT", "70s")
        .env("WSE_CORES", "2"));
    let cfg = printed_config(&out);
    assert_eq!(cfg.server.cores, 1, "flag over environment and file");
    assert_eq!(
        cfg.protocol.idle_timeout,
        Duration::from_secs(70),
        "environment over file"
    );
    assert_eq!(
        cfg.protocol.ping_interval,
        Duration::from_secs(20),
        "file over defaults"
    );
    assert_eq!(cfg.limits, Config::default().limits, "defaults elsewhere");
}

#[test]
fn environment_names_the_file_and_sets_every_kind_of_value() {
    let dir = TempDir::new("environment");
    let file = dir.file(
        "wse.toml",
        "[server]\necho_path = \"/echo\"\n\n[auth]\naudience = [\"x\"]\n",
    );
    let out = run(wse_server()
        .arg("--print-config")
        .env("WSE_CONFIG", &file)
        .env("WSE_PIN_THREADS", "false")
        .env("WSE_AUTH_DEFAULT_PUBLISH", "news.*,chat.*")
        .env("WSE_AUTH_AUDIENCE", "")
        .env("WSE_ECHO_PATH", "")
        .env("WSE_PING_INTERVAL", "1500ms")
        .env("WSE_LOG_LEVEL", "debug"));
    let cfg = printed_config(&out);
    assert!(!cfg.server.pin_threads);
    assert_eq!(cfg.auth.default_publish, ["news.*", "chat.*"]);
    assert!(
        cfg.auth.audience.is_empty(),
        "an empty variable empties the file's list"
    );
    assert_eq!(
        cfg.server.echo_path, None,
        "an empty variable unsets the file's value"
    );
    assert_eq!(cfg.protocol.ping_interval, Duration::from_millis(1500));
    assert_eq!(cfg.log.level, "debug");
}

#[test]
fn unknown_key_in_the_file_is_one_line_and_exit_2() {
    let dir = TempDir::new("unknown_key");
    let file = dir.file("wse.toml", "[protocol]\nidel_timeout = \"90s\"\n");
    let out = run(wse_server()
        .arg("--print-config")
        .arg("--config")
        .arg(&file));
    let line = config_error(&out);
    assert!(line.contains("wse.toml"), "{line}");
    assert!(line.contains("idel_timeout"), "{line}");
}

#[test]
fn unreadable_file_is_one_line_and_exit_2() {
    let dir = TempDir::new("unreadable");
    let out = run(wse_server()
        .arg("--print-config")
        .arg("--config")
        .arg(dir.0.join("absent.toml")));
    let line = config_error(&out);
    assert!(line.contains("absent.toml"), "{line}");
}

#[test]
fn invalid_relation_is_one_line_naming_the_key() {
    let out = run(wse_server().args([
        "--print-config",
        "--idle-timeout",
        "10s",
        "--ping-interval",
        "20s",
    ]));
    let line = config_error(&out);
    assert!(line.contains("protocol.idle_timeout"), "{line}");
}

#[test]
fn bad_environment_value_is_exit_2() {
    let out = run(wse_server()
        .arg("--print-config")
        .env("WSE_MAX_MESSAGE_SIZE", "lots"));
    let line = config_error(&out);
    assert!(line.contains("lots"), "{line}");
    assert!(line.contains("WSE_MAX_MESSAGE_SIZE"), "{line}");
}

#[test]
fn help_documents_flags_units_and_defaults() {
    let out = run(wse_server().arg("--help"));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let help = stdout(&out);
    for needle in [
        "--cores <N>",
        "--listen <ADDR>",
        "--max-connections <N>",
        "--idle-timeout <DURATION>",
        "--ping-interval <DURATION>",
        "--max-message-size <BYTES>",
        "--max-outbound-queue-bytes <BYTES>",
        "--rate-limit-capacity <MESSAGES>",
        "--echo-path <PATH>",
        "--auth-enabled <BOOL>",
        "--auth-secret <SECRET>",
        "--auth-algorithm <ALG>",
        "--control-listen <ADDR>",
        "--control-enabled <BOOL>",
        "--api-key <KEY>",
        "--log-level <FILTER>",
        "--config <FILE>",
        "--print-config",
        "bytes",
        "messages per second",
        "[default: 25s]",
        "WSE_IDLE_TIMEOUT",
        "WSE_CONFIG",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

#[test]
fn version_exits_0() {
    let out = run(wse_server().arg("--version"));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        stdout(&out).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        stdout(&out)
    );
}

#[test]
fn print_config_redacts_secrets_unless_asked() {
    let secret = "hs256-secret-0123456789abcdef-0123456789";
    let api_key = "api-key-0123456789abcdef";
    let args = [
        "--print-config",
        "--auth-enabled",
        "true",
        "--auth-secret",
        secret,
        "--auth-previous-secret",
        "previous-secret-0123456789abcdef-0123",
        "--api-key",
        api_key,
        "--events-webhook-url",
        "http://hook:hook-password@127.0.0.1:9/events",
    ];
    let out = run(wse_server().args(args));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    for leaked in [secret, api_key, "previous-secret", "hook-password"] {
        assert!(!text.contains(leaked), "{leaked} printed:\n{text}");
    }
    let cfg: Config = toml::from_str(&text).expect("still valid TOML");
    assert_eq!(cfg.auth.secret.as_deref(), Some("<redacted>"));
    assert_eq!(cfg.control.api_key.as_deref(), Some("<redacted>"));
    assert_eq!(
        cfg.events.webhook_url.as_deref(),
        Some("http://hook:<redacted>@127.0.0.1:9/events")
    );
    assert!(cfg.auth.enabled, "the rest is printed as it is");

    let out = run(wse_server().args(args).arg("--show-secrets"));
    let cfg = printed_config(&out);
    assert_eq!(cfg.auth.secret.as_deref(), Some(secret));
    assert_eq!(cfg.control.api_key.as_deref(), Some(api_key));

    // --show-secrets means nothing alone.
    let out = run(wse_server().arg("--show-secrets"));
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
}

#[test]
fn help_names_the_reference_config_and_its_generator() {
    let out = run(wse_server().arg("--help"));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let help = stdout(&out);
    for needle in [
        "--print-config-example",
        "deploy/wse.toml",
        "--show-secrets",
        "--control-header-timeout <DURATION>",
        "--events-consumer-queue-bytes <BYTES>",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}
