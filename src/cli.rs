//! Command line, environment and config file: one effective [`Config`].
//!
//! Precedence: flags > `WSE_*` environment variables > the `--config` TOML file > defaults.
//!
//! Every leaf of [`Config`] has one flag, and each flag's clap id is its dotted TOML key
//! (`protocol.idle_timeout`), so the help can show each default straight from
//! `Config::default()` and a test can check that no key lacks a flag.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use clap::builder::{
    BoolishValueParser, OsStringValueParser, PossibleValuesParser, TypedValueParser,
};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser};
use wse_shards::Config;
use wse_shards::config::{ClusterCompression, ClusterSecurity, JwtAlgorithm};

/// What the command line asked for.
#[derive(Debug)]
pub struct Options {
    /// The effective configuration, validated.
    pub config: Config,
    /// `--print-config`: print the effective configuration as TOML and exit.
    pub print_config: bool,
    /// `--show-secrets`: `--print-config` prints secrets in clear instead of redacted.
    pub show_secrets: bool,
    /// `--print-config-example`: print the reference configuration file and exit.
    pub print_example: bool,
    /// The file the configuration came from, if any.
    pub config_file: Option<PathBuf>,
    /// Listener addresses given as host names, with what each resolved to (logged at start).
    pub resolved: Vec<Resolved>,
}

/// A listener address given as `host:port` and the address it resolved to, once, at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The dotted key: `server.listen` or `control.listen`.
    pub key: &'static str,
    /// As given, e.g. `localhost:5007`.
    pub given: String,
    /// The first address the resolver returned (IPv4 first, as `localhost` usually means it).
    pub addr: SocketAddr,
}

/// A configuration that cannot be used; `Display` is one line naming the key and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

/// Parses the process's flags and environment, reads the config file, merges and validates.
/// (`--help` and `--version` print and exit inside.)
///
/// # Errors
/// Unreadable or invalid file, invalid value, invalid combination.
pub fn parse() -> Result<Options, CliError> {
    parse_from(std::env::args_os())
}

/// [`parse`] with explicit arguments (the first is the program name); `WSE_*` variables still
/// come from the process environment. `--help` and `--version` print and exit the process.
///
/// # Errors
/// As [`parse`]; clap's usage errors come back flattened to one line too.
pub fn parse_from<I, T>(args: I) -> Result<Options, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let matches = command()
        .try_get_matches_from(&args)
        .map_err(|e| usage_error(e, &args))?;
    let matches = without_defaults(matches);
    let cli = Cli::from_arg_matches(&matches).map_err(|e| usage_error(e, &args))?;
    // An empty WSE_CONFIG means no file, like every other empty optional value.
    let config_file = cli.config.filter(|p| !p.as_os_str().is_empty());
    let mut resolved = Vec::new();
    let mut config = match &config_file {
        Some(path) => load_file(path, &mut resolved)?,
        None => Config::default(),
    };
    for (key, flag) in [
        ("server.listen", &cli.flags.server.listen),
        ("control.listen", &cli.flags.control.listen),
    ] {
        if let Some(a) = flag
            && a.given.parse::<SocketAddr>().is_err()
        {
            resolved.retain(|r| r.key != key);
            resolved.push(Resolved {
                key,
                given: a.given.clone(),
                addr: a.addr,
            });
        }
    }
    cli.flags.apply(&mut config);
    config.validate().map_err(|e| CliError(e.to_string()))?;
    Ok(Options {
        config,
        print_config: cli.print_config,
        show_secrets: cli.show_secrets,
        print_example: cli.print_config_example,
        config_file,
        resolved,
    })
}

/// The configuration as TOML, every key present except unset optional keys: TOML has no null,
/// so those are omitted (reading the file back leaves them unset) and listed in the header
/// comment instead. `toml::from_str::<Config>(&render_toml(cfg))` gives back `cfg`.
pub fn render_toml(cfg: &Config) -> String {
    let body = toml::to_string_pretty(cfg)
        .expect("every Config field has a TOML representation (no maps with non-string keys)");
    let mut out =
        String::from("# wse-server effective configuration (wse-server --print-config).\n");
    let unset = unset_keys(cfg);
    if !unset.is_empty() {
        out.push_str("# Unset optional keys, omitted below:\n");
        for key in unset {
            let _ = writeln!(out, "#   {key}");
        }
    }
    out.push('\n');
    out.push_str(&body);
    out
}

/// What a redacted secret prints as.
pub const REDACTED: &str = "<redacted>";

/// `cfg` with every secret replaced by [`REDACTED`], for `--print-config` without
/// `--show-secrets`: the HS256 secrets, the API key, the cluster PSKs, and the password of a
/// webhook URL's `user:password@`. (The public key files are paths, not secrets.) An unset secret stays unset,
/// so the output still says whether one is configured.
pub fn redact_secrets(cfg: &Config) -> Config {
    let mut cfg = cfg.clone();
    let secrets = [
        &mut cfg.auth.secret,
        &mut cfg.auth.previous_secret,
        &mut cfg.control.api_key,
        &mut cfg.cluster.psk,
        &mut cfg.cluster.psk_previous,
    ];
    for secret in secrets.into_iter().flatten() {
        *secret = REDACTED.to_owned();
    }
    if let Some(url) = &mut cfg.events.webhook_url {
        *url = redact_url_password(url);
    }
    cfg
}

/// `scheme://user:password@host/...` → `scheme://user:<redacted>@host/...`; other URLs as given.
fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:{REDACTED}@{host}{path}"),
        None => url.to_owned(),
    }
}

/// Width of the reference file's comment lines.
const EXAMPLE_WIDTH: usize = 100;

/// The reference configuration file, `deploy/wse.toml`: every key in flag order, set to its
/// default, under the flag's help (which states the unit), its flag and variable, and whether a
/// reload applies it. Generated from [`Config::default`] and the flags, both of which tests tie
/// to the configuration struct, so it cannot drift; `toml::from_str::<Config>` of it gives
/// `Config::default()`.
pub fn render_example() -> String {
    let defaults =
        serde_json::to_value(Config::default()).expect("the default configuration serialises");
    let mut out = String::from(EXAMPLE_HEADER);
    let mut section = "";
    for arg in Cli::command().get_arguments() {
        let id = arg.get_id().as_str();
        let Some((sec, field)) = id.split_once('.') else {
            continue;
        };
        if sec != section {
            section = sec;
            let _ = write!(out, "\n[{sec}]\n");
        }
        let value_name = arg
            .get_value_names()
            .and_then(|n| n.first())
            .map_or_else(|| "VALUE".to_owned(), ToString::to_string);
        // clap drops the full stop that ends a one-sentence doc comment.
        let mut help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        if !help.ends_with('.') {
            help.push('.');
        }
        if value_name != "BOOL" && !arg.get_possible_values().is_empty() {
            let values: Vec<String> = arg
                .get_possible_values()
                .iter()
                .map(|v| v.get_name().to_owned())
                .collect();
            let _ = write!(help, " One of {}.", values.join(", "));
        }
        out.push('\n');
        for line in wrap(&help, EXAMPLE_WIDTH - 2) {
            let _ = writeln!(out, "# {line}");
        }
        let reload = if wse_shards::config::RESTART_KEYS.contains(&id) {
            "restart"
        } else {
            "live"
        };
        let how = format!(
            "flag --{}, variable {}; reload: {reload}",
            arg.get_long().unwrap_or_default(),
            arg.get_env()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        for line in wrap(&how, EXAMPLE_WIDTH - 2) {
            let _ = writeln!(out, "# {line}");
        }
        match defaults.get(sec).and_then(|s| s.get(field)) {
            Some(serde_json::Value::Null) | None => {
                let _ = writeln!(out, "# unset by default:\n#{field} = \"<{value_name}>\"");
            }
            Some(value) => {
                let value =
                    toml::Value::try_from(value).expect("every default has a TOML representation");
                let _ = writeln!(out, "{field} = {value}");
            }
        }
    }
    out
}

const EXAMPLE_HEADER: &str = "\
# wse-server configuration: every key, set to its default.
#
# Generated by `wse-server --print-config-example` from the configuration struct (a test keeps
# this file in step). Install it as /etc/wse/wse.toml and change what you need; a key left out
# keeps its default. Precedence: flags > WSE_* environment variables > this file > defaults.
# Durations are written like 25s, 1500ms or 1m30s; sizes are in bytes.
#
# Reload (systemctl reload wse-server, i.e. SIGHUP) re-reads this file: keys marked \"reload:
# live\" take effect at once (for new connections and new deadlines; connections already
# authenticated stay), keys marked \"reload: restart\" keep their running value until the next
# restart, with a warning in the log.
#
# Production needs at least [auth] enabled = true with a secret or a public key file, and
# [control] api_key for the publish API. See docs/OPERATIONS.md.
";

/// Splits `text` into lines of at most `width` characters at spaces (a longer word stays whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

const AFTER_HELP: &str = "\
`wse-server token --user ID [--ttl 1h] [--topics GLOBS] [--publish GLOBS]` prints a development
JWT that this configuration accepts (`wse-server token --help`).
Every flag can also be given as the WSE_* environment variable shown with it.
Precedence: flags > WSE_* environment > --config file > defaults.
A configuration file has the keys shown as [config: section.key]; the reference file,
every key at its default with its documentation, is deploy/wse.toml in the repository, and
`wse-server --print-config-example` prints it.
Booleans take a value (true/false, yes/no, on/off, 1/0); lists are comma-separated;
durations are like 25s, 1500ms, 1m30s. An empty value unsets an optional setting
(--echo-path '') or empties a list (--auth-audience '').";

/// The flags; each field of the section structs is `Option` so that an absent flag (and absent
/// variable) leaves the file's value, or the default, in place.
#[derive(Debug, Parser)]
#[command(
    name = "wse-server",
    version,
    about = "Thread-per-core WSE WebSocket messaging server",
    after_help = AFTER_HELP,
    max_term_width = 100,
    // A flag given twice takes its last value (a wrapper script's defaults, then the operator's).
    args_override_self = true
)]
struct Cli {
    /// TOML configuration file; flags and WSE_* variables override what it sets.
    #[arg(long, env = "WSE_CONFIG", value_name = "FILE", value_parser = optional_path())]
    config: Option<PathBuf>,

    /// Print the effective configuration as TOML and exit; secrets (auth.secret,
    /// auth.previous_secret, control.api_key, a password in events.webhook_url, cluster.psk,
    /// cluster.psk_previous) print as "<redacted>" unless --show-secrets is given.
    #[arg(long)]
    print_config: bool,

    /// With --print-config: print the secrets in clear.
    #[arg(long, requires = "print_config")]
    show_secrets: bool,

    /// Print the reference configuration file, every key at its default with its documentation
    /// (the repository's deploy/wse.toml), and exit.
    #[arg(long)]
    print_config_example: bool,

    #[command(flatten)]
    flags: Flags,
}

#[derive(Debug, Args)]
struct Flags {
    #[command(flatten)]
    server: ServerFlags,
    #[command(flatten)]
    limits: LimitsFlags,
    #[command(flatten)]
    protocol: ProtocolFlags,
    #[command(flatten)]
    auth: AuthFlags,
    #[command(flatten)]
    recovery: RecoveryFlags,
    #[command(flatten)]
    presence: PresenceFlags,
    #[command(flatten)]
    control: ControlFlags,
    #[command(flatten)]
    events: EventsFlags,
    #[command(flatten)]
    centrifuge: CentrifugeFlags,
    #[command(flatten)]
    cluster: ClusterFlags,
    #[command(flatten)]
    log: LogFlags,
}

/// `[server]`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Server")]
struct ServerFlags {
    /// Number of shards, one thread per core; 0 = every online core.
    #[arg(
        id = "server.cores",
        long = "cores",
        env = "WSE_CORES",
        value_name = "N"
    )]
    cores: Option<usize>,

    /// WebSocket listener address, ip:port or host:port (a host name is resolved once, at
    /// start); every shard binds it with SO_REUSEPORT.
    #[arg(
        id = "server.listen",
        long = "listen",
        env = "WSE_LISTEN",
        value_name = "ADDR",
        value_parser = parse_listen
    )]
    listen: Option<ListenAddr>,

    /// Pin shard N to core N (mod the online cores).
    #[arg(
        id = "server.pin_threads",
        long = "pin-threads",
        env = "WSE_PIN_THREADS",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = BoolishValueParser::new()
    )]
    pin_threads: Option<bool>,

    /// Opt-in RFC 6455 conformance route: data messages on this path are echoed back, without
    /// auth and without the WSE protocol; empty = off.
    #[arg(
        id = "server.echo_path",
        long = "echo-path",
        env = "WSE_ECHO_PATH",
        value_name = "PATH"
    )]
    echo_path: Option<String>,

    /// Most live WebSocket connections across all shards, connections; past it a new one is
    /// closed with 1013.
    #[arg(
        id = "server.max_connections",
        long = "max-connections",
        env = "WSE_MAX_CONNECTIONS",
        value_name = "N"
    )]
    max_connections: Option<usize>,

    /// Time a graceful shutdown (SIGTERM/SIGINT) waits for connections to take their close
    /// frame, duration.
    #[arg(
        id = "server.drain_timeout",
        long = "drain-timeout",
        env = "WSE_DRAIN_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    drain_timeout: Option<Duration>,

    /// Close code sent to every connection on graceful shutdown, 4000..=4999 (clients reconnect).
    #[arg(
        id = "server.shutdown_close_code",
        long = "shutdown-close-code",
        env = "WSE_SHUTDOWN_CLOSE_CODE",
        value_name = "CODE"
    )]
    shutdown_close_code: Option<u16>,

    /// Browser origins allowed to open a WebSocket (WSE and Centrifuge), comma-separated: exact
    /// origins (`*` and `?` as in globs) or `*` for any; empty = every browser refused (403).
    /// Clients sending no Origin always pass.
    #[arg(
        id = "server.allowed_origins",
        long = "allowed-origins",
        env = "WSE_ALLOWED_ORIGINS",
        value_name = "ORIGIN,...",
        value_delimiter = ','
    )]
    allowed_origins: Option<Vec<String>>,
}

/// `[limits]`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Limits")]
struct LimitsFlags {
    /// Largest inbound message after reassembly of fragments, bytes; past it: error
    /// MESSAGE_TOO_LARGE and close 1009.
    #[arg(
        id = "limits.max_message_size",
        long = "max-message-size",
        env = "WSE_MAX_MESSAGE_SIZE",
        value_name = "BYTES"
    )]
    max_message_size: Option<usize>,

    /// Largest HTTP upgrade request, bytes; past it: HTTP 431.
    #[arg(
        id = "limits.max_handshake_bytes",
        long = "max-handshake-bytes",
        env = "WSE_MAX_HANDSHAKE_BYTES",
        value_name = "BYTES"
    )]
    max_handshake_bytes: Option<usize>,

    /// Time a client has to complete the HTTP upgrade, duration.
    #[arg(
        id = "limits.handshake_timeout",
        long = "handshake-timeout",
        env = "WSE_HANDSHAKE_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    handshake_timeout: Option<Duration>,

    /// Connections per shard still in the HTTP upgrade (slowloris guard); past it: HTTP 503.
    #[arg(
        id = "limits.max_pending_handshakes",
        long = "max-pending-handshakes",
        env = "WSE_MAX_PENDING_HANDSHAKES",
        value_name = "N"
    )]
    max_pending_handshakes: Option<usize>,

    /// Bytes queued for one connection that it has not read yet, bytes; past it the connection
    /// is evicted with close 4413.
    #[arg(
        id = "limits.max_outbound_queue_bytes",
        long = "max-outbound-queue-bytes",
        env = "WSE_MAX_OUTBOUND_QUEUE_BYTES",
        value_name = "BYTES"
    )]
    max_outbound_queue_bytes: Option<usize>,

    /// Topics one connection may be subscribed to; past it: SUBSCRIPTION_LIMIT.
    #[arg(
        id = "limits.max_subscriptions_per_connection",
        long = "max-subscriptions-per-connection",
        env = "WSE_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        value_name = "N"
    )]
    max_subscriptions_per_connection: Option<usize>,

    /// Application events buffered per shard for the event stream, events; past it the oldest
    /// is dropped.
    #[arg(
        id = "limits.app_event_queue_capacity",
        long = "app-event-queue-capacity",
        env = "WSE_APP_EVENT_QUEUE_CAPACITY",
        value_name = "N"
    )]
    app_event_queue_capacity: Option<usize>,

    /// Application events buffered per shard for the event stream, bytes of payload; past it
    /// the oldest are dropped (wse_inbound_dropped_total{reason="queue_full"}).
    #[arg(
        id = "limits.app_event_queue_bytes",
        long = "app-event-queue-bytes",
        env = "WSE_APP_EVENT_QUEUE_BYTES",
        value_name = "BYTES"
    )]
    app_event_queue_bytes: Option<usize>,

    /// Time a closing connection has to answer our close frame before its socket is closed,
    /// duration.
    #[arg(
        id = "limits.close_timeout",
        long = "close-timeout",
        env = "WSE_CLOSE_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    close_timeout: Option<Duration>,

    /// Most entries in each cross-shard queue (one per ordered pair of shards), entries; fewer
    /// when limits.fabric_memory_per_shard does not hold that many.
    #[arg(
        id = "limits.fabric_queue_capacity",
        long = "fabric-queue-capacity",
        env = "WSE_FABRIC_QUEUE_CAPACITY",
        value_name = "N"
    )]
    fabric_queue_capacity: Option<usize>,

    /// Cross-shard traffic each shard may hold, bytes: its queues' slots plus what it sent that
    /// was not taken yet; past it new entries are dropped.
    #[arg(
        id = "limits.fabric_memory_per_shard",
        long = "fabric-memory-per-shard",
        env = "WSE_FABRIC_MEMORY_PER_SHARD",
        value_name = "BYTES"
    )]
    fabric_memory_per_shard: Option<usize>,
}

/// `[protocol]`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Protocol")]
struct ProtocolFlags {
    /// Interval between the server's JSON text pings to each connection, duration.
    #[arg(
        id = "protocol.ping_interval",
        long = "ping-interval",
        env = "WSE_PING_INTERVAL",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    ping_interval: Option<Duration>,

    /// A connection with no inbound frame for this long is closed with 4408, duration; must
    /// be longer than --ping-interval.
    #[arg(
        id = "protocol.idle_timeout",
        long = "idle-timeout",
        env = "WSE_IDLE_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    idle_timeout: Option<Duration>,

    /// Inbound token bucket size per connection, messages.
    #[arg(
        id = "protocol.rate_limit_capacity",
        long = "rate-limit-capacity",
        env = "WSE_RATE_LIMIT_CAPACITY",
        value_name = "MESSAGES"
    )]
    rate_limit_capacity: Option<u32>,

    /// Inbound token bucket refill per connection, messages per second.
    #[arg(
        id = "protocol.rate_limit_refill",
        long = "rate-limit-refill",
        env = "WSE_RATE_LIMIT_REFILL",
        value_name = "RATE"
    )]
    rate_limit_refill: Option<u32>,

    /// Messages dropped by the rate limit within one --rate-limit-abuse-window after which the
    /// connection is closed with 4429, messages.
    #[arg(
        id = "protocol.rate_limit_abuse_drops",
        long = "rate-limit-abuse-drops",
        env = "WSE_RATE_LIMIT_ABUSE_DROPS",
        value_name = "MESSAGES"
    )]
    rate_limit_abuse_drops: Option<u32>,

    /// Window over which rate-limit drops are counted for the 4429 decision, duration.
    #[arg(
        id = "protocol.rate_limit_abuse_window",
        long = "rate-limit-abuse-window",
        env = "WSE_RATE_LIMIT_ABUSE_WINDOW",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    rate_limit_abuse_window: Option<Duration>,

    /// JSON sends larger than this are sent C:+zlib compressed, bytes.
    #[arg(
        id = "protocol.compression_threshold",
        long = "compression-threshold",
        env = "WSE_COMPRESSION_THRESHOLD",
        value_name = "BYTES"
    )]
    compression_threshold: Option<usize>,
}

/// `[auth]`. Every flag carries the `auth-` prefix: `--issuer` or `--leeway` alone would not
/// say what they belong to.
#[derive(Debug, Args)]
#[command(next_help_heading = "Authentication")]
struct AuthFlags {
    /// Require a valid JWT on every connection; false = anonymous connections, fit only for
    /// development.
    #[arg(
        id = "auth.enabled",
        long = "auth-enabled",
        env = "WSE_AUTH_ENABLED",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = BoolishValueParser::new()
    )]
    enabled: Option<bool>,

    /// JWT algorithm accepted; pinned here, never taken from the token header.
    #[arg(
        id = "auth.algorithm",
        long = "auth-algorithm",
        env = "WSE_AUTH_ALGORITHM",
        value_name = "ALG",
        ignore_case = true,
        value_parser = PossibleValuesParser::new(["HS256", "RS256", "ES256"]).map(|s| algorithm(&s))
    )]
    algorithm: Option<JwtAlgorithm>,

    /// HS256 shared secret, at least 32 bytes (prefer the variable or the file: flags show in
    /// the process list).
    #[arg(
        id = "auth.secret",
        long = "auth-secret",
        env = "WSE_AUTH_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    secret: Option<String>,

    /// RS256/ES256 public key, PEM file.
    #[arg(
        id = "auth.public_key_file",
        long = "auth-public-key-file",
        env = "WSE_AUTH_PUBLIC_KEY_FILE",
        value_name = "FILE",
        value_parser = optional_path()
    )]
    public_key_file: Option<PathBuf>,

    /// Previous HS256 secret, still accepted during a key rotation, at least 32 bytes.
    #[arg(
        id = "auth.previous_secret",
        long = "auth-previous-secret",
        env = "WSE_AUTH_PREVIOUS_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    previous_secret: Option<String>,

    /// Previous RS256/ES256 public key (PEM file), still accepted during a key rotation.
    #[arg(
        id = "auth.previous_public_key_file",
        long = "auth-previous-public-key-file",
        env = "WSE_AUTH_PREVIOUS_PUBLIC_KEY_FILE",
        value_name = "FILE",
        value_parser = optional_path()
    )]
    previous_public_key_file: Option<PathBuf>,

    /// Required `iss` claim, when set.
    #[arg(
        id = "auth.issuer",
        long = "auth-issuer",
        env = "WSE_AUTH_ISSUER",
        value_name = "ISS"
    )]
    issuer: Option<String>,

    /// Accepted `aud` values, comma-separated; empty = any.
    #[arg(
        id = "auth.audience",
        long = "auth-audience",
        env = "WSE_AUTH_AUDIENCE",
        value_name = "AUD,...",
        value_delimiter = ','
    )]
    audience: Option<Vec<String>>,

    /// Required `kid` header, when set.
    #[arg(
        id = "auth.kid",
        long = "auth-kid",
        env = "WSE_AUTH_KID",
        value_name = "KID"
    )]
    kid: Option<String>,

    /// Cookie that carries the token (first token source; then Authorization: Bearer, then
    /// ?token=).
    #[arg(
        id = "auth.cookie_name",
        long = "auth-cookie-name",
        env = "WSE_AUTH_COOKIE_NAME",
        value_name = "NAME"
    )]
    cookie_name: Option<String>,

    /// Clock skew tolerated on `exp` and `nbf`, duration.
    #[arg(
        id = "auth.leeway",
        long = "auth-leeway",
        env = "WSE_AUTH_LEEWAY",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    leeway: Option<Duration>,

    /// Topic globs a connection may publish to when its token has no wse_publish claim (and
    /// anonymous connections when auth is off), comma-separated; empty = none.
    #[arg(
        id = "auth.default_publish",
        long = "auth-default-publish",
        env = "WSE_AUTH_DEFAULT_PUBLISH",
        value_name = "GLOB,...",
        value_delimiter = ','
    )]
    default_publish: Option<Vec<String>>,

    /// Queue-group globs a connection may join when its token has no wse_queue_groups claim (and
    /// anonymous connections when auth is off), comma-separated; empty = none.
    #[arg(
        id = "auth.default_queue_groups",
        long = "auth-default-queue-groups",
        env = "WSE_AUTH_DEFAULT_QUEUE_GROUPS",
        value_name = "GLOB,...",
        value_delimiter = ','
    )]
    default_queue_groups: Option<Vec<String>>,
}

/// `[recovery]`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Recovery")]
struct RecoveryFlags {
    /// Stamp publications (topic, epoch, offset) and keep their history for reconnecting clients.
    #[arg(
        id = "recovery.enabled",
        long = "recovery-enabled",
        env = "WSE_RECOVERY_ENABLED",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = BoolishValueParser::new()
    )]
    enabled: Option<bool>,

    /// Publications remembered per topic, a power of two; older ones are forgotten first.
    #[arg(
        id = "recovery.buffer_size",
        long = "recovery-buffer-size",
        env = "WSE_RECOVERY_BUFFER_SIZE",
        value_name = "N"
    )]
    buffer_size: Option<usize>,

    /// Publications older than this are not replayed.
    #[arg(
        id = "recovery.ttl",
        long = "recovery-ttl",
        env = "WSE_RECOVERY_TTL",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    ttl: Option<Duration>,

    /// Most publications one recovery reply replays; a larger gap answers recovered: false.
    #[arg(
        id = "recovery.max_messages",
        long = "recovery-max-messages",
        env = "WSE_RECOVERY_MAX_MESSAGES",
        value_name = "N"
    )]
    max_messages: Option<usize>,

    /// Bytes of replays one connection may have queued and unread beyond
    /// limits.max_outbound_queue_bytes; a replay past it answers recovered: false.
    #[arg(
        id = "recovery.max_replay_bytes",
        long = "recovery-max-replay-bytes",
        env = "WSE_RECOVERY_MAX_REPLAY_BYTES",
        value_name = "BYTES"
    )]
    max_replay_bytes: Option<usize>,

    /// Bytes of publication history across the server, split between shards and allocated at
    /// start; when full, the oldest publications are overwritten.
    #[arg(
        id = "recovery.memory_budget",
        long = "recovery-memory-budget",
        env = "WSE_RECOVERY_MEMORY_BUDGET",
        value_name = "BYTES"
    )]
    memory_budget: Option<usize>,

    /// Topics with a history across the server (each costs buffer_size x 16 bytes, allocated at
    /// start); past it the least recently published topic's history is dropped.
    #[arg(
        id = "recovery.max_topics",
        long = "recovery-max-topics",
        env = "WSE_RECOVERY_MAX_TOPICS",
        value_name = "N"
    )]
    max_topics: Option<usize>,
}

/// `[presence]`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Presence")]
struct PresenceFlags {
    /// Track topic members and send presence_join / presence_leave / presence_update.
    #[arg(
        id = "presence.enabled",
        long = "presence-enabled",
        env = "WSE_PRESENCE_ENABLED",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = BoolishValueParser::new()
    )]
    enabled: Option<bool>,

    /// Largest presence data a member may attach, bytes; past it the subscription fails with
    /// PRESENCE_DATA_TOO_LARGE.
    #[arg(
        id = "presence.max_data_size",
        long = "presence-max-data-size",
        env = "WSE_PRESENCE_MAX_DATA_SIZE",
        value_name = "BYTES"
    )]
    max_data_size: Option<usize>,

    /// Distinct users per topic, 0 = unlimited; past it the subscription fails with PRESENCE_LIMIT.
    #[arg(
        id = "presence.max_members",
        long = "presence-max-members",
        env = "WSE_PRESENCE_MAX_MEMBERS",
        value_name = "N"
    )]
    max_members: Option<usize>,
}

/// `[control]`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Control plane")]
struct ControlFlags {
    /// Serve the control plane (HTTP server API, health, metrics) at all.
    #[arg(
        id = "control.enabled",
        long = "control-enabled",
        env = "WSE_CONTROL_ENABLED",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = BoolishValueParser::new()
    )]
    enabled: Option<bool>,

    /// Control listener address, ip:port or host:port (resolved once, at start); keep it on a
    /// private address.
    #[arg(
        id = "control.listen",
        long = "control-listen",
        env = "WSE_CONTROL_LISTEN",
        value_name = "ADDR",
        value_parser = parse_listen
    )]
    listen: Option<ListenAddr>,

    /// Key required by the /api/v1/ routes, at least 16 characters; unset: they answer 403.
    /// /health and /metrics need no key.
    #[arg(
        id = "control.api_key",
        long = "api-key",
        env = "WSE_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,

    /// Open HTTP connections on the control listener, connections; past it a new one is closed
    /// unanswered (wse_control_rejected_total{reason="max_connections"}).
    #[arg(
        id = "control.max_connections",
        long = "control-max-connections",
        env = "WSE_CONTROL_MAX_CONNECTIONS",
        value_name = "N"
    )]
    max_connections: Option<usize>,

    /// Time a control connection has to send a request's headers, from the accept or the end of
    /// the previous response (the keep-alive idle timeout too), duration; past it the connection
    /// is closed (wse_control_rejected_total{reason="header_timeout"}).
    #[arg(
        id = "control.header_timeout",
        long = "control-header-timeout",
        env = "WSE_CONTROL_HEADER_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    header_timeout: Option<Duration>,

    /// Time from a request's headers to its response, body upload included, duration; past it:
    /// 408 and the connection is closed (wse_control_rejected_total{reason="request_timeout"}).
    #[arg(
        id = "control.request_timeout",
        long = "control-request-timeout",
        env = "WSE_CONTROL_REQUEST_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    request_timeout: Option<Duration>,
}

/// `[events]`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Application events")]
struct EventsFlags {
    /// Events queued for one event-stream consumer, events; past it the oldest is dropped
    /// (wse_inbound_dropped_total{reason="consumer_slow"}).
    #[arg(
        id = "events.consumer_queue_capacity",
        long = "events-consumer-queue-capacity",
        env = "WSE_EVENTS_CONSUMER_QUEUE_CAPACITY",
        value_name = "N"
    )]
    consumer_queue_capacity: Option<usize>,

    /// Event JSON queued for one event-stream consumer (and held while none is connected),
    /// bytes; past it the oldest events are dropped
    /// (wse_inbound_dropped_total{reason="consumer_slow"}).
    #[arg(
        id = "events.consumer_queue_bytes",
        long = "events-consumer-queue-bytes",
        env = "WSE_EVENTS_CONSUMER_QUEUE_BYTES",
        value_name = "BYTES"
    )]
    consumer_queue_bytes: Option<usize>,

    /// Largest event-stream frame or webhook body, bytes; events are split across frames, and
    /// one larger event goes alone.
    #[arg(
        id = "events.max_frame_bytes",
        long = "events-max-frame-bytes",
        env = "WSE_EVENTS_MAX_FRAME_BYTES",
        value_name = "BYTES"
    )]
    max_frame_bytes: Option<usize>,

    /// Deliver events by POSTing JSON arrays to this http:// URL instead of to event-stream
    /// consumers; empty = off.
    #[arg(
        id = "events.webhook_url",
        long = "events-webhook-url",
        env = "WSE_EVENTS_WEBHOOK_URL",
        value_name = "URL"
    )]
    webhook_url: Option<String>,

    /// Events per webhook POST, at most.
    #[arg(
        id = "events.webhook_batch_size",
        long = "events-webhook-batch-size",
        env = "WSE_EVENTS_WEBHOOK_BATCH_SIZE",
        value_name = "N"
    )]
    webhook_batch_size: Option<usize>,

    /// Longest wait for a webhook batch to fill before it is sent anyway, duration.
    #[arg(
        id = "events.webhook_batch_interval",
        long = "events-webhook-batch-interval",
        env = "WSE_EVENTS_WEBHOOK_BATCH_INTERVAL",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    webhook_batch_interval: Option<Duration>,

    /// Retries of a failed webhook POST, with doubling backoff from 100ms; then the batch is
    /// dropped (wse_inbound_dropped_total{reason="webhook_failed"}).
    #[arg(
        id = "events.webhook_max_retries",
        long = "events-webhook-max-retries",
        env = "WSE_EVENTS_WEBHOOK_MAX_RETRIES",
        value_name = "N"
    )]
    webhook_max_retries: Option<u32>,

    /// Time one webhook POST may take, duration.
    #[arg(
        id = "events.webhook_timeout",
        long = "events-webhook-timeout",
        env = "WSE_EVENTS_WEBHOOK_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    webhook_timeout: Option<Duration>,

    /// Events queued for the webhook, events; past it the oldest is dropped
    /// (wse_inbound_dropped_total{reason="consumer_slow"}).
    #[arg(
        id = "events.webhook_queue_capacity",
        long = "events-webhook-queue-capacity",
        env = "WSE_EVENTS_WEBHOOK_QUEUE_CAPACITY",
        value_name = "N"
    )]
    webhook_queue_capacity: Option<usize>,

    /// Event JSON queued for the webhook, bytes; past it the oldest events are dropped
    /// (wse_inbound_dropped_total{reason="consumer_slow"}).
    #[arg(
        id = "events.webhook_queue_bytes",
        long = "events-webhook-queue-bytes",
        env = "WSE_EVENTS_WEBHOOK_QUEUE_BYTES",
        value_name = "BYTES"
    )]
    webhook_queue_bytes: Option<usize>,
}

/// `[centrifuge]`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Centrifuge protocol")]
struct CentrifugeFlags {
    /// Speak the Centrifuge client protocol v2 (centrifuge-js, centrifuge-python) on
    /// --centrifuge-path of the WebSocket listener, on the same topics as WSE clients
    /// (docs/CENTRIFUGO.md says which commands are served).
    #[arg(
        id = "centrifuge.enabled",
        long = "centrifuge-enabled",
        env = "WSE_CENTRIFUGE_ENABLED",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = BoolishValueParser::new()
    )]
    enabled: Option<bool>,

    /// The Centrifuge endpoint's path, for JSON and for protobuf (subprotocol
    /// centrifuge-protobuf).
    #[arg(
        id = "centrifuge.path",
        long = "centrifuge-path",
        env = "WSE_CENTRIFUGE_PATH",
        value_name = "PATH"
    )]
    path: Option<String>,

    /// Interval between the server's pings ({}) to each Centrifuge connection, duration (sent
    /// to clients in whole seconds); must be longer than --centrifuge-pong-timeout.
    #[arg(
        id = "centrifuge.ping_interval",
        long = "centrifuge-ping-interval",
        env = "WSE_CENTRIFUGE_PING_INTERVAL",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    ping_interval: Option<Duration>,

    /// Time a Centrifuge client has to answer a ping, duration; past it the connection is
    /// closed with 3012.
    #[arg(
        id = "centrifuge.pong_timeout",
        long = "centrifuge-pong-timeout",
        env = "WSE_CENTRIFUGE_PONG_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    pong_timeout: Option<Duration>,

    /// Time after a connection token expired without a refresh before the connection is
    /// closed with 3005, duration.
    #[arg(
        id = "centrifuge.expired_close_delay",
        long = "centrifuge-expired-close-delay",
        env = "WSE_CENTRIFUGE_EXPIRED_CLOSE_DELAY",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    expired_close_delay: Option<Duration>,

    /// Time the application's backend has to answer a Centrifuge client's rpc, duration; past
    /// it the client gets error 100.
    #[arg(
        id = "centrifuge.rpc_timeout",
        long = "centrifuge-rpc-timeout",
        env = "WSE_CENTRIFUGE_RPC_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    rpc_timeout: Option<Duration>,

    /// Longest channel name, bytes; a longer one is refused with error 107.
    #[arg(
        id = "centrifuge.channel_max_length",
        long = "centrifuge-channel-max-length",
        env = "WSE_CENTRIFUGE_CHANNEL_MAX_LENGTH",
        value_name = "BYTES"
    )]
    channel_max_length: Option<usize>,

    /// Channels one Centrifuge connection may be subscribed to, server-side subscriptions
    /// included; past it a subscribe gets error 106.
    #[arg(
        id = "centrifuge.channel_limit",
        long = "centrifuge-channel-limit",
        env = "WSE_CENTRIFUGE_CHANNEL_LIMIT",
        value_name = "N"
    )]
    channel_limit: Option<usize>,

    /// Most publications one history reply or recovery returns, publications; a larger
    /// recovery answers recovered: false.
    #[arg(
        id = "centrifuge.history_limit_max",
        long = "centrifuge-history-limit-max",
        env = "WSE_CENTRIFUGE_HISTORY_LIMIT_MAX",
        value_name = "N"
    )]
    history_limit_max: Option<usize>,

    /// Channel namespaces as a JSON array of objects with Centrifugo's option names (name,
    /// history_size, history_ttl, force_recovery, force_positioning,
    /// allow_subscribe_for_client, allow_publish_for_client, allow_history_for_client,
    /// allow_presence_for_client, presence, join_leave, force_push_join_leave); name "" sets the
    /// channels without a namespace. In the file: [[centrifuge.namespaces]] tables.
    #[arg(
        id = "centrifuge.namespaces",
        long = "centrifuge-namespaces",
        env = "WSE_CENTRIFUGE_NAMESPACES",
        value_name = "JSON",
        value_parser = namespaces
    )]
    namespaces: Option<Namespaces>,
}

/// `--centrifuge-namespaces`: a wrapper, because clap reads `Option<Vec<_>>` as a list flag.
#[derive(Debug, Clone)]
struct Namespaces(Vec<wse_shards::centrifuge::NamespaceConfig>);

/// An empty value empties the list, as for every list flag.
fn namespaces(text: &str) -> Result<Namespaces, String> {
    if text.trim().is_empty() {
        return Ok(Namespaces(Vec::new()));
    }
    serde_json::from_str(text)
        .map(Namespaces)
        .map_err(|e| format!("not a JSON array of namespaces: {e}"))
}

/// `[cluster]`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Cluster (publications and interest cross nodes; no TLS yet)")]
struct ClusterFlags {
    /// Join a cluster: start the cluster core; publications cross nodes (docs/CLUSTER.md).
    #[arg(
        id = "cluster.enabled",
        long = "cluster-enabled",
        env = "WSE_CLUSTER_ENABLED",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = BoolishValueParser::new()
    )]
    enabled: Option<bool>,

    /// This node's name, unique and stable across restarts; empty = the host name.
    #[arg(
        id = "cluster.node_name",
        long = "cluster-node-name",
        env = "WSE_CLUSTER_NODE_NAME",
        value_name = "NAME"
    )]
    node_name: Option<String>,

    /// Cluster listener, ip:port; its own port, never the WebSocket or control one.
    #[arg(
        id = "cluster.listen",
        long = "cluster-listen",
        env = "WSE_CLUSTER_LISTEN",
        value_name = "ADDR"
    )]
    listen: Option<SocketAddr>,

    /// Address other nodes dial, host:port; empty = the listen address (required when that is
    /// 0.0.0.0, [::] or port 0).
    #[arg(
        id = "cluster.advertised",
        long = "cluster-advertised",
        env = "WSE_CLUSTER_ADVERTISED",
        value_name = "HOST:PORT"
    )]
    advertised: Option<String>,

    /// Seed nodes, host:port, comma-separated, re-resolved on each attempt.
    #[arg(
        id = "cluster.seeds",
        long = "cluster-seeds",
        env = "WSE_CLUSTER_SEEDS",
        value_name = "HOST:PORT,...",
        value_delimiter = ','
    )]
    seeds: Option<Vec<String>>,

    /// How links are authenticated: tls, psk, or none (loopback only).
    #[arg(
        id = "cluster.security",
        long = "cluster-security",
        env = "WSE_CLUSTER_SECURITY",
        value_name = "MODE",
        value_parser = PossibleValuesParser::new(["tls", "psk", "none"]).map(|s| cluster_security(&s))
    )]
    security: Option<ClusterSecurity>,

    /// TLS: the private CA certificate, PEM file (read again on SIGHUP, for new links).
    #[arg(
        id = "cluster.tls_ca",
        long = "cluster-tls-ca",
        env = "WSE_CLUSTER_TLS_CA",
        value_name = "FILE",
        value_parser = optional_path()
    )]
    tls_ca: Option<PathBuf>,

    /// TLS: this node's certificate chain, PEM file; its SAN must hold the node name (read again
    /// on SIGHUP, for new links).
    #[arg(
        id = "cluster.tls_cert",
        long = "cluster-tls-cert",
        env = "WSE_CLUSTER_TLS_CERT",
        value_name = "FILE",
        value_parser = optional_path()
    )]
    tls_cert: Option<PathBuf>,

    /// TLS: this node's private key, PEM file (read again on SIGHUP, for new links).
    #[arg(
        id = "cluster.tls_key",
        long = "cluster-tls-key",
        env = "WSE_CLUSTER_TLS_KEY",
        value_name = "FILE",
        value_parser = optional_path()
    )]
    tls_key: Option<PathBuf>,

    /// PSK: the shared key, at least 32 bytes.
    #[arg(
        id = "cluster.psk",
        long = "cluster-psk",
        env = "WSE_CLUSTER_PSK",
        value_name = "KEY",
        hide_env_values = true
    )]
    psk: Option<String>,

    /// PSK: the previous key, still accepted during a rotation.
    #[arg(
        id = "cluster.psk_previous",
        long = "cluster-psk-previous",
        env = "WSE_CLUSTER_PSK_PREVIOUS",
        value_name = "KEY",
        hide_env_values = true
    )]
    psk_previous: Option<String>,

    /// Core the cluster thread is pinned to; empty = not pinned.
    #[arg(
        id = "cluster.core",
        long = "cluster-core",
        env = "WSE_CLUSTER_CORE",
        value_name = "CORE",
        value_parser = parse_optional_core
    )]
    core: Option<String>,

    /// Batch compression between nodes: off, on, or auto (batches of 4 KiB and more when the link is bandwidth-bound).
    #[arg(
        id = "cluster.compression",
        long = "cluster-compression",
        env = "WSE_CLUSTER_COMPRESSION",
        value_name = "MODE",
        value_parser = PossibleValuesParser::new(["off", "on", "auto"]).map(|s| cluster_compression(&s))
    )]
    compression: Option<ClusterCompression>,

    /// Largest data batch to one peer, bytes.
    #[arg(
        id = "cluster.batch_max",
        long = "cluster-batch-max",
        env = "WSE_CLUSTER_BATCH_MAX",
        value_name = "BYTES"
    )]
    batch_max: Option<usize>,

    /// Bytes queued to one peer and not yet written, past which publications for it are dropped and kept in the dead letter queue.
    #[arg(
        id = "cluster.peer_queue_bytes",
        long = "cluster-peer-queue-bytes",
        env = "WSE_CLUSTER_PEER_QUEUE_BYTES",
        value_name = "BYTES"
    )]
    peer_queue_bytes: Option<usize>,

    /// Publications held for a new peer until its interest is known, bytes.
    #[arg(
        id = "cluster.hold_bytes",
        long = "cluster-hold-bytes",
        env = "WSE_CLUSTER_HOLD_BYTES",
        value_name = "BYTES"
    )]
    hold_bytes: Option<usize>,

    /// Dropped publications kept for diagnosis (GET /api/v1/cluster/dlq), entries; the oldest goes
    /// first.
    #[arg(
        id = "cluster.dlq_entries",
        long = "cluster-dlq-entries",
        env = "WSE_CLUSTER_DLQ_ENTRIES",
        value_name = "ENTRIES"
    )]
    dlq_entries: Option<usize>,

    /// Nodes in the cluster, this one included, nodes; further joins are refused.
    #[arg(
        id = "cluster.max_members",
        long = "cluster-max-members",
        env = "WSE_CLUSTER_MAX_MEMBERS",
        value_name = "N"
    )]
    max_members: Option<usize>,

    /// Time an inbound cluster connection has to authenticate, duration.
    #[arg(
        id = "cluster.handshake_timeout",
        long = "cluster-handshake-timeout",
        env = "WSE_CLUSTER_HANDSHAKE_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    handshake_timeout: Option<Duration>,

    /// A link sends a PING after this long without sending, duration.
    #[arg(
        id = "cluster.ping_interval",
        long = "cluster-ping-interval",
        env = "WSE_CLUSTER_PING_INTERVAL",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    ping_interval: Option<Duration>,

    /// A link that received or wrote nothing for this long is dead, duration.
    #[arg(
        id = "cluster.link_timeout",
        long = "cluster-link-timeout",
        env = "WSE_CLUSTER_LINK_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    link_timeout: Option<Duration>,

    /// Time other nodes have to answer an indirect probe, duration.
    #[arg(
        id = "cluster.probe_timeout",
        long = "cluster-probe-timeout",
        env = "WSE_CLUSTER_PROBE_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    probe_timeout: Option<Duration>,

    /// Suspicion to death without confirmations, duration.
    #[arg(
        id = "cluster.suspect_timeout",
        long = "cluster-suspect-timeout",
        env = "WSE_CLUSTER_SUSPECT_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    suspect_timeout: Option<Duration>,

    /// Suspicion to death once half of the other nodes confirm, duration.
    #[arg(
        id = "cluster.suspect_min",
        long = "cluster-suspect-min",
        env = "WSE_CLUSTER_SUSPECT_MIN",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    suspect_min: Option<Duration>,

    /// Dead nodes' addresses are redialled this often (jittered), duration.
    #[arg(
        id = "cluster.rejoin_interval",
        long = "cluster-rejoin-interval",
        env = "WSE_CLUSTER_REJOIN_INTERVAL",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    rejoin_interval: Option<Duration>,

    /// Longest wait for other nodes to confirm a new subscription, duration.
    #[arg(
        id = "cluster.sub_ack_timeout",
        long = "cluster-sub-ack-timeout",
        env = "WSE_CLUSTER_SUB_ACK_TIMEOUT",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    sub_ack_timeout: Option<Duration>,
}

/// `[log]`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Logging")]
struct LogFlags {
    /// tracing filter, e.g. info or wse_shards=debug,info; RUST_LOG overrides it.
    #[arg(
        id = "log.level",
        long = "log-level",
        env = "WSE_LOG_LEVEL",
        value_name = "FILTER"
    )]
    level: Option<String>,

    /// How often each shard logs one warning per kind of refusal it counted meanwhile (auth
    /// failures, evictions, rate-limit closes, bad handshakes, descriptor exhaustion...), duration.
    #[arg(
        id = "log.attack_summary_interval",
        long = "log-attack-summary-interval",
        env = "WSE_LOG_ATTACK_SUMMARY_INTERVAL",
        value_name = "DURATION",
        value_parser = humantime::parse_duration
    )]
    attack_summary_interval: Option<Duration>,
}

impl Flags {
    /// Overlays every flag (or variable) that was given. The exhaustive destructuring makes a
    /// new flag that is not applied a compile error.
    fn apply(self, cfg: &mut Config) {
        let Self {
            server,
            limits,
            protocol,
            auth,
            recovery,
            presence,
            control,
            events,
            centrifuge,
            cluster,
            log,
        } = self;

        let ServerFlags {
            cores,
            listen,
            pin_threads,
            echo_path,
            max_connections,
            drain_timeout,
            shutdown_close_code,
            allowed_origins,
        } = server;
        let s = &mut cfg.server;
        set(&mut s.cores, cores);
        set(&mut s.listen, listen.map(|a| a.addr));
        set(&mut s.pin_threads, pin_threads);
        set_optional(&mut s.echo_path, echo_path);
        set(&mut s.max_connections, max_connections);
        set(&mut s.drain_timeout, drain_timeout);
        set(&mut s.shutdown_close_code, shutdown_close_code);
        set_list(&mut s.allowed_origins, allowed_origins);

        let LimitsFlags {
            max_message_size,
            max_handshake_bytes,
            handshake_timeout,
            max_pending_handshakes,
            max_outbound_queue_bytes,
            max_subscriptions_per_connection,
            app_event_queue_capacity,
            app_event_queue_bytes,
            close_timeout,
            fabric_queue_capacity,
            fabric_memory_per_shard,
        } = limits;
        let l = &mut cfg.limits;
        set(&mut l.max_message_size, max_message_size);
        set(&mut l.max_handshake_bytes, max_handshake_bytes);
        set(&mut l.handshake_timeout, handshake_timeout);
        set(&mut l.max_pending_handshakes, max_pending_handshakes);
        set(&mut l.max_outbound_queue_bytes, max_outbound_queue_bytes);
        set(
            &mut l.max_subscriptions_per_connection,
            max_subscriptions_per_connection,
        );
        set(&mut l.app_event_queue_capacity, app_event_queue_capacity);
        set(&mut l.app_event_queue_bytes, app_event_queue_bytes);
        set(&mut l.close_timeout, close_timeout);
        set(&mut l.fabric_queue_capacity, fabric_queue_capacity);
        set(&mut l.fabric_memory_per_shard, fabric_memory_per_shard);

        let ProtocolFlags {
            ping_interval,
            idle_timeout,
            rate_limit_capacity,
            rate_limit_refill,
            rate_limit_abuse_drops,
            rate_limit_abuse_window,
            compression_threshold,
        } = protocol;
        let p = &mut cfg.protocol;
        set(&mut p.ping_interval, ping_interval);
        set(&mut p.idle_timeout, idle_timeout);
        set(&mut p.rate_limit_capacity, rate_limit_capacity);
        set(&mut p.rate_limit_refill, rate_limit_refill);
        set(&mut p.rate_limit_abuse_drops, rate_limit_abuse_drops);
        set(&mut p.rate_limit_abuse_window, rate_limit_abuse_window);
        set(&mut p.compression_threshold, compression_threshold);

        let AuthFlags {
            enabled,
            algorithm,
            secret,
            public_key_file,
            previous_secret,
            previous_public_key_file,
            issuer,
            audience,
            kid,
            cookie_name,
            leeway,
            default_publish,
            default_queue_groups,
        } = auth;
        let a = &mut cfg.auth;
        set(&mut a.enabled, enabled);
        set(&mut a.algorithm, algorithm);
        set_optional(&mut a.secret, secret);
        set_optional(&mut a.public_key_file, public_key_file);
        set_optional(&mut a.previous_secret, previous_secret);
        set_optional(&mut a.previous_public_key_file, previous_public_key_file);
        set_optional(&mut a.issuer, issuer);
        set_list(&mut a.audience, audience);
        set_optional(&mut a.kid, kid);
        set(&mut a.cookie_name, cookie_name);
        set(&mut a.leeway, leeway);
        set_list(&mut a.default_publish, default_publish);
        set_list(&mut a.default_queue_groups, default_queue_groups);

        let RecoveryFlags {
            enabled,
            buffer_size,
            ttl,
            max_messages,
            max_replay_bytes,
            memory_budget,
            max_topics,
        } = recovery;
        let r = &mut cfg.recovery;
        set(&mut r.enabled, enabled);
        set(&mut r.buffer_size, buffer_size);
        set(&mut r.ttl, ttl);
        set(&mut r.max_messages, max_messages);
        set(&mut r.max_replay_bytes, max_replay_bytes);
        set(&mut r.memory_budget, memory_budget);
        set(&mut r.max_topics, max_topics);

        let PresenceFlags {
            enabled,
            max_data_size,
            max_members,
        } = presence;
        let p = &mut cfg.presence;
        set(&mut p.enabled, enabled);
        set(&mut p.max_data_size, max_data_size);
        set(&mut p.max_members, max_members);

        let ControlFlags {
            enabled,
            listen,
            api_key,
            max_connections,
            header_timeout,
            request_timeout,
        } = control;
        let c = &mut cfg.control;
        set(&mut c.enabled, enabled);
        set(&mut c.listen, listen.map(|a| a.addr));
        set_optional(&mut c.api_key, api_key);
        set(&mut c.max_connections, max_connections);
        set(&mut c.header_timeout, header_timeout);
        set(&mut c.request_timeout, request_timeout);

        let EventsFlags {
            consumer_queue_capacity,
            consumer_queue_bytes,
            max_frame_bytes,
            webhook_url,
            webhook_batch_size,
            webhook_batch_interval,
            webhook_max_retries,
            webhook_timeout,
            webhook_queue_capacity,
            webhook_queue_bytes,
        } = events;
        let e = &mut cfg.events;
        set(&mut e.consumer_queue_capacity, consumer_queue_capacity);
        set(&mut e.consumer_queue_bytes, consumer_queue_bytes);
        set(&mut e.max_frame_bytes, max_frame_bytes);
        set_optional(&mut e.webhook_url, webhook_url);
        set(&mut e.webhook_batch_size, webhook_batch_size);
        set(&mut e.webhook_batch_interval, webhook_batch_interval);
        set(&mut e.webhook_max_retries, webhook_max_retries);
        set(&mut e.webhook_timeout, webhook_timeout);
        set(&mut e.webhook_queue_capacity, webhook_queue_capacity);
        set(&mut e.webhook_queue_bytes, webhook_queue_bytes);

        let CentrifugeFlags {
            enabled,
            path,
            ping_interval,
            pong_timeout,
            expired_close_delay,
            rpc_timeout,
            channel_max_length,
            channel_limit,
            history_limit_max,
            namespaces,
        } = centrifuge;
        let c = &mut cfg.centrifuge;
        set(&mut c.enabled, enabled);
        set(&mut c.path, path);
        set(&mut c.ping_interval, ping_interval);
        set(&mut c.pong_timeout, pong_timeout);
        set(&mut c.expired_close_delay, expired_close_delay);
        set(&mut c.rpc_timeout, rpc_timeout);
        set(&mut c.channel_max_length, channel_max_length);
        set(&mut c.channel_limit, channel_limit);
        set(&mut c.history_limit_max, history_limit_max);
        set(&mut c.namespaces, namespaces.map(|n| n.0));

        let ClusterFlags {
            enabled,
            node_name,
            listen,
            advertised,
            seeds,
            security,
            tls_ca,
            tls_cert,
            tls_key,
            psk,
            psk_previous,
            core,
            compression,
            batch_max,
            peer_queue_bytes,
            hold_bytes,
            dlq_entries,
            max_members,
            handshake_timeout,
            ping_interval,
            link_timeout,
            probe_timeout,
            suspect_timeout,
            suspect_min,
            rejoin_interval,
            sub_ack_timeout,
        } = cluster;
        let c = &mut cfg.cluster;
        set(&mut c.enabled, enabled);
        set(&mut c.node_name, node_name);
        set(&mut c.listen, listen);
        set_optional(&mut c.advertised, advertised);
        set_list(&mut c.seeds, seeds);
        set(&mut c.security, security);
        set_optional(&mut c.tls_ca, tls_ca);
        set_optional(&mut c.tls_cert, tls_cert);
        set_optional(&mut c.tls_key, tls_key);
        set_optional(&mut c.psk, psk);
        set_optional(&mut c.psk_previous, psk_previous);
        if let Some(v) = core {
            c.core = v.parse().ok();
        }
        set(&mut c.compression, compression);
        set(&mut c.batch_max, batch_max);
        set(&mut c.peer_queue_bytes, peer_queue_bytes);
        set(&mut c.hold_bytes, hold_bytes);
        set(&mut c.dlq_entries, dlq_entries);
        set(&mut c.max_members, max_members);
        set(&mut c.handshake_timeout, handshake_timeout);
        set(&mut c.ping_interval, ping_interval);
        set(&mut c.link_timeout, link_timeout);
        set(&mut c.probe_timeout, probe_timeout);
        set(&mut c.suspect_timeout, suspect_timeout);
        set(&mut c.suspect_min, suspect_min);
        set(&mut c.rejoin_interval, rejoin_interval);
        set(&mut c.sub_ack_timeout, sub_ack_timeout);

        let LogFlags {
            level,
            attack_summary_interval,
        } = log;
        set(&mut cfg.log.level, level);
        set(
            &mut cfg.log.attack_summary_interval,
            attack_summary_interval,
        );
    }
}

fn set<T>(slot: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *slot = v;
    }
}

/// An empty value unsets: the only way for a flag or variable to take back what the file set.
fn set_optional<T: AsRef<OsStr>>(slot: &mut Option<T>, flag: Option<T>) {
    if let Some(v) = flag {
        *slot = (!v.as_ref().is_empty()).then_some(v);
    }
}

/// Items are trimmed so that `a, b` works; empty items are dropped so that `''` empties the list.
fn set_list(slot: &mut Vec<String>, flag: Option<Vec<String>>) {
    if let Some(items) = flag {
        *slot = items
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
    }
}

/// clap's `PathBuf` parser refuses the empty value, which here means "unset".
fn optional_path() -> impl TypedValueParser<Value = PathBuf> {
    OsStringValueParser::new().map(PathBuf::from)
}

/// Only called with one of the possible values.
fn cluster_security(name: &str) -> ClusterSecurity {
    match name {
        "psk" => ClusterSecurity::Psk,
        "none" => ClusterSecurity::None,
        _ => ClusterSecurity::Tls,
    }
}

/// Only called with one of the possible values.
fn cluster_compression(name: &str) -> ClusterCompression {
    match name {
        "off" => ClusterCompression::Off,
        "on" => ClusterCompression::On,
        _ => ClusterCompression::Auto,
    }
}

/// A core number, or empty for "not pinned".
fn parse_optional_core(s: &str) -> Result<String, String> {
    if s.is_empty() || s.parse::<usize>().is_ok() {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a core number"))
    }
}

/// Only called with one of the possible values (in any case).
fn algorithm(name: &str) -> JwtAlgorithm {
    match name.to_ascii_uppercase().as_str() {
        "RS256" => JwtAlgorithm::RS256,
        "ES256" => JwtAlgorithm::ES256,
        _ => JwtAlgorithm::HS256,
    }
}

/// The clap command. Each configuration flag gets its default from `Config::default()` so that
/// the help shows it; [`without_defaults`] takes those values back out before the overlay.
fn command() -> clap::Command {
    let defaults = default_texts();
    Cli::command().mut_args(|arg| {
        let Some((key, default)) = defaults.get_key_value(arg.get_id().as_str()) else {
            return arg;
        };
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let arg = arg.help(format!("{help} [config: {key}]"));
        match default {
            Some(text) => arg.default_value(text.as_str()),
            None => arg,
        }
    })
}

/// Drops the values clap filled in from the defaults, so that a flag nobody gave does not
/// override the file.
fn without_defaults(mut matches: clap::ArgMatches) -> clap::ArgMatches {
    let defaulted: Vec<String> = matches
        .ids()
        .map(|id| id.as_str().to_owned())
        .filter(|id| {
            id.contains('.') && matches.value_source(id) == Some(ValueSource::DefaultValue)
        })
        .collect();
    for id in defaulted {
        let _ = matches.try_clear_id(&id);
    }
    matches
}

/// Every dotted configuration key with its default as it would be typed on the command line,
/// or `None` when it has none (unset, empty list). Static because clap without its `string`
/// feature takes only `&'static str` defaults.
fn default_texts() -> &'static BTreeMap<String, Option<String>> {
    static TEXTS: OnceLock<BTreeMap<String, Option<String>>> = OnceLock::new();
    TEXTS.get_or_init(|| {
        let defaults =
            serde_json::to_value(Config::default()).expect("the default configuration serialises");
        let mut texts = BTreeMap::new();
        for (section, fields) in defaults.as_object().into_iter().flatten() {
            for (field, value) in fields.as_object().into_iter().flatten() {
                let text = match value {
                    serde_json::Value::Null => None,
                    serde_json::Value::Array(items) if items.is_empty() => None,
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(items) => Some(
                        items
                            .iter()
                            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                    other => Some(other.to_string()),
                };
                texts.insert(format!("{section}.{field}"), text);
            }
        }
        texts
    })
}

/// Dotted keys whose value is unset, which TOML cannot express.
fn unset_keys(cfg: &Config) -> Vec<String> {
    let value = serde_json::to_value(cfg).expect("the configuration serialises");
    let mut keys = Vec::new();
    if let Some(sections) = value.as_object() {
        for (section, fields) in sections {
            for (field, v) in fields.as_object().into_iter().flatten() {
                if v.is_null() {
                    keys.push(format!("{section}.{field}"));
                }
            }
        }
    }
    keys
}

/// `--help` and `--version` exit here as clap would; every other clap error becomes one line
/// (clap's own rendering spans several, with a usage block).
fn usage_error(e: clap::Error, args: &[OsString]) -> CliError {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    let rendered = e.render().to_string();
    let parts: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect();
    let joined = parts.join("; ");
    let mut line = joined.strip_prefix("error: ").unwrap_or(&joined).to_owned();
    if let Some(var) = env_source(&e, args) {
        let _ = write!(line, " (from {var})");
    }
    CliError(line)
}

/// The variable a bad value came from when the flag is not on the command line: clap's message
/// names only the flag, which misleads whoever set the variable.
fn env_source(e: &clap::Error, args: &[OsString]) -> Option<String> {
    let ContextValue::String(invalid) = e.get(ContextKind::InvalidArg)? else {
        return None;
    };
    let long = invalid.strip_prefix("--")?.split([' ', '=']).next()?;
    let flag = format!("--{long}");
    let on_command_line = args.iter().skip(1).filter_map(|a| a.to_str()).any(|a| {
        a == flag
            || a.strip_prefix(flag.as_str())
                .is_some_and(|rest| rest.starts_with('='))
    });
    if on_command_line {
        return None;
    }
    let cmd = Cli::command();
    let var = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long))?
        .get_env()?;
    std::env::var_os(var).map(|_| var.to_string_lossy().into_owned())
}

fn load_file(path: &Path, resolved: &mut Vec<Resolved>) -> Result<Config, CliError> {
    let name = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError(format!("config file {name}: cannot read: {e}")))?;
    let positioned = |e: toml::de::Error| {
        CliError(format!(
            "config file {name}: {}",
            describe_toml_error(&text, &e)
        ))
    };
    let first = match toml::from_str::<Config>(&text) {
        Ok(cfg) => return Ok(cfg),
        Err(e) => e,
    };
    // The listener keys may hold host names, which `SocketAddr` does not parse: resolve them in
    // the parsed table and deserialize that (without line numbers: only this path lacks them).
    let Ok(mut table) = text.parse::<toml::Table>() else {
        return Err(positioned(first));
    };
    let mut any = false;
    for (section, key) in [("server", "server.listen"), ("control", "control.listen")] {
        let Some(value) = table
            .get_mut(section)
            .and_then(|t| t.as_table_mut())
            .and_then(|t| t.get_mut("listen"))
        else {
            continue;
        };
        let Some(given) = value.as_str().map(str::to_owned) else {
            continue;
        };
        if given.parse::<SocketAddr>().is_ok() {
            continue;
        }
        let a = parse_listen(&given)
            .map_err(|e| CliError(format!("config file {name}: {key}: {e}")))?;
        *value = toml::Value::String(a.addr.to_string());
        resolved.push(Resolved {
            key,
            given,
            addr: a.addr,
        });
        any = true;
    }
    if !any {
        return Err(positioned(first));
    }
    <Config as serde::Deserialize>::deserialize(table)
        .map_err(|e| CliError(format!("config file {name}: {}", flatten(e.message()))))
}

/// A listener address as given on the command line, and what it resolved to.
#[derive(Clone, Debug)]
struct ListenAddr {
    given: String,
    addr: SocketAddr,
}

/// `ip:port`, or `host:port` resolved now (IPv4 addresses first: `localhost` resolving to `::1`
/// first would surprise a client that tries 127.0.0.1).
fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(ListenAddr {
            given: s.to_owned(),
            addr,
        });
    }
    if s.rsplit_once(':')
        .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    {
        return Err(format!(
            "{s:?} is not host:port (e.g. 127.0.0.1:5007 or localhost:5007)"
        ));
    }
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {s:?}: {e}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address"))?;
    Ok(ListenAddr {
        given: s.to_owned(),
        addr,
    })
}

/// One line: where (line number and, when it can be told, the dotted key) and what. toml's own
/// `Display` spans several lines with a source excerpt.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = flatten(e.message());
    let Some(span) = e.span() else {
        return message;
    };
    let at = span.start.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line_no = text[..line_start].matches('\n').count() + 1;
    match key_at(text, line_start, &text[line_start..line_end]) {
        Some(key) => format!("line {line_no}: {key}: {message}"),
        None => format!("line {line_no}: {message}"),
    }
}

/// The dotted key assigned on `line`, qualified by the table header above it. `None` on a
/// header line (the message names the table) or a continuation line of a multi-line value.
fn key_at(text: &str, line_start: usize, line: &str) -> Option<String> {
    let line = line.trim();
    if line.starts_with('[') {
        return None;
    }
    let key = clean_key(line.split_once('=')?.0);
    if key.is_empty() {
        return None;
    }
    let section = text[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        let inner = l.strip_prefix('[')?;
        let end = inner.find(']')?;
        Some(clean_key(&inner[..end]))
    });
    Some(match section {
        Some(s) if !s.is_empty() => format!("{s}.{key}"),
        _ => key,
    })
}

fn clean_key(raw: &str) -> String {
    raw.split('.')
        .map(|part| part.trim().trim_matches(|c| c == '"' || c == '\''))
        .collect::<Vec<_>>()
        .join(".")
}

fn flatten(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in the temp dir, removed on drop; the pid and name keep parallel tests apart.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("wse-cli-unit-{}-{name}.toml", std::process::id()));
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn parse(args: &[&str]) -> Result<Options, CliError> {
        parse_from(std::iter::once("wse-server").chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> Config {
        parse(args).unwrap().config
    }

    fn error(args: &[&str]) -> String {
        let e = parse(args).unwrap_err().to_string();
        assert!(!e.contains('\n'), "error spans several lines: {e:?}");
        e
    }

    #[test]
    fn listeners_accept_host_names_resolved_at_start() {
        let o = parse(&[
            "--listen",
            "localhost:5107",
            "--control-listen",
            "localhost:5108",
        ])
        .unwrap();
        assert_eq!(o.config.server.listen, "127.0.0.1:5107".parse().unwrap());
        assert_eq!(o.config.control.listen, "127.0.0.1:5108".parse().unwrap());
        let keys: Vec<_> = o
            .resolved
            .iter()
            .map(|r| (r.key, r.given.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("server.listen", "localhost:5107"),
                ("control.listen", "localhost:5108")
            ]
        );
        // An address needs no resolving, and says nothing.
        assert!(
            parse(&["--listen", "127.0.0.1:5107"])
                .unwrap()
                .resolved
                .is_empty()
        );

        let f = TempFile::new(
            "host_names",
            "[server]\nlisten = \"localhost:5207\"\n[control]\nlisten = \"localhost:5208\"\n",
        );
        let o = parse(&["--config", f.path()]).unwrap();
        assert_eq!(o.config.server.listen, "127.0.0.1:5207".parse().unwrap());
        assert_eq!(o.config.control.listen, "127.0.0.1:5208".parse().unwrap());
        assert_eq!(o.resolved.len(), 2);
        // The flag wins over the file, and only its resolution is reported.
        let o = parse(&["--config", f.path(), "--listen", "localhost:5307"]).unwrap();
        assert_eq!(o.config.server.listen, "127.0.0.1:5307".parse().unwrap());
        assert_eq!(
            o.resolved
                .iter()
                .filter(|r| r.key == "server.listen")
                .count(),
            1
        );

        let e = error(&["--listen", "localhost"]);
        assert!(e.contains("host:port"), "{e}");
        let e = error(&["--control-listen", "no-such-host.invalid:1"]);
        assert!(e.contains("cannot resolve"), "{e}");
    }

    #[test]
    fn no_arguments_give_the_defaults() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.config, Config::default());
        assert!(!o.print_config);
        assert!(o.config_file.is_none());
        assert!(parse(&["--print-config"]).unwrap().print_config);
        assert!(parse(&["--config", ""]).unwrap().config_file.is_none());
    }

    #[test]
    fn file_overrides_defaults() {
        let f = TempFile::new(
            "file_overrides_defaults",
            "[server]\ncores = 3\nlisten = \"127.0.0.1:9000\"\n\n[protocol]\nidle_timeout = \"90s\"\n",
        );
        let o = parse(&["--config", f.path()]).unwrap();
        assert_eq!(o.config_file.as_deref(), Some(f.0.as_path()));
        let c = o.config;
        assert_eq!(c.server.cores, 3);
        assert_eq!(c.server.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.protocol.idle_timeout, Duration::from_secs(90));
        assert_eq!(
            c.protocol.ping_interval,
            Config::default().protocol.ping_interval
        );
        assert_eq!(c.limits, Config::default().limits);
    }

    #[test]
    fn flags_override_file() {
        let f = TempFile::new(
            "flags_override_file",
            "[server]\ncores = 3\necho_path = \"/echo\"\n[protocol]\nidle_timeout = \"90s\"\n\
             [auth]\naudience = [\"a\"]\n",
        );
        let c = config(&[
            "--config",
            f.path(),
            "--cores",
            "1",
            "--idle-timeout=70s",
            "--echo-path",
            "",
            "--auth-audience",
            "",
        ]);
        assert_eq!(c.server.cores, 1);
        assert_eq!(c.protocol.idle_timeout, Duration::from_secs(70));
        assert_eq!(c.server.echo_path, None, "an empty value unsets");
        assert!(c.auth.audience.is_empty(), "an empty value empties a list");
    }

    #[test]
    fn every_section_is_reachable_by_flags() {
        let secret = "s".repeat(32);
        let c = config(&[
            "--listen",
            "127.0.0.1:7000",
            "--pin-threads",
            "false",
            "--echo-path",
            "/echo",
            "--max-connections",
            "10",
            "--shutdown-close-code",
            "4001",
            "--max-message-size",
            "2048",
            "--max-outbound-queue-bytes",
            "65536",
            "--fabric-memory-per-shard",
            "7340032",
            "--ping-interval",
            "1s",
            "--rate-limit-capacity",
            "5",
            "--rate-limit-refill",
            "6",
            "--compression-threshold",
            "0",
            "--auth-enabled",
            "true",
            "--auth-secret",
            &secret,
            "--auth-algorithm",
            "hs256",
            "--auth-issuer",
            "iss",
            "--auth-kid",
            "k1",
            "--auth-cookie-name",
            "tok",
            "--auth-public-key-file",
            "/keys/pub.pem",
            "--control-enabled",
            "false",
            "--control-listen",
            "127.0.0.1:7001",
            "--api-key",
            "0123456789abcdef",
            "--log-level",
            "debug",
        ]);
        assert_eq!(c.server.listen, "127.0.0.1:7000".parse().unwrap());
        assert!(!c.server.pin_threads);
        assert_eq!(c.server.echo_path.as_deref(), Some("/echo"));
        assert_eq!(c.server.max_connections, 10);
        assert_eq!(c.server.shutdown_close_code, 4001);
        assert_eq!(c.limits.max_message_size, 2048);
        assert_eq!(c.limits.max_outbound_queue_bytes, 65536);
        assert_eq!(c.limits.fabric_memory_per_shard, 7 << 20);
        assert_eq!(c.protocol.ping_interval, Duration::from_secs(1));
        assert_eq!(c.protocol.rate_limit_capacity, 5);
        assert_eq!(c.protocol.rate_limit_refill, 6);
        assert_eq!(c.protocol.compression_threshold, 0);
        assert!(c.auth.enabled);
        assert_eq!(c.auth.secret.as_deref(), Some(secret.as_str()));
        assert_eq!(c.auth.algorithm, JwtAlgorithm::HS256);
        assert_eq!(c.auth.issuer.as_deref(), Some("iss"));
        assert_eq!(c.auth.kid.as_deref(), Some("k1"));
        assert_eq!(c.auth.cookie_name, "tok");
        assert_eq!(
            c.auth.public_key_file.as_deref(),
            Some(Path::new("/keys/pub.pem"))
        );
        assert!(!c.control.enabled);
        assert_eq!(c.control.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(c.control.api_key.as_deref(), Some("0123456789abcdef"));
        assert_eq!(c.log.level, "debug");

        let c = config(&["--auth-algorithm", "ES256"]);
        assert_eq!(c.auth.algorithm, JwtAlgorithm::ES256);
    }

    #[test]
    fn every_config_key_has_a_flag_and_a_variable() {
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let mut keys: Vec<String> = defaults
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(section, fields)| {
                fields
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(move |field| format!("{section}.{field}"))
            })
            .collect();
        keys.sort();
        let cmd = command();
        let mut ids: Vec<String> = cmd
            .get_arguments()
            .map(|a| a.get_id().as_str().to_owned())
            .filter(|id| id.contains('.'))
            .collect();
        ids.sort();
        assert_eq!(ids, keys);

        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if [
                "help",
                "version",
                "print-config",
                "show-secrets",
                "print-config-example",
            ]
            .contains(&long)
            {
                continue;
            }
            let want = format!("WSE_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(want.as_str()),
                "--{long}"
            );
            let id = arg.get_id().as_str();
            if id.contains('.') {
                let help = arg.get_help().unwrap().to_string();
                assert!(
                    help.contains(&format!("[config: {id}]")),
                    "--{long}: {help}"
                );
                assert!(arg.get_help_heading().is_some(), "--{long} has no heading");
                let unset = matches!(
                    defaults.pointer(&format!("/{}", id.replace('.', "/"))),
                    Some(serde_json::Value::Null)
                ) || id == "auth.audience"
                    || id == "cluster.seeds"
                    || id == "auth.default_publish"
                    || id == "auth.default_queue_groups"
                    || id == "centrifuge.namespaces";
                assert_eq!(arg.get_default_values().is_empty(), unset, "--{long}");
            }
        }
    }

    #[test]
    fn centrifuge_namespaces_are_json_on_the_command_line_and_tables_in_the_file() {
        let c = config(&[
            "--recovery-enabled",
            "true",
            "--centrifuge-namespaces",
            r#"[{"name":"room","history_size":100,"history_ttl":"300s","presence":true},
                {"name":"user","allow_publish_for_client":true}]"#,
        ]);
        let ns = &c.centrifuge.namespaces;
        assert_eq!(ns.len(), 2);
        assert_eq!(
            (ns[0].name.as_str(), ns[0].history_size, ns[0].history_ttl),
            ("room", 100, Duration::from_secs(300))
        );
        assert!(ns[0].presence && !ns[0].allow_publish_for_client);
        assert!(ns[1].allow_publish_for_client);
        let text = render_toml(&c);
        assert!(
            text.contains("[[centrifuge.namespaces]]\nname = \"room\""),
            "{text}"
        );
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), c);
        // Centrifugo v3's names, which v5 ignores silently, are refused here.
        let e = error(&[
            "--centrifuge-namespaces",
            r#"[{"name":"room","history_recover":true}]"#,
        ]);
        assert!(e.contains("history_recover"), "{e}");
        let empty = config(&["--centrifuge-namespaces", ""]);
        assert!(empty.centrifuge.namespaces.is_empty());
    }

    #[test]
    fn help_shows_units_and_defaults() {
        let help = command().render_long_help().to_string();
        for needle in [
            "--max-message-size <BYTES>",
            "bytes",
            "messages per second",
            "[default: 25s]",
            "[default: 1048576]",
            "[default: 0.0.0.0:5007]",
            "[default: HS256]",
            "[config: protocol.idle_timeout]",
            "WSE_IDLE_TIMEOUT",
            "Authentication:",
            "Control plane:",
        ] {
            assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
        }
    }

    #[test]
    fn lists_are_comma_separated_and_repeatable() {
        let c = config(&[
            "--auth-audience",
            "a, b",
            "--auth-audience",
            "c",
            "--auth-default-publish",
            "news.*,chat.*",
        ]);
        assert_eq!(c.auth.audience, ["a", "b", "c"]);
        assert_eq!(c.auth.default_publish, ["news.*", "chat.*"]);
    }

    #[test]
    fn durations_use_humantime() {
        let c = config(&[
            "--idle-timeout",
            "1m30s",
            "--ping-interval",
            "1500ms",
            "--drain-timeout",
            "2m",
        ]);
        assert_eq!(c.protocol.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.protocol.ping_interval, Duration::from_millis(1500));
        assert_eq!(c.server.drain_timeout, Duration::from_secs(120));
        let e = error(&["--idle-timeout", "soon"]);
        assert!(e.contains("--idle-timeout"), "{e}");
    }

    #[test]
    fn booleans_take_explicit_values() {
        assert!(!config(&["--pin-threads", "false"]).server.pin_threads);
        assert!(!config(&["--pin-threads=no"]).server.pin_threads);
        assert!(config(&["--control-enabled", "on"]).control.enabled);
        let e = error(&["--pin-threads"]);
        assert!(e.contains("--pin-threads"), "{e}");
        let e = error(&["--control-enabled", "maybe"]);
        assert!(e.contains("maybe"), "{e}");
    }

    #[test]
    fn usage_errors_are_one_line() {
        let e = error(&["--idel-timeout", "5s"]);
        assert!(e.contains("--idel-timeout"), "{e}");
        assert!(e.contains("--idle-timeout"), "the suggestion survives: {e}");
        let e = error(&["--cores", "many"]);
        assert!(e.contains("--cores"), "{e}");
        assert!(
            !e.contains("(from WSE_"),
            "the value came from the flag: {e}"
        );
        let e = error(&["--auth-algorithm", "none"]);
        assert!(e.contains("HS256"), "{e}");
    }

    #[test]
    fn validation_error_is_one_line_naming_the_key() {
        let e = error(&["--idle-timeout", "10s", "--ping-interval", "20s"]);
        assert_eq!(
            e,
            "protocol.idle_timeout: must be longer than protocol.ping_interval"
        );
        let e = error(&["--auth-enabled", "true"]);
        assert!(e.starts_with("auth.secret: "), "{e}");
        let e = error(&["--echo-path", "echo"]);
        assert!(e.starts_with("server.echo_path: "), "{e}");
    }

    #[test]
    fn cluster_flags_reach_the_config_and_bad_ones_are_refused() {
        let c = config(&[
            "--cores",
            "16",
            "--cluster-listen",
            "0.0.0.0:9999",
            "--cluster-seeds",
            "10.0.0.2:9999,node3.example:9999",
            "--cluster-security",
            "psk",
            "--cluster-psk",
            &"k".repeat(32),
            "--cluster-core",
            "15",
            "--cluster-compression",
            "off",
            "--cluster-link-timeout",
            "5s",
            "--cluster-peer-queue-bytes",
            "1048576",
        ]);
        let cl = &c.cluster;
        assert_eq!(cl.listen, "0.0.0.0:9999".parse().unwrap());
        assert_eq!(cl.seeds, ["10.0.0.2:9999", "node3.example:9999"]);
        assert_eq!(cl.security, ClusterSecurity::Psk);
        assert_eq!(cl.core, Some(15));
        assert_eq!(cl.compression, ClusterCompression::Off);
        assert_eq!(cl.link_timeout, Duration::from_secs(5));
        assert_eq!(cl.peer_queue_bytes, 1 << 20);
        let e = error(&["--cluster-listen", "0.0.0.0:5007"]);
        assert!(e.starts_with("cluster.listen: "), "{e}");
        let e = error(&["--cluster-security", "none"]);
        assert!(e.starts_with("cluster.security: "), "{e}");
        let e = error(&["--cluster-enabled", "true", "--cluster-security", "tls"]);
        assert!(
            e.starts_with("cluster.tls_ca: required with security = tls"),
            "{e}"
        );
        let e = error(&["--cluster-core", "x"]);
        assert!(e.contains("not a core number"), "{e}");
    }

    #[test]
    fn unknown_key_in_the_file_is_named() {
        let f = TempFile::new(
            "unknown_key",
            "[server]\ncores = 2\n\n[protocol]\nidel_timeout = \"90s\"\n",
        );
        let e = error(&["--config", f.path()]);
        assert!(e.starts_with(&format!("config file {}: ", f.path())), "{e}");
        assert!(e.contains("line 5"), "{e}");
        assert!(e.contains("protocol.idel_timeout"), "{e}");
        assert!(e.contains("unknown field `idel_timeout`"), "{e}");

        let f = TempFile::new("unknown_section", "[protocl]\nidle_timeout = \"90s\"\n");
        let e = error(&["--config", f.path()]);
        assert!(e.contains("unknown field `protocl`"), "{e}");
    }

    #[test]
    fn bad_files_give_one_line_errors() {
        let f = TempFile::new("syntax", "[server]\ncores = = 2\n");
        let e = error(&["--config", f.path()]);
        assert!(e.contains("line 2"), "{e}");

        let f = TempFile::new("wrong_type", "[server]\ncores = \"two\"\n");
        let e = error(&["--config", f.path()]);
        assert!(e.contains("server.cores"), "{e}");

        let f = TempFile::new("bad_duration", "[protocol]\nidle_timeout = \"soon\"\n");
        let e = error(&["--config", f.path()]);
        assert!(e.contains("protocol.idle_timeout"), "{e}");

        let f = TempFile::new("bad_address", "[control]\nlisten = \"localhost\"\n");
        let e = error(&["--config", f.path()]);
        assert!(e.contains("control.listen"), "{e}");

        let f = TempFile::new(
            "unresolvable",
            "[server]\nlisten = \"no-such-host.invalid:5007\"\n",
        );
        let e = error(&["--config", f.path()]);
        assert!(
            e.contains("server.listen") && e.contains("cannot resolve"),
            "{e}"
        );

        let f = TempFile::new("invalid_relation", "[protocol]\nidle_timeout = \"1s\"\n");
        let e = error(&["--config", f.path()]);
        assert!(e.starts_with("protocol.idle_timeout: "), "{e}");

        let missing =
            std::env::temp_dir().join(format!("wse-cli-unit-{}-missing.toml", std::process::id()));
        let e = error(&["--config", missing.to_str().unwrap()]);
        assert!(e.contains("cannot read"), "{e}");
        assert!(e.contains("missing.toml"), "{e}");
    }

    #[test]
    fn example_has_every_key_and_parses_to_the_defaults() {
        let text = render_example();
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), Config::default());
        for id in default_texts().keys() {
            let (section, field) = id.split_once('.').unwrap();
            let at = text
                .find(&format!("[{section}]"))
                .unwrap_or_else(|| panic!("no [{section}]"));
            let set = format!("\n{field} = ");
            let unset = format!("\n#{field} = ");
            assert!(
                text[at..].contains(&set) || text[at..].contains(&unset),
                "{id} missing"
            );
        }
        assert!(text.contains("\nping_interval = \"25s\"\n"), "{text}");
        assert!(text.contains("#secret = \"<SECRET>\""), "{text}");
        assert!(text.contains("One of HS256, RS256,"), "{text}");
        assert!(!text.contains("One of y, yes"), "{text}");
        assert!(text.contains("reload: restart\ncores = 0\n"), "{text}");
        assert!(
            text.contains("reload: live\nidle_timeout = \"1m\"\n"),
            "{text}"
        );
        assert!(
            text.lines()
                .all(|l| l.chars().count() <= EXAMPLE_WIDTH || !l.contains(' ')),
            "a line is too long"
        );
    }

    #[test]
    fn redaction_hides_every_secret_and_keeps_the_rest() {
        let mut cfg = Config::default();
        cfg.auth.secret = Some("s".repeat(32));
        cfg.auth.previous_secret = Some("p".repeat(32));
        cfg.control.api_key = Some("k".repeat(16));
        cfg.events.webhook_url = Some("http://hook:pa55@backend:8080/ev?x=1".into());
        cfg.cluster.psk = Some("q".repeat(32));
        cfg.cluster.psk_previous = Some("r".repeat(32));
        cfg.server.cores = 3;
        let r = redact_secrets(&cfg);
        assert_eq!(r.auth.secret.as_deref(), Some(REDACTED));
        assert_eq!(r.auth.previous_secret.as_deref(), Some(REDACTED));
        assert_eq!(r.control.api_key.as_deref(), Some(REDACTED));
        assert_eq!(
            r.events.webhook_url.as_deref(),
            Some("http://hook:<redacted>@backend:8080/ev?x=1")
        );
        assert_eq!(r.server, cfg.server);
        let text = render_toml(&r);
        for secret in ["sss", "ppp", "kkk", "pa55", "qqq", "rrr"] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
        assert_eq!(
            redact_url_password("http://backend/a@b"),
            "http://backend/a@b"
        );
        assert_eq!(redact_secrets(&Config::default()), Config::default());
    }

    #[test]
    fn wrap_breaks_at_spaces() {
        assert_eq!(wrap("aa bb cc", 5), ["aa bb", "cc"]);
        assert_eq!(wrap("toolongword x", 4), ["toolongword", "x"]);
        assert!(wrap("", 4).is_empty());
    }

    #[test]
    fn render_toml_round_trips_defaults() {
        let cfg = Config::default();
        let text = render_toml(&cfg);
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), cfg);
        assert!(text.contains("#   server.echo_path"), "{text}");
        assert!(
            text.contains("[protocol]\nping_interval = \"25s\""),
            "{text}"
        );
    }

    #[test]
    fn render_toml_round_trips_everything_set() {
        let mut cfg = Config::default();
        cfg.server.cores = 4;
        cfg.server.echo_path = Some("/echo".into());
        cfg.server.drain_timeout = Duration::from_millis(1500);
        cfg.limits.close_timeout = Duration::from_millis(250);
        cfg.protocol.idle_timeout = Duration::from_secs(3661);
        cfg.auth.enabled = true;
        cfg.auth.algorithm = JwtAlgorithm::RS256;
        cfg.auth.secret = Some("quote \" and\nnewline".into());
        cfg.auth.public_key_file = Some("/keys/pub.pem".into());
        cfg.auth.previous_secret = Some("p".repeat(40));
        cfg.auth.previous_public_key_file = Some("old.pem".into());
        cfg.auth.issuer = Some("iss".into());
        cfg.auth.audience = vec!["a".into(), "b".into()];
        cfg.auth.kid = Some("k".into());
        cfg.auth.default_publish = vec!["news.*".into()];
        cfg.control.api_key = Some("0123456789abcdef".into());
        cfg.events.webhook_url = Some("http://127.0.0.1:8080/events".into());
        cfg.events.webhook_batch_interval = Duration::from_millis(20);
        cfg.log.level = "wse_shards=debug,info".into();
        cfg.cluster.advertised = Some("node1.example:9999".into());
        cfg.cluster.core = Some(3);
        cfg.cluster.psk = Some("q".repeat(32));
        cfg.cluster.psk_previous = Some("r".repeat(32));
        cfg.cluster.tls_ca = Some("ca.pem".into());
        cfg.cluster.tls_cert = Some("node.pem".into());
        cfg.cluster.tls_key = Some("node.key".into());
        cfg.cluster.seeds = vec!["10.0.0.2:9999".into()];
        let text = render_toml(&cfg);
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), cfg, "{text}");
        assert!(!text.contains("Unset optional keys"), "{text}");

        // Every key is present: the rendered table has the same keys as the JSON form,
        // which keeps nulls.
        let table: toml::Table = toml::from_str(&text).unwrap();
        let json = serde_json::to_value(&cfg).unwrap();
        for (section, fields) in json.as_object().unwrap() {
            for field in fields.as_object().unwrap().keys() {
                assert!(
                    table[section].get(field).is_some(),
                    "{section}.{field} missing"
                );
            }
        }
    }
}
