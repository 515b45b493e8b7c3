//! `[centrifuge]`: the Centrifuge client protocol's endpoint, timing, channel limits and
//! namespaces (the Centrifugo options users know), part of [`crate::Config`].
//!
//! Owns: the section's shape, defaults and validation. Never: reads files or the environment.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, RecoveryConfig, TIMER_TICK, TOPIC_LEN_MAX};

/// Longest namespace name, bytes (a namespace is a channel's prefix, so it is bounded by the
/// channel's length anyway; this keeps configuration mistakes short).
pub const NAMESPACE_NAME_MAX: usize = 64;

/// The Centrifuge endpoint and its channels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CentrifugeConfig {
    /// Speak the Centrifuge client protocol v2 on `path` of the WebSocket listener, on the
    /// same topics as WSE clients (docs/CENTRIFUGO.md says which commands are served).
    pub enabled: bool,
    /// The endpoint's path (Centrifugo's default). Both encodings share it: JSON, and protobuf
    /// with the `centrifuge-protobuf` subprotocol.
    pub path: String,
    /// Interval between the server's pings (`{}`); sent in the connect reply as `ping`, in
    /// whole seconds.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Time a client has to answer a ping; past it the connection is closed with 3012.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Time after a connection's token expired (not refreshed) before it is closed with 3005.
    #[serde(with = "humantime_serde")]
    pub expired_close_delay: Duration,
    /// Longest channel name, bytes; a longer one is refused with error 107.
    pub channel_max_length: usize,
    /// Channels one connection may be subscribed to (server-side subscriptions included);
    /// past it a subscribe gets error 106.
    pub channel_limit: usize,
    /// Most publications one history reply or recovery returns; a larger recovery answers
    /// `recovered: false`.
    pub history_limit_max: usize,
    /// Channel namespaces: the part of a channel name before the first `:` picks one; a
    /// channel without `:` uses the namespace named `""` (all off when there is none). A
    /// channel in a namespace that is not listed is refused with error 102.
    pub namespaces: Vec<NamespaceConfig>,
}

impl Default for CentrifugeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/connection/websocket".to_owned(),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(8),
            expired_close_delay: Duration::from_secs(25),
            channel_max_length: 255,
            channel_limit: 128,
            history_limit_max: 300,
            namespaces: Vec::new(),
        }
    }
}

/// One namespace's options, named as in Centrifugo v5/v6. Unknown keys are refused: the
/// v3-era names (`history_recover`, `publish`, `subscribe_to_publish`) that Centrifugo v5
/// silently ignores are errors here.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    /// The namespace: channels `name:...`. `""` = channels without a namespace.
    pub name: String,
    /// Publications kept per channel (its recovery ring; at most `recovery.buffer_size`).
    /// 0 = no history: no recovery, no positioning, `history` answers 108.
    pub history_size: usize,
    /// How long publications are kept (at most `recovery.ttl`). 0 = no history.
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    /// Every subscription is recoverable, whatever the client asked.
    pub force_recovery: bool,
    /// Every subscription is positioned, whatever the client asked.
    pub force_positioning: bool,
    /// Clients may subscribe without a subscription token.
    pub allow_subscribe_for_client: bool,
    /// Clients may publish.
    pub allow_publish_for_client: bool,
    /// Clients may ask for history (and so recover when they ask to).
    pub allow_history_for_client: bool,
    /// Clients may ask for presence and presence stats.
    pub allow_presence_for_client: bool,
    /// Track who is subscribed (presence); off: presence requests answer 108.
    pub presence: bool,
    /// Send join/leave pushes to subscribers who ask for them (`join_leave` in subscribe).
    pub join_leave: bool,
    /// Send join/leave pushes to every subscriber.
    pub force_push_join_leave: bool,
}

impl NamespaceConfig {
    /// Whether channels of this namespace keep a history (a stream with offsets and an epoch).
    pub fn has_history(&self) -> bool {
        self.history_size > 0 && !self.history_ttl.is_zero()
    }
}

fn bad(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        problem: problem.into(),
    }
}

impl CentrifugeConfig {
    /// Checks ranges and the namespaces against the recovery rings they map onto.
    ///
    /// # Errors
    /// The first key at fault.
    pub fn validate(
        &self,
        recovery: &RecoveryConfig,
        echo_path: Option<&str>,
    ) -> Result<(), ConfigError> {
        if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
            return Err(bad("centrifuge.path", "must be a path starting with /"));
        }
        if echo_path == Some(self.path.as_str()) {
            return Err(bad("centrifuge.path", "must differ from server.echo_path"));
        }
        if self.pong_timeout < TIMER_TICK {
            return Err(bad("centrifuge.pong_timeout", "must be at least 50ms"));
        }
        if self.ping_interval < Duration::from_secs(1) || self.ping_interval <= self.pong_timeout {
            return Err(bad(
                "centrifuge.ping_interval",
                "must be at least 1s and longer than centrifuge.pong_timeout",
            ));
        }
        if self.channel_max_length == 0 || self.channel_max_length > TOPIC_LEN_MAX {
            return Err(bad(
                "centrifuge.channel_max_length",
                format!("must be 1..={TOPIC_LEN_MAX}"),
            ));
        }
        if self.channel_limit == 0 {
            return Err(bad("centrifuge.channel_limit", "must be at least 1"));
        }
        if self.history_limit_max == 0 {
            return Err(bad("centrifuge.history_limit_max", "must be at least 1"));
        }
        let mut names: Vec<&str> = Vec::with_capacity(self.namespaces.len());
        for ns in &self.namespaces {
            let name = ns.name.as_str();
            let valid = name.is_empty()
                || (name.len() >= 2
                    && name.len() <= NAMESPACE_NAME_MAX
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')));
            if !valid {
                return Err(bad(
                    "centrifuge.namespaces",
                    format!(
                        "namespace {name:?}: a name is \"\" or 2..={NAMESPACE_NAME_MAX} of A-Z a-z 0-9 - _ ."
                    ),
                ));
            }
            if names.contains(&name) {
                return Err(bad(
                    "centrifuge.namespaces",
                    format!("namespace {name:?} is listed twice"),
                ));
            }
            names.push(name);
            if ns.has_history() {
                if !recovery.enabled {
                    return Err(bad(
                        "centrifuge.namespaces",
                        format!(
                            "namespace {name:?} keeps history: it needs recovery.enabled = true"
                        ),
                    ));
                }
                if ns.history_size > recovery.buffer_size || ns.history_ttl > recovery.ttl {
                    return Err(bad(
                        "centrifuge.namespaces",
                        format!(
                            "namespace {name:?}: history_size and history_ttl must be at most \
                             recovery.buffer_size ({}) and recovery.ttl ({})",
                            recovery.buffer_size,
                            humantime_serde::re::humantime::format_duration(recovery.ttl)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    fn with(namespaces: Vec<NamespaceConfig>) -> Config {
        let mut c = Config::default();
        c.recovery.enabled = true;
        c.centrifuge.namespaces = namespaces;
        c
    }

    fn ns(name: &str) -> NamespaceConfig {
        NamespaceConfig {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn namespaces_are_checked_by_name_and_against_the_recovery_rings() {
        with(vec![ns("room"), ns("user"), ns("")])
            .validate()
            .unwrap();
        for bad in [
            "a",
            "no:colon",
            "sp ace",
            &"x".repeat(NAMESPACE_NAME_MAX + 1),
        ] {
            let e = with(vec![ns(bad)]).validate().unwrap_err();
            assert_eq!(e.key, "centrifuge.namespaces", "{bad}");
        }
        let e = with(vec![ns("room"), ns("room")]).validate().unwrap_err();
        assert!(e.problem.contains("twice"), "{e}");

        let history = NamespaceConfig {
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            ..ns("room")
        };
        with(vec![history.clone()]).validate().unwrap();
        let mut off = with(vec![history.clone()]);
        off.recovery.enabled = false;
        assert!(
            off.validate()
                .unwrap_err()
                .problem
                .contains("recovery.enabled")
        );
        let too_big = NamespaceConfig {
            history_size: 257,
            ..history.clone()
        };
        assert!(
            with(vec![too_big])
                .validate()
                .unwrap_err()
                .problem
                .contains("recovery.buffer_size (256)")
        );
        let too_long = NamespaceConfig {
            history_ttl: Duration::from_secs(301),
            ..history
        };
        with(vec![too_long]).validate().unwrap_err();
    }

    #[test]
    fn timing_and_path_are_checked() {
        let mut c = Config::default();
        c.centrifuge.ping_interval = c.centrifuge.pong_timeout;
        assert_eq!(c.validate().unwrap_err().key, "centrifuge.ping_interval");
        let mut c = Config::default();
        c.centrifuge.path = "connection".into();
        assert_eq!(c.validate().unwrap_err().key, "centrifuge.path");
        let mut c = Config::default();
        c.server.echo_path = Some(c.centrifuge.path.clone());
        assert_eq!(c.validate().unwrap_err().key, "centrifuge.path");
        let mut c = Config::default();
        c.centrifuge.channel_max_length = crate::config::TOPIC_LEN_MAX + 1;
        assert_eq!(
            c.validate().unwrap_err().key,
            "centrifuge.channel_max_length"
        );
    }
}
