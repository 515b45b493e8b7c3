//! Who a connection is and what it may do: JWT validation and topic ACLs (protocol.md §1).
//!
//! Owns: token extraction from the upgrade request (cookie, then `Authorization: Bearer`, then
//! `?token=`), JWT verification with the configured, pinned algorithm (HS256/RS256/ES256 via
//! `jsonwebtoken`), key rotation (current key, then previous), and the claims we read: `sub`,
//! `wse_topics`, `wse_publish`, `wse_subscribe`. Topic ACLs and their glob matching.
//!
//! Never: touches sockets; reads files only in [`Authenticator::new`] (PEM keys at start-up).

use std::borrow::Cow;

use crate::config::{AuthConfig, ConfigError};

/// An authenticated (or anonymous) connection's identity and rights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// JWT `sub`, or the connection id for anonymous connections.
    pub user_id: Box<str>,
    /// What it may subscribe to (`wse_topics`; no claim = everything).
    pub subscribe: Acl,
    /// What it may publish to (`wse_publish`; no claim = `auth.default_publish`).
    pub publish: Acl,
    /// Topics to subscribe at connect (`wse_subscribe`).
    pub auto_subscribe: Vec<Box<str>>,
}

impl Identity {
    /// The identity of a connection when auth is disabled.
    pub fn anonymous(user_id: &str, default_publish: &Acl) -> Self {
        let _ = (user_id, default_publish);
        todo!()
    }
}

/// Allow/deny glob lists (`*` any run, `?` one char); deny wins; an absent allow list allows all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    /// `None` = everything not denied.
    allow: Option<Vec<Box<str>>>,
    deny: Vec<Box<str>>,
}

impl Acl {
    /// Everything allowed.
    pub fn allow_all() -> Self {
        todo!()
    }
    /// Nothing allowed.
    pub fn deny_all() -> Self {
        todo!()
    }
    /// Only topics matching one of `allow` and none of `deny`.
    pub fn new(allow: Vec<String>, deny: Vec<String>) -> Self {
        let _ = (allow, deny);
        todo!()
    }
    pub fn permits(&self, topic: &str) -> bool {
        let _ = topic;
        todo!()
    }
}

/// Glob match with `*` (any run, including empty) and `?` (exactly one char).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let _ = (pattern, text);
    todo!()
}

/// Why a token was refused. `Display` is safe to send to the client (no key material, no
/// internals).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required")]
    Missing,
    #[error("token too large")]
    TooLarge,
    #[error("malformed token")]
    Malformed,
    #[error("invalid signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience,
    #[error("unknown key id")]
    WrongKid,
    #[error("missing or empty sub claim")]
    MissingSub,
    #[error("invalid claims")]
    BadClaims,
}

impl AuthError {
    /// The WSE error code: `AUTH_REQUIRED` when no token was given, else `AUTH_FAILED`.
    pub fn code(&self) -> &'static str {
        todo!()
    }
}

/// Verifies tokens for one server; built once at start-up, shared read-only by the shards.
pub struct Authenticator {}

impl Authenticator {
    /// Builds the verifier, reading PEM key files.
    ///
    /// # Errors
    /// A key file that cannot be read or parsed, named by its config key.
    pub fn new(cfg: &AuthConfig) -> Result<Self, ConfigError> {
        let _ = cfg;
        todo!()
    }

    /// The token from the first source that has one: cookie `auth.cookie_name` (ignoring empty,
    /// `undefined` and `null`), then `Authorization: Bearer` (scheme case-insensitive), then the
    /// `token` query parameter.
    pub fn extract_token<'a>(
        &self,
        cookie_header: Option<&'a str>,
        authorization: Option<&'a str>,
        query: Option<&'a str>,
    ) -> Option<Cow<'a, str>> {
        let _ = (cookie_header, authorization, query);
        todo!()
    }

    /// Verifies a token and reads its claims.
    ///
    /// # Errors
    /// Why the token was refused.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let _ = token;
        todo!()
    }
}
