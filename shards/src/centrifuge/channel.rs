//! Channel names and namespaces: which options a channel has and who may use it.
//!
//! Owns: Centrifugo's channel rules — the private prefix `$` (a subscription token is
//! required), the namespace separator `:` (the part before the first `:` after the prefix names
//! the namespace), the user-limited separator `#` (`dialog#alice,bob`: only the listed users,
//! after the last `#`, may subscribe) and the length limit — and the lookup of a channel's
//! namespace. Never: tracks subscriptions (the session does) or checks tokens.

use std::collections::HashMap;

use super::codes::ErrorCode;
use super::config::{CentrifugeConfig, NamespaceConfig};

/// The private-channel prefix.
pub const PRIVATE_PREFIX: char = '$';
/// Separates a namespace from the rest of a channel name.
pub const NAMESPACE_SEPARATOR: char = ':';
/// Separates a channel from the users allowed on it.
pub const USER_SEPARATOR: char = '#';
/// Separates the users allowed on a channel.
pub const USERS_SEPARATOR: char = ',';

/// The namespaces of one configuration, looked up by name.
#[derive(Debug, Clone)]
pub struct Namespaces {
    by_name: HashMap<Box<str>, NamespaceConfig>,
    /// Channels without a namespace: the namespace named `""`, or everything off.
    top: NamespaceConfig,
    channel_max_length: usize,
}

/// What a channel name says about the channel.
#[derive(Debug, Clone, Copy)]
pub struct Channel<'a> {
    /// Its namespace's options.
    pub namespace: &'a NamespaceConfig,
    /// `$`-prefixed: subscribing needs a subscription token.
    pub private: bool,
    /// The users allowed (`a,b` after the last `#`), when the channel is user-limited.
    pub users: Option<&'a str>,
}

impl Channel<'_> {
    /// Whether `user` may subscribe as far as the `#` rule goes.
    pub fn allows_user(&self, user: &str) -> bool {
        self.users
            .is_none_or(|users| users.split(USERS_SEPARATOR).any(|u| u == user))
    }
}

impl Namespaces {
    /// From a validated configuration.
    pub fn new(cfg: &CentrifugeConfig) -> Self {
        let mut by_name = HashMap::with_capacity(cfg.namespaces.len());
        let mut top = NamespaceConfig::default();
        for ns in &cfg.namespaces {
            if ns.name.is_empty() {
                top = ns.clone();
            } else {
                by_name.insert(ns.name.as_str().into(), ns.clone());
            }
        }
        Self {
            by_name,
            top,
            channel_max_length: cfg.channel_max_length,
        }
    }

    /// The channel's namespace and rules.
    ///
    /// # Errors
    /// [`ErrorCode::BadRequest`] for a name over the length limit (the caller handles the empty
    /// name, which Centrifuge answers with a disconnect), [`ErrorCode::UnknownChannel`] when
    /// its namespace is not configured.
    pub fn resolve<'a>(&'a self, channel: &'a str) -> Result<Channel<'a>, ErrorCode> {
        if channel.len() > self.channel_max_length {
            return Err(ErrorCode::BadRequest);
        }
        let (private, rest) = match channel.strip_prefix(PRIVATE_PREFIX) {
            Some(rest) => (true, rest),
            None => (false, channel),
        };
        let namespace = match rest.split_once(NAMESPACE_SEPARATOR) {
            Some((name, _)) => self.by_name.get(name).ok_or(ErrorCode::UnknownChannel)?,
            None => &self.top,
        };
        let users = channel.rsplit_once(USER_SEPARATOR).map(|(_, users)| users);
        Ok(Channel {
            namespace,
            private,
            users,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespaces() -> Namespaces {
        let cfg = CentrifugeConfig {
            namespaces: vec![
                NamespaceConfig {
                    name: "room".into(),
                    allow_subscribe_for_client: true,
                    ..Default::default()
                },
                NamespaceConfig {
                    name: "".into(),
                    presence: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        Namespaces::new(&cfg)
    }

    #[test]
    fn namespace_is_the_part_before_the_first_colon() {
        let ns = namespaces();
        let c = ns.resolve("room:main:sub").unwrap();
        assert_eq!(c.namespace.name, "room");
        assert!(!c.private);
        assert_eq!(
            ns.resolve("user:alice").unwrap_err(),
            ErrorCode::UnknownChannel
        );
        let top = ns.resolve("news").unwrap();
        assert_eq!(top.namespace.name, "");
        assert!(top.namespace.presence);
    }

    #[test]
    fn private_prefix_comes_before_the_namespace() {
        let ns = namespaces();
        let c = ns.resolve("$room:secret").unwrap();
        assert!(c.private);
        assert_eq!(c.namespace.name, "room");
    }

    #[test]
    fn user_limited_channels_list_their_users_after_the_last_hash() {
        let ns = namespaces();
        let c = ns.resolve("room:dialog#alice,bob").unwrap();
        assert!(c.allows_user("alice"));
        assert!(c.allows_user("bob"));
        assert!(!c.allows_user("carol"));
        assert!(!c.allows_user(""));
        assert!(ns.resolve("room:open").unwrap().allows_user("carol"));
    }

    #[test]
    fn length_limit_is_bad_request() {
        let ns = namespaces();
        let long = format!("room:{}", "x".repeat(250));
        assert_eq!(long.len(), 255);
        ns.resolve(&long).unwrap();
        let longer = format!("{long}x");
        assert_eq!(ns.resolve(&longer).unwrap_err(), ErrorCode::BadRequest);
    }
}
