//! Who a connection is and what it may do: JWT validation and topic ACLs (protocol.md §1).
//!
//! Owns: token extraction from the upgrade request (cookie, then `Authorization: Bearer`, then
//! `?token=`), JWT verification with the configured, pinned algorithm (HS256/RS256/ES256 via
//! `jsonwebtoken`), key rotation (current key, then previous), and the claims we read: `sub`,
//! `iss` (a string, when `auth.issuer` is set), `wse_topics`, `wse_publish`, `wse_subscribe`,
//! `wse_queue_groups`. Topic and queue-group ACLs and their glob matching. A second client
//! protocol reads its own claims with the same verification through [`Authenticator::verify_as`].
//!
//! Never: touches sockets; reads files only in [`Authenticator::new`] (PEM keys at start-up).

use std::borrow::Cow;
use std::path::Path;

use jsonwebtoken::crypto::{CryptoProvider, rust_crypto};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::config::{AuthConfig, ConfigError, JwtAlgorithm, TOKEN_LEN_MAX};
use crate::protocol::ErrorCode;

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
    /// Queue groups it may join (`wse_queue_groups`, an ACL on group names); `None` = no claim,
    /// so `auth.default_queue_groups` decides ([`Identity::may_join_queue_group`]). Boxed: most
    /// tokens carry no such claim, and a million identities should not pay an Acl each for it.
    pub queue_groups: Option<Box<Acl>>,
}

impl Identity {
    /// The identity of a connection when auth is disabled.
    pub fn anonymous(user_id: &str, default_publish: &Acl) -> Self {
        Self {
            user_id: user_id.into(),
            subscribe: Acl::allow_all(),
            publish: default_publish.clone(),
            auto_subscribe: Vec::new(),
            queue_groups: None,
        }
    }

    /// Whether it may join queue group `group`: as its `wse_queue_groups` claim says, or without
    /// one (anonymous connections included) when a glob of `default` (`auth.default_queue_groups`)
    /// matches.
    pub fn may_join_queue_group(&self, group: &str, default: &[String]) -> bool {
        match &self.queue_groups {
            Some(acl) => acl.permits(group),
            None => default.iter().any(|glob| glob_match(glob, group)),
        }
    }

    /// Why it may not join queue group `group` (each topic of the subscription fails with
    /// it), or `None`: a malformed name ([`ErrorCode::InvalidQueueGroup`]), then a group its
    /// `wse_queue_groups` claim, or without one `default` (`auth.default_queue_groups`), does not
    /// permit ([`ErrorCode::QueueGroupForbidden`]).
    pub fn queue_group_refusal(&self, group: &str, default: &[String]) -> Option<ErrorCode> {
        crate::protocol::queue_group_problem(group).or_else(|| {
            (!self.may_join_queue_group(group, default)).then_some(ErrorCode::QueueGroupForbidden)
        })
    }
}

/// Allow/deny glob lists (`*` any run, `?` one char); deny wins; an absent allow list allows all.
// Boxed slices, not Vecs: two Acls live in every connection's Identity (a million of them), and a
// boxed slice is a word smaller, never over-allocated, and allocates nothing when empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    /// `None` = everything not denied.
    allow: Option<Box<[Box<str>]>>,
    deny: Box<[Box<str>]>,
}

impl Acl {
    /// Everything allowed.
    pub fn allow_all() -> Self {
        Self {
            allow: None,
            deny: Box::default(),
        }
    }
    /// Nothing allowed.
    pub fn deny_all() -> Self {
        Self {
            allow: Some(Box::default()),
            deny: Box::default(),
        }
    }
    /// Every topic matching none of `deny`.
    pub fn allow_all_but(deny: Vec<String>) -> Self {
        Self {
            allow: None,
            deny: boxed_globs(deny),
        }
    }
    /// Only topics matching one of `allow` and none of `deny`.
    pub fn new(allow: Vec<String>, deny: Vec<String>) -> Self {
        Self {
            allow: Some(boxed_globs(allow)),
            deny: boxed_globs(deny),
        }
    }
    /// Whether `topic` matches no deny glob and (when there is an allow list) some allow glob.
    pub fn permits(&self, topic: &str) -> bool {
        !self.deny.iter().any(|glob| glob_match(glob, topic))
            && self
                .allow
                .as_deref()
                .is_none_or(|allow| allow.iter().any(|glob| glob_match(glob, topic)))
    }
}

/// Glob match with `*` (any run, including empty) and `?` (exactly one char).
// Hand-written rather than a crate: it is this small, it runs on every subscribe and publish
// check, and glob crates bring path semantics (`/` special, `**`, classes) that topics must not
// have. Iterative, backtracking only to the last `*` seen: O(pattern × text) at worst, never the
// exponential blow-up of the recursive form on patterns such as `a*a*a*a*b`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where to resume after a mismatch: the pattern just past the last `*`, and the text
    // position that `*` has swallowed up to.
    let mut resume: Option<(usize, usize)> = None;
    while ti < t.len() {
        // Literals compare byte by byte: both sides are UTF-8, so whole chars match exactly
        // when their bytes do, and `*`/`?` (ASCII) are only ever met on char boundaries.
        match p.get(pi) {
            Some(b'*') => {
                pi += 1;
                resume = Some((pi, ti));
                continue;
            }
            Some(b'?') => {
                pi += 1;
                ti += utf8_len(t[ti]);
                continue;
            }
            Some(&c) if c == t[ti] => {
                pi += 1;
                ti += 1;
                continue;
            }
            _ => {}
        }
        let Some((after_star, swallowed)) = resume else {
            return false;
        };
        let swallowed = swallowed + utf8_len(t[swallowed]);
        resume = Some((after_star, swallowed));
        (pi, ti) = (after_star, swallowed);
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Why a token was refused. `Display` is safe to send to the client (no key material, no
/// internals).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in any place the client may put one (query, cookie, `Authorization`).
    #[error("authentication required")]
    Missing,
    /// The token is longer than the size cap, refused before it is parsed.
    #[error("token too large")]
    TooLarge,
    /// Not three base64url parts with a JSON header and claims.
    #[error("malformed token")]
    Malformed,
    /// The signature does not verify with the current key (nor the previous one in a rotation).
    #[error("invalid signature")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is still in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` does not include the configured audience.
    #[error("wrong audience")]
    WrongAudience,
    /// A `kid` is configured and the token header's `kid` is not it.
    #[error("unknown key id")]
    WrongKid,
    /// No `sub` claim, or an empty one: a connection needs a user id.
    #[error("missing or empty sub claim")]
    MissingSub,
    /// The claims are not a JSON object, or a claim the server reads (`nbf`, `iss`, a `wse_*` right) has the wrong type or is `null`.
    #[error("invalid claims")]
    BadClaims,
}

impl AuthError {
    /// Every reason, in the order of [`crate::metrics::ShardMetrics::auth_failures`].
    pub const ALL: [AuthError; 11] = [
        AuthError::Missing,
        AuthError::TooLarge,
        AuthError::Malformed,
        AuthError::BadSignature,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::WrongIssuer,
        AuthError::WrongAudience,
        AuthError::WrongKid,
        AuthError::MissingSub,
        AuthError::BadClaims,
    ];

    /// The WSE error code: `AUTH_REQUIRED` when no token was given, else `AUTH_FAILED`.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Missing => ErrorCode::AuthRequired,
            _ => ErrorCode::AuthFailed,
        }
    }
}

/// Verifies tokens for one server; built once at start-up, shared read-only by the shards.
#[derive(Debug)] // DecodingKey's Debug redacts the key material.
pub struct Authenticator {
    key: DecodingKey,
    /// Still accepted during a rotation; tried only when `key` refuses the signature.
    previous_key: Option<DecodingKey>,
    /// Pins the algorithm: jsonwebtoken refuses any token whose header names another.
    validation: Validation,
    kid: Option<Box<str>>,
    /// `auth.issuer`: the token's `iss` must be this very string. jsonwebtoken also accepts an
    /// array of issuers that holds it (foreign ones beside it included), so we check again.
    issuer: Option<Box<str>>,
    cookie_name: Box<str>,
    /// Publish rights of a token without `wse_publish`.
    default_publish: Acl,
}

impl Authenticator {
    /// Builds the verifier, reading PEM key files.
    ///
    /// # Errors
    /// A key file that cannot be read or parsed, named by its config key.
    pub fn new(cfg: &AuthConfig) -> Result<Self, ConfigError> {
        // jsonwebtoken 11 picks its crypto backend at run time from its crate features and panics
        // at the first verification when it cannot (both `rust_crypto` and `aws_lc_rs` enabled,
        // e.g. by feature unification with another dependency). Installing ours explicitly takes
        // that trap away; an Err only means a provider is installed already.
        let _ = CryptoProvider::install_default(&rust_crypto::DEFAULT_PROVIDER);

        let (algorithm, key, previous_key) = match cfg.algorithm {
            JwtAlgorithm::HS256 => {
                let secret = cfg
                    .secret
                    .as_deref()
                    .map(str::as_bytes)
                    .or(cfg.secret_bytes.as_deref())
                    .ok_or_else(|| bad("auth.secret", "required for HS256"))?;
                let previous = cfg
                    .previous_secret
                    .as_deref()
                    .map(str::as_bytes)
                    .or(cfg.previous_secret_bytes.as_deref());
                (
                    Algorithm::HS256,
                    hmac_key("auth.secret", secret)?,
                    previous
                        .map(|s| hmac_key("auth.previous_secret", s))
                        .transpose()?,
                )
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                let algorithm = if cfg.algorithm == JwtAlgorithm::RS256 {
                    Algorithm::RS256
                } else {
                    Algorithm::ES256
                };
                let current = match (&cfg.public_key_pem, cfg.public_key_file.as_deref()) {
                    (Some(pem), _) => pem_text_key("auth.public_key_pem", pem, algorithm)?,
                    (None, Some(path)) => pem_key("auth.public_key_file", path, algorithm)?,
                    (None, None) => {
                        return Err(bad("auth.public_key_file", "required for RS256/ES256"));
                    }
                };
                let previous = match (
                    &cfg.previous_public_key_pem,
                    cfg.previous_public_key_file.as_deref(),
                ) {
                    (Some(pem), _) => Some(pem_text_key(
                        "auth.previous_public_key_pem",
                        pem,
                        algorithm,
                    )?),
                    (None, Some(p)) => {
                        Some(pem_key("auth.previous_public_key_file", p, algorithm)?)
                    }
                    (None, None) => None,
                };
                (algorithm, current, previous)
            }
        };

        let mut validation = Validation::new(algorithm);
        validation.leeway = cfg.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(issuer) = &cfg.issuer {
            validation.set_issuer(&[issuer]);
            // jsonwebtoken checks `iss` only when the token has one; a required issuer must be
            // present too.
            validation.required_spec_claims.insert("iss".to_owned());
        }
        if cfg.audience.is_empty() {
            // Off rather than empty: jsonwebtoken otherwise refuses every token that carries an
            // `aud` when no audience is configured, and issuers routinely set one.
            validation.validate_aud = false;
        } else {
            validation.set_audience(&cfg.audience);
            validation.required_spec_claims.insert("aud".to_owned());
        }

        Ok(Self {
            key,
            previous_key,
            validation,
            kid: cfg.kid.as_deref().map(Box::from),
            issuer: cfg.issuer.as_deref().map(Box::from),
            cookie_name: cfg.cookie_name.as_str().into(),
            default_publish: Acl::new(cfg.default_publish.clone(), Vec::new()),
        })
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
        // The placeholder values are skipped in every source, not only the cookie: they are what
        // client code sends when it has no token, so they mean "no token here, try the next
        // source" (and AUTH_REQUIRED when none has one) rather than a forged one.
        cookie_header
            .and_then(|header| cookie_token(header, &self.cookie_name))
            .or_else(|| authorization.and_then(bearer_token))
            .map(Cow::Borrowed)
            .or_else(|| query.and_then(query_token))
    }

    /// Verifies a token and reads its claims.
    ///
    /// # Errors
    /// Why the token was refused.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_with_claims(token).map(|(identity, _)| identity)
    }

    /// [`Authenticator::verify`], also returning the token's standard claims that are present
    /// (`sub`, `iss`, `aud`, `exp`, `iat`, `nbf`, `jti`) as a JSON object, for the application's
    /// `auth_connect` event. Built once per connection and not kept.
    ///
    /// # Errors
    /// Why the token was refused.
    pub fn verify_with_claims(&self, token: &str) -> Result<(Identity, bytes::Bytes), AuthError> {
        self.check_size_and_kid(token)?;
        let decoded = match (self.decode(token, &self.key), &self.previous_key) {
            // Only a signature mismatch means "maybe the other key": any other refusal is about
            // the token itself, and the previous key's verdict on a token it signed (expired,
            // wrong audience...) is the one reported.
            (Err(e), Some(previous)) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                self.decode(token, previous)
            }
            (decoded, _) => decoded,
        };
        let claims = decoded.map_err(|e| refusal(&e))?;
        if let Some(issuer) = &self.issuer
            && !claims
                .iss
                .as_deref()
                .is_some_and(|iss| is_string(iss, issuer))
        {
            return Err(AuthError::WrongIssuer);
        }
        let standard = claims.standard();
        Ok((self.identity(claims)?, standard))
    }
}

/// Whether `raw` is a JSON string equal to `want` (escapes decoded): not an array holding it.
fn is_string(raw: &RawValue, want: &str) -> bool {
    serde_json::from_str::<Cow<'_, str>>(raw.get()).is_ok_and(|s| s == want)
}

/// False for the placeholders that client code writes when it has no token.
fn is_token(value: &str) -> bool {
    !matches!(value, "" | "undefined" | "null")
}

/// A `Cookie:` header's value for `name`: the first usable one, should the name repeat (browsers
/// send the most specific path's first).
fn cookie_token<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| key.trim() == name)
        .map(|(_, value)| {
            let value = value.trim();
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value)
        })
        .find(|value| is_token(value))
}

fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && is_token(token)).then_some(token)
}

/// The `token` parameter of a query string, percent-decoded. A JWT needs no decoding (base64url
/// and dots), so this borrows unless the client escaped anyway.
fn query_token(query: &str) -> Option<Cow<'_, str>> {
    let query = query.strip_prefix('?').unwrap_or(query);
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| *key == "token")
        .filter_map(|(_, value)| percent_decode_str(value).decode_utf8().ok())
        .find(|value| is_token(value))
}

impl Authenticator {
    /// The checks made before a token's signature: its size first (the client controls it, and
    /// the base64 and JSON work grow with it), then the pinned `kid`, if any.
    fn check_size_and_kid(&self, token: &str) -> Result<(), AuthError> {
        if token.len() > TOKEN_LEN_MAX {
            return Err(AuthError::TooLarge);
        }
        if let Some(kid) = &self.kid {
            let header = jsonwebtoken::decode_header(token).map_err(|e| refusal(&e))?;
            if header.kid.as_deref() != Some(&**kid) {
                return Err(AuthError::WrongKid);
            }
        }
        Ok(())
    }

    /// Verifies `token` as [`Authenticator::verify`] does — size cap, `kid`, the pinned
    /// algorithm, the current key then the previous one, `exp` (required), `nbf`, `iss`, `aud`
    /// — and reads its claims as `T`: for a client protocol whose tokens carry claims of their
    /// own (the Centrifuge dialect's connection and subscription tokens, where `sub` may be
    /// empty). Same keys and rules as WSE tokens, so a rotation covers both.
    ///
    /// # Errors
    /// Why the token was refused; [`AuthError::BadClaims`] when its claims do not read as `T`.
    pub fn verify_as<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, AuthError> {
        self.check_size_and_kid(token)?;
        let decode = |key: &DecodingKey| {
            jsonwebtoken::decode::<serde_json::Value>(token, key, &self.validation)
                .map(|data| data.claims)
        };
        let claims = match (decode(&self.key), &self.previous_key) {
            (Err(e), Some(previous)) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                decode(previous)
            }
            (decoded, _) => decoded,
        }
        .map_err(|e| refusal(&e))?;
        // As in `verify_with_claims`: the issuer must be this very string, not an array holding it.
        if let Some(issuer) = &self.issuer
            && claims.get("iss").and_then(serde_json::Value::as_str) != Some(&**issuer)
        {
            return Err(AuthError::WrongIssuer);
        }
        serde_json::from_value(claims).map_err(|_| AuthError::BadClaims)
    }
}

impl Authenticator {
    fn decode(&self, token: &str, key: &DecodingKey) -> jsonwebtoken::errors::Result<Claims> {
        jsonwebtoken::decode::<Claims>(token, key, &self.validation).map(|data| data.claims)
    }

    /// Reads our claims from a verified token, refusing any that is present but wrongly typed:
    /// a claim we cannot read must not widen the connection's rights.
    fn identity(&self, claims: Claims) -> Result<Identity, AuthError> {
        let user_id = claims
            .sub
            .and_then(|raw| serde_json::from_str::<Box<str>>(raw.get()).ok())
            .filter(|sub| !sub.is_empty())
            .ok_or(AuthError::MissingSub)?;
        let subscribe = match claims.wse_topics {
            None => Acl::allow_all(),
            Some(raw) => acl_claim(&raw)?,
        };
        let publish = match claims.wse_publish {
            None => self.default_publish.clone(),
            Some(raw) => acl_claim(&raw)?,
        };
        let auto_subscribe = match claims.wse_subscribe {
            None => Vec::new(),
            Some(raw) => {
                let mut topics: Vec<Box<str>> =
                    serde_json::from_str(raw.get()).map_err(|_| AuthError::BadClaims)?;
                // It lives as long as the connection; serde may have grown it past its length.
                topics.shrink_to_fit();
                topics
            }
        };
        let queue_groups = match claims.wse_queue_groups {
            None => None,
            Some(raw) => Some(Box::new(acl_claim(&raw)?)),
        };
        Ok(Identity {
            user_id,
            subscribe,
            publish,
            auto_subscribe,
            queue_groups,
        })
    }
}

/// The claims we read, each kept as raw JSON until checked: a wrongly typed claim must be told
/// apart from a payload that is not JSON at all (`BadClaims`, not `Malformed`), and `null` must count
/// as present and wrong, not as absent (absent means "everything" for `wse_topics`).
#[derive(Deserialize)]
struct Claims {
    #[serde(default, deserialize_with = "present")]
    sub: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    wse_topics: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    wse_publish: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    wse_subscribe: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    wse_queue_groups: Option<Box<RawValue>>,
    // The standard claims the application hears about (`auth_connect`); jsonwebtoken has
    // checked the ones it validates.
    #[serde(default, deserialize_with = "present")]
    iss: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    aud: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    exp: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    iat: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    nbf: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    jti: Option<Box<RawValue>>,
}

impl Claims {
    /// The standard claims present, as a JSON object.
    fn standard(&self) -> bytes::Bytes {
        let fields = [
            ("sub", &self.sub),
            ("iss", &self.iss),
            ("aud", &self.aud),
            ("exp", &self.exp),
            ("iat", &self.iat),
            ("nbf", &self.nbf),
            ("jti", &self.jti),
        ];
        let map: serde_json::Map<String, serde_json::Value> = fields
            .into_iter()
            .filter_map(|(k, v)| {
                let v = serde_json::from_str(v.as_deref()?.get()).ok()?;
                Some((k.to_owned(), v))
            })
            .collect();
        bytes::Bytes::from(serde_json::to_vec(&map).expect("a map serialises"))
    }
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// `{"allow": [globs], "deny": [globs]}`. Unknown keys are refused: a misspelt `"alow"` would
/// otherwise read as "no allow list", which allows everything.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AclClaim {
    #[serde(default, deserialize_with = "list")]
    allow: Option<Vec<Box<str>>>,
    #[serde(default)]
    deny: Vec<Box<str>>,
}

/// Present means a list: `"allow": null` is refused rather than read as "no allow list".
fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Box<str>>>, D::Error> {
    Vec::deserialize(d).map(Some)
}

fn acl_claim(raw: &RawValue) -> Result<Acl, AuthError> {
    let claim: AclClaim = serde_json::from_str(raw.get()).map_err(|_| AuthError::BadClaims)?;
    Ok(Acl {
        allow: claim.allow.map(Vec::into_boxed_slice),
        deny: claim.deny.into_boxed_slice(),
    })
}

/// The client-facing reason for a jsonwebtoken refusal.
fn refusal(e: &jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        // A header naming another algorithm than the pinned one (HS256 signed with our RSA
        // public key, say) is a token we cannot have signed: a bad signature, to the client.
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => AuthError::BadSignature,
        // Required because configured: a token without them is not for this server.
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => AuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
            AuthError::BadClaims
        }
        // Not three base64url parts of JSON, an unknown `alg` (including "none"), or key errors,
        // which `new` has ruled out.
        _ => AuthError::Malformed,
    }
}

fn bad(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        problem: problem.into(),
    }
}

/// Shortest HS256 secret we accept (protocol.md §1).
const HS256_SECRET_MIN: usize = 32;

fn hmac_key(key: &'static str, secret: &[u8]) -> Result<DecodingKey, ConfigError> {
    // Config::validate checks this too; repeated because `new` may be given a configuration that
    // was not validated, and a short HMAC secret can be brute-forced offline from any token.
    if secret.len() < HS256_SECRET_MIN {
        return Err(bad(
            key,
            format!("must be at least {HS256_SECRET_MIN} bytes"),
        ));
    }
    Ok(DecodingKey::from_secret(secret))
}

fn pem_key(
    key: &'static str,
    path: &Path,
    algorithm: Algorithm,
) -> Result<DecodingKey, ConfigError> {
    let pem = std::fs::read(path)
        .map_err(|e| bad(key, format!("cannot read {}: {e}", path.display())))?;
    parse_pem(&pem, algorithm).map_err(|e| {
        bad(
            key,
            format!(
                "{}: not a {algorithm:?} public key in PEM ({e})",
                path.display()
            ),
        )
    })
}

/// A public key handed over as PEM text (embedders), checked as a file's would be.
fn pem_text_key(
    key: &'static str,
    pem: &str,
    algorithm: Algorithm,
) -> Result<DecodingKey, ConfigError> {
    parse_pem(pem.as_bytes(), algorithm)
        .map_err(|e| bad(key, format!("not a {algorithm:?} public key in PEM ({e})")))
}

fn parse_pem(pem: &[u8], algorithm: Algorithm) -> jsonwebtoken::errors::Result<DecodingKey> {
    let parsed = if algorithm == Algorithm::RS256 {
        DecodingKey::from_rsa_pem(pem)
    } else {
        DecodingKey::from_ec_pem(pem)
    };
    parsed
        .and_then(|decoding_key| check_public_key(&decoding_key, algorithm).map(|()| decoding_key))
}

/// jsonwebtoken parses RSA key material only when it verifies (and then every time); parsing it
/// here makes a wrong file (a private key, a certificate, another curve) fail start-up rather
/// than every token.
fn check_public_key(key: &DecodingKey, algorithm: Algorithm) -> jsonwebtoken::errors::Result<()> {
    let provider = &rust_crypto::DEFAULT_PROVIDER;
    (provider.verifier_factory)(&algorithm, key)?;
    if algorithm == Algorithm::RS256 {
        (provider.key_utils.rsa_pub_components_from_public_key)(key.try_get_as_bytes()?)?;
    }
    Ok(())
}

fn boxed_globs(globs: Vec<String>) -> Box<[Box<str>]> {
    globs.into_iter().map(String::into_boxed_str).collect()
}

/// Length of the UTF-8 sequence that starts with `lead`.
fn utf8_len(lead: u8) -> usize {
    match lead {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use serde_json::{Value, json};

    use super::*;

    const SECRET: &str = "test-secret-for-hs256-at-least-32-bytes";
    const OLD_SECRET: &str = "previous-test-secret-at-least-32-bytes!!";
    const OTHER_SECRET: &str = "some-other-secret-nobody-configured-here";

    // Test-only keys (tests/fixtures/README.md).
    const RSA1_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/rsa1-private.pem");
    const RSA1_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/rsa1-public.pem");
    const RSA2_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/rsa2-private.pem");
    const EC1_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/ec1-private.pem");
    const EC2_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/ec2-private.pem");

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn now() -> u64 {
        get_current_timestamp()
    }

    fn hs_cfg() -> AuthConfig {
        AuthConfig {
            enabled: true,
            secret: Some(SECRET.to_owned()),
            ..AuthConfig::default()
        }
    }

    fn pem_cfg(algorithm: JwtAlgorithm, public: &str) -> AuthConfig {
        AuthConfig {
            enabled: true,
            algorithm,
            public_key_file: Some(fixture(public)),
            ..AuthConfig::default()
        }
    }

    fn auth(cfg: &AuthConfig) -> Authenticator {
        Authenticator::new(cfg).expect("test config is valid")
    }

    /// `sub` = alice, `exp` in ten minutes, then `extra` merged in (a `null` removes the claim).
    fn claims(extra: Value) -> Value {
        let mut claims = json!({"sub": "alice", "exp": now() + 600});
        for (name, value) in extra.as_object().expect("an object") {
            if value.is_null() {
                claims.as_object_mut().unwrap().remove(name);
            } else {
                claims[name] = value.clone();
            }
        }
        claims
    }

    fn sign(header: &Header, claims: &Value, key: &EncodingKey) -> String {
        encode(header, claims, key).expect("test token encodes")
    }

    fn hs(claims: &Value, secret: &str) -> String {
        sign(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
    }

    fn rs(claims: &Value, private: &[u8]) -> String {
        sign(
            &Header::new(Algorithm::RS256),
            claims,
            &EncodingKey::from_rsa_pem(private).unwrap(),
        )
    }

    fn es(claims: &Value, private: &[u8]) -> String {
        sign(
            &Header::new(Algorithm::ES256),
            claims,
            &EncodingKey::from_ec_pem(private).unwrap(),
        )
    }

    fn unsigned(header: &Value, claims: &Value) -> String {
        let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
        format!("{}.{}.", part(header), part(claims))
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    // --- HS256 and the standard claims -------------------------------------------------------

    #[test]
    fn hs256_valid_token_gives_the_identity() {
        let a = auth(&hs_cfg());
        let id = a.verify(&hs(&claims(json!({})), SECRET)).unwrap();
        assert_eq!(&*id.user_id, "alice");
        assert_eq!(id.subscribe, Acl::allow_all());
        assert_eq!(
            id.publish,
            Acl::deny_all(),
            "default_publish is empty: publish nothing"
        );
        assert!(id.auto_subscribe.is_empty());
    }

    #[test]
    fn wrong_secret_is_a_bad_signature() {
        let a = auth(&hs_cfg());
        let token = hs(&claims(json!({})), OTHER_SECRET);
        assert_eq!(a.verify(&token), Err(AuthError::BadSignature));
    }

    #[test]
    fn tampered_payload_is_a_bad_signature() {
        let a = auth(&hs_cfg());
        let token = hs(&claims(json!({})), SECRET);
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(json!({"sub": "mallory"}))).unwrap());
        parts[1] = &forged;
        assert_eq!(a.verify(&parts.join(".")), Err(AuthError::BadSignature));
    }

    #[test]
    fn expiry_honours_the_leeway() {
        let a = auth(&hs_cfg()); // leeway 30 s
        let beyond = hs(&claims(json!({"exp": now() - 120})), SECRET);
        assert_eq!(a.verify(&beyond), Err(AuthError::Expired));
        let within = hs(&claims(json!({"exp": now() - 10})), SECRET);
        assert_eq!(&*a.verify(&within).unwrap().user_id, "alice");

        let strict = auth(&AuthConfig {
            leeway: Duration::ZERO,
            ..hs_cfg()
        });
        assert_eq!(strict.verify(&within), Err(AuthError::Expired));
    }

    #[test]
    fn not_before_honours_the_leeway() {
        let a = auth(&hs_cfg());
        let beyond = hs(&claims(json!({"nbf": now() + 120})), SECRET);
        assert_eq!(a.verify(&beyond), Err(AuthError::NotYetValid));
        let within = hs(&claims(json!({"nbf": now() + 10})), SECRET);
        a.verify(&within).unwrap();
        let past = hs(&claims(json!({"nbf": now() - 10})), SECRET);
        a.verify(&past).unwrap();
    }

    #[test]
    fn exp_is_required_and_must_be_a_number() {
        let a = auth(&hs_cfg());
        let missing = hs(&claims(json!({"exp": null})), SECRET);
        assert_eq!(a.verify(&missing), Err(AuthError::BadClaims));
        let text = hs(&claims(json!({"exp": "tomorrow"})), SECRET);
        assert_eq!(a.verify(&text), Err(AuthError::BadClaims));
        let bad_nbf = hs(&claims(json!({"nbf": "now"})), SECRET);
        assert_eq!(a.verify(&bad_nbf), Err(AuthError::BadClaims));
    }

    #[test]
    fn issuer_is_checked_only_when_configured() {
        let open = auth(&hs_cfg());
        open.verify(&hs(&claims(json!({"iss": "anyone"})), SECRET))
            .unwrap();

        let a = auth(&AuthConfig {
            issuer: Some("https://auth.example".to_owned()),
            ..hs_cfg()
        });
        let good = hs(&claims(json!({"iss": "https://auth.example"})), SECRET);
        a.verify(&good).unwrap();
        let wrong = hs(&claims(json!({"iss": "https://evil.example"})), SECRET);
        assert_eq!(a.verify(&wrong), Err(AuthError::WrongIssuer));
        let missing = hs(&claims(json!({})), SECRET);
        assert_eq!(a.verify(&missing), Err(AuthError::WrongIssuer));
    }

    #[test]
    fn issuer_must_be_a_string_not_an_array_holding_it() {
        let a = auth(&AuthConfig {
            issuer: Some("https://auth.example".to_owned()),
            ..hs_cfg()
        });
        for iss in [
            json!(["https://auth.example", "https://evil.example"]),
            json!(["https://auth.example"]),
            json!({"iss": "https://auth.example"}),
            json!(null),
            json!(1),
        ] {
            let token = hs(&claims(json!({ "iss": iss })), SECRET);
            assert_eq!(a.verify(&token), Err(AuthError::WrongIssuer), "{iss}");
        }
    }

    #[test]
    fn audience_string_or_array_must_match_when_configured() {
        let a = auth(&AuthConfig {
            audience: strings(&["wse", "chat"]),
            ..hs_cfg()
        });
        for aud in [json!("wse"), json!("chat"), json!(["other", "wse"])] {
            let token = hs(&claims(json!({ "aud": aud })), SECRET);
            a.verify(&token)
                .unwrap_or_else(|e| panic!("aud {aud}: {e}"));
        }
        for aud in [json!("other"), json!(["other", "more"])] {
            let token = hs(&claims(json!({ "aud": aud })), SECRET);
            assert_eq!(a.verify(&token), Err(AuthError::WrongAudience), "aud {aud}");
        }
        let missing = hs(&claims(json!({})), SECRET);
        assert_eq!(a.verify(&missing), Err(AuthError::WrongAudience));
    }

    #[test]
    fn audience_in_token_is_accepted_when_none_is_configured() {
        let a = auth(&hs_cfg());
        for aud in [json!("whoever"), json!(["a", "b"])] {
            let token = hs(&claims(json!({ "aud": aud })), SECRET);
            a.verify(&token)
                .unwrap_or_else(|e| panic!("aud {aud}: {e}"));
        }
    }

    #[test]
    fn kid_must_match_when_configured() {
        let a = auth(&AuthConfig {
            kid: Some("key-2025".to_owned()),
            ..hs_cfg()
        });
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let with_kid = |kid: Option<&str>| {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = kid.map(str::to_owned);
            sign(&header, &claims(json!({})), &key)
        };
        a.verify(&with_kid(Some("key-2025"))).unwrap();
        assert_eq!(
            a.verify(&with_kid(Some("key-2024"))),
            Err(AuthError::WrongKid)
        );
        assert_eq!(a.verify(&with_kid(None)), Err(AuthError::WrongKid));
        assert_eq!(a.verify("not a jwt"), Err(AuthError::Malformed));

        // Unconfigured, any kid (or none) is fine.
        auth(&hs_cfg()).verify(&with_kid(Some("whatever"))).unwrap();
    }

    #[test]
    fn previous_secret_is_accepted_during_rotation() {
        let a = auth(&AuthConfig {
            previous_secret: Some(OLD_SECRET.to_owned()),
            ..hs_cfg()
        });
        a.verify(&hs(&claims(json!({})), SECRET)).unwrap();
        a.verify(&hs(&claims(json!({})), OLD_SECRET)).unwrap();
        let neither = hs(&claims(json!({})), OTHER_SECRET);
        assert_eq!(a.verify(&neither), Err(AuthError::BadSignature));
        // The previous key's verdict on a token it signed is the one reported.
        let old_expired = hs(&claims(json!({"exp": now() - 3600})), OLD_SECRET);
        assert_eq!(a.verify(&old_expired), Err(AuthError::Expired));

        let without = auth(&hs_cfg());
        let old = hs(&claims(json!({})), OLD_SECRET);
        assert_eq!(without.verify(&old), Err(AuthError::BadSignature));
    }

    #[test]
    fn sub_must_be_a_non_empty_string() {
        let a = auth(&hs_cfg());
        for sub in [Value::Null, json!(""), json!(42), json!(false)] {
            let mut c = claims(json!({}));
            if sub.is_null() {
                c.as_object_mut().unwrap().remove("sub");
            } else {
                c["sub"] = sub.clone();
            }
            assert_eq!(
                a.verify(&hs(&c, SECRET)),
                Err(AuthError::MissingSub),
                "sub {sub}"
            );
        }
        // jsonwebtoken's own claim parsing trips over these first: refused all the same.
        for sub in [json!(["alice"]), json!({"id": "alice"})] {
            let token = hs(&claims(json!({ "sub": sub })), SECRET);
            assert_eq!(a.verify(&token), Err(AuthError::Malformed), "sub {sub}");
        }
        let escaped = hs(&claims(json!({"sub": "al\"ice\u{e9}"})), SECRET);
        assert_eq!(&*a.verify(&escaped).unwrap().user_id, "al\"ice\u{e9}");
    }

    #[test]
    fn garbage_is_malformed() {
        let a = auth(&hs_cfg());
        let valid = hs(&claims(json!({})), SECRET);
        let (header, rest) = valid.split_once('.').unwrap();
        for token in [
            "",
            "garbage",
            "a.b",
            "a.b.c",
            "a.b.c.d",
            "!!!.@@@.###",
            &format!("{header}.{header}.{header}.{rest}"),
        ] {
            assert_eq!(
                a.verify(token),
                Err(AuthError::Malformed),
                "token {token:?}"
            );
        }
        // The signature is checked before the payload is parsed: unsigned junk is just that.
        let not_json = format!("{header}.{}.c2ln", URL_SAFE_NO_PAD.encode(b"not json"));
        assert_eq!(a.verify(&not_json), Err(AuthError::BadSignature));
    }

    #[test]
    fn signed_payload_that_is_not_a_json_object_is_malformed() {
        let a = auth(&hs_cfg());
        let token = sign(
            &Header::new(Algorithm::HS256),
            &json!(["sub", "alice"]),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        );
        assert_eq!(a.verify(&token), Err(AuthError::Malformed));

        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode(b"{not json"));
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256);
        let token = format!("{message}.{}", signature.unwrap());
        assert_eq!(a.verify(&token), Err(AuthError::Malformed));
    }

    #[test]
    fn oversize_token_is_refused_before_parsing() {
        let a = auth(&hs_cfg());
        assert_eq!(
            a.verify(&"x".repeat(TOKEN_LEN_MAX + 1)),
            Err(AuthError::TooLarge)
        );
        // At the limit it is parsed (and refused for what it is).
        assert_eq!(
            a.verify(&"x".repeat(TOKEN_LEN_MAX)),
            Err(AuthError::Malformed)
        );
        // A genuine, well-signed token is refused too once it is over 8 KiB.
        let big = hs(&claims(json!({"pad": "p".repeat(TOKEN_LEN_MAX)})), SECRET);
        assert!(big.len() > TOKEN_LEN_MAX);
        assert_eq!(a.verify(&big), Err(AuthError::TooLarge));
    }

    // --- pinned algorithm --------------------------------------------------------------------

    #[test]
    fn alg_none_is_refused() {
        let c = claims(json!({}));
        for header in [
            json!({"alg": "none", "typ": "JWT"}),
            json!({"alg": "None"}),
            json!({"typ": "JWT"}),
        ] {
            let token = unsigned(&header, &c);
            assert_eq!(
                auth(&hs_cfg()).verify(&token),
                Err(AuthError::Malformed),
                "{header}"
            );
            let rsa = auth(&pem_cfg(JwtAlgorithm::RS256, "rsa1-public.pem"));
            assert_eq!(rsa.verify(&token), Err(AuthError::Malformed), "{header}");
        }
    }

    #[test]
    fn hs256_token_is_refused_when_rs256_is_pinned() {
        let a = auth(&pem_cfg(JwtAlgorithm::RS256, "rsa1-public.pem"));
        // The classic confusion: HMAC keyed with the server's public key, which is no secret.
        let with_public_key = sign(
            &Header::new(Algorithm::HS256),
            &claims(json!({})),
            &EncodingKey::from_secret(RSA1_PUBLIC),
        );
        assert_eq!(a.verify(&with_public_key), Err(AuthError::BadSignature));
        assert_eq!(
            a.verify(&hs(&claims(json!({})), SECRET)),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn other_algorithms_are_refused_whatever_the_header_says() {
        let hs_pinned = auth(&hs_cfg());
        let rs = rs(&claims(json!({})), RSA1_PRIVATE);
        assert_eq!(hs_pinned.verify(&rs), Err(AuthError::BadSignature));
        let hs512 = sign(
            &Header::new(Algorithm::HS512),
            &claims(json!({})),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        );
        assert_eq!(hs_pinned.verify(&hs512), Err(AuthError::BadSignature));

        let rs_pinned = auth(&pem_cfg(JwtAlgorithm::RS256, "rsa1-public.pem"));
        let ps256 = sign(
            &Header::new(Algorithm::PS256),
            &claims(json!({})),
            &EncodingKey::from_rsa_pem(RSA1_PRIVATE).unwrap(),
        );
        assert_eq!(rs_pinned.verify(&ps256), Err(AuthError::BadSignature));
        let es = es(&claims(json!({})), EC1_PRIVATE);
        assert_eq!(rs_pinned.verify(&es), Err(AuthError::BadSignature));
    }

    #[test]
    fn rs256_valid_and_invalid() {
        let a = auth(&pem_cfg(JwtAlgorithm::RS256, "rsa1-public.pem"));
        let id = a
            .verify(&rs(&claims(json!({"sub": "bob"})), RSA1_PRIVATE))
            .unwrap();
        assert_eq!(&*id.user_id, "bob");
        let other_key = rs(&claims(json!({})), RSA2_PRIVATE);
        assert_eq!(a.verify(&other_key), Err(AuthError::BadSignature));
        let expired = rs(&claims(json!({"exp": now() - 3600})), RSA1_PRIVATE);
        assert_eq!(a.verify(&expired), Err(AuthError::Expired));
    }

    #[test]
    fn es256_valid_and_invalid() {
        let a = auth(&pem_cfg(JwtAlgorithm::ES256, "ec1-public.pem"));
        let id = a
            .verify(&es(&claims(json!({"sub": "carol"})), EC1_PRIVATE))
            .unwrap();
        assert_eq!(&*id.user_id, "carol");
        let other_key = es(&claims(json!({})), EC2_PRIVATE);
        assert_eq!(a.verify(&other_key), Err(AuthError::BadSignature));
        let rs = rs(&claims(json!({})), RSA1_PRIVATE);
        assert_eq!(a.verify(&rs), Err(AuthError::BadSignature));
    }

    #[test]
    fn previous_public_key_is_accepted_during_rotation() {
        let a = auth(&AuthConfig {
            previous_public_key_file: Some(fixture("rsa1-public.pem")),
            ..pem_cfg(JwtAlgorithm::RS256, "rsa2-public.pem")
        });
        a.verify(&rs(&claims(json!({})), RSA2_PRIVATE)).unwrap();
        a.verify(&rs(&claims(json!({})), RSA1_PRIVATE)).unwrap();

        let ec = auth(&AuthConfig {
            previous_public_key_file: Some(fixture("ec2-public.pem")),
            ..pem_cfg(JwtAlgorithm::ES256, "ec1-public.pem")
        });
        ec.verify(&es(&claims(json!({})), EC1_PRIVATE)).unwrap();
        ec.verify(&es(&claims(json!({})), EC2_PRIVATE)).unwrap();
    }

    // --- start-up errors ---------------------------------------------------------------------

    #[test]
    fn new_names_the_config_key_at_fault() {
        let key_of = |cfg: AuthConfig| Authenticator::new(&cfg).unwrap_err().key;

        let missing = fixture("no-such-key.pem");
        let e = Authenticator::new(&AuthConfig {
            public_key_file: Some(missing.clone()),
            ..pem_cfg(JwtAlgorithm::RS256, "unused")
        })
        .unwrap_err();
        assert_eq!(e.key, "auth.public_key_file");
        assert!(e.problem.contains("no-such-key.pem"), "{e}");

        assert_eq!(
            key_of(AuthConfig {
                previous_public_key_file: Some(missing),
                ..pem_cfg(JwtAlgorithm::ES256, "ec1-public.pem")
            }),
            "auth.previous_public_key_file"
        );
        assert_eq!(
            key_of(AuthConfig {
                public_key_file: None,
                ..pem_cfg(JwtAlgorithm::RS256, "unused")
            }),
            "auth.public_key_file"
        );
        assert_eq!(
            key_of(AuthConfig {
                secret: None,
                ..hs_cfg()
            }),
            "auth.secret"
        );
        assert_eq!(
            key_of(AuthConfig {
                secret: Some("short".to_owned()),
                ..hs_cfg()
            }),
            "auth.secret"
        );
        assert_eq!(
            key_of(AuthConfig {
                previous_secret: Some("short".to_owned()),
                ..hs_cfg()
            }),
            "auth.previous_secret"
        );
    }

    #[test]
    fn new_refuses_key_files_that_are_not_the_pinned_kind_of_public_key() {
        for (algorithm, file) in [
            (JwtAlgorithm::RS256, "ec1-public.pem"),
            (JwtAlgorithm::RS256, "rsa1-private.pem"),
            (JwtAlgorithm::RS256, "README.md"),
            (JwtAlgorithm::ES256, "rsa1-public.pem"),
            (JwtAlgorithm::ES256, "ec1-private.pem"),
        ] {
            let e = Authenticator::new(&pem_cfg(algorithm, file))
                .err()
                .unwrap_or_else(|| panic!("{algorithm:?} accepted {file}"));
            assert_eq!(e.key, "auth.public_key_file", "{algorithm:?} {file}");
        }
    }

    #[test]
    fn authenticator_is_shareable_across_shards() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Authenticator>();
    }

    // --- our claims --------------------------------------------------------------------------

    #[test]
    fn wse_claims_become_acls_and_auto_subscriptions() {
        let a = auth(&hs_cfg());
        let token = hs(
            &claims(json!({
                "wse_topics": {"allow": ["chat/*", "news.?"], "deny": ["chat/admin*"]},
                "wse_publish": {"allow": ["chat/*"]},
                "wse_subscribe": ["chat/lobby", "news.1"],
            })),
            SECRET,
        );
        let id = a.verify(&token).unwrap();
        assert!(id.subscribe.permits("chat/lobby"));
        assert!(id.subscribe.permits("news.1"));
        assert!(!id.subscribe.permits("chat/admins"));
        assert!(!id.subscribe.permits("news.10"));
        assert!(!id.subscribe.permits("other"));
        assert!(id.publish.permits("chat/lobby"));
        assert!(!id.publish.permits("news.1"));
        assert_eq!(&*id.auto_subscribe, &["chat/lobby".into(), "news.1".into()]);
        assert_eq!(id.queue_groups, None);
    }

    #[test]
    fn queue_groups_come_from_the_claim_else_the_default() {
        let a = auth(&hs_cfg());
        let default = strings(&["shared-*"]);
        let plain = a.verify(&hs(&claims(json!({})), SECRET)).unwrap();
        assert!(plain.may_join_queue_group("shared-1", &default));
        assert!(!plain.may_join_queue_group("workers", &default));
        assert!(!plain.may_join_queue_group("workers", &[]));

        let token = hs(
            &claims(
                json!({"wse_queue_groups": {"allow": ["workers", "jobs.*"], "deny": ["jobs.x"]}}),
            ),
            SECRET,
        );
        let worker = a.verify(&token).unwrap();
        assert!(worker.may_join_queue_group("workers", &[]));
        assert!(worker.may_join_queue_group("jobs.a", &[]));
        assert!(!worker.may_join_queue_group("jobs.x", &[]));
        // The claim replaces the default; it does not add to it.
        assert!(!worker.may_join_queue_group("shared-1", &default));

        let none = hs(&claims(json!({"wse_queue_groups": {"allow": []}})), SECRET);
        let none = a.verify(&none).unwrap();
        assert!(!none.may_join_queue_group("shared-1", &default));

        let anonymous = Identity::anonymous("c", &Acl::deny_all());
        assert!(anonymous.may_join_queue_group("shared-1", &default));
        assert!(!anonymous.may_join_queue_group("workers", &default));
    }

    #[test]
    fn acl_claim_without_allow_allows_all_but_deny() {
        let a = auth(&hs_cfg());
        let token = hs(
            &claims(json!({"wse_topics": {"deny": ["secret.*"]}})),
            SECRET,
        );
        let id = a.verify(&token).unwrap();
        assert!(id.subscribe.permits("anything"));
        assert!(!id.subscribe.permits("secret.plans"));

        let empty = hs(&claims(json!({"wse_topics": {}})), SECRET);
        assert_eq!(a.verify(&empty).unwrap().subscribe, Acl::allow_all());
        let nothing = hs(&claims(json!({"wse_topics": {"allow": []}})), SECRET);
        assert_eq!(a.verify(&nothing).unwrap().subscribe, Acl::deny_all());
    }

    #[test]
    fn publish_defaults_to_the_configured_acl() {
        let a = auth(&AuthConfig {
            default_publish: strings(&["public.*"]),
            ..hs_cfg()
        });
        let id = a.verify(&hs(&claims(json!({})), SECRET)).unwrap();
        assert_eq!(id.publish, Acl::new(strings(&["public.*"]), vec![]));
        assert!(id.publish.permits("public.x"));
        assert!(!id.publish.permits("private.x"));

        let own = hs(&claims(json!({"wse_publish": {"allow": ["mine"]}})), SECRET);
        let id = a.verify(&own).unwrap();
        assert!(id.publish.permits("mine"));
        assert!(!id.publish.permits("public.x"));
    }

    #[test]
    fn wrongly_typed_claims_are_refused() {
        let a = auth(&hs_cfg());
        for extra in [
            json!({"wse_topics": "chat/*"}),
            json!({"wse_topics": ["chat/*"]}),
            json!({"wse_topics": {"allow": "chat/*"}}),
            json!({"wse_topics": {"allow": [1]}}),
            json!({"wse_topics": {"allow": null}}),
            json!({"wse_topics": {"deny": null}}),
            json!({"wse_topics": {"deny": [["x"]]}}),
            json!({"wse_topics": {"alow": ["chat/*"]}}),
            json!({"wse_publish": true}),
            json!({"wse_publish": {"allow": {"chat": true}}}),
            json!({"wse_subscribe": "chat/lobby"}),
            json!({"wse_subscribe": [1, 2]}),
            json!({"wse_subscribe": {"chat": 1}}),
            json!({"wse_queue_groups": ["workers"]}),
            json!({"wse_queue_groups": {"allow": "workers"}}),
        ] {
            let token = hs(&claims(extra.clone()), SECRET);
            assert_eq!(a.verify(&token), Err(AuthError::BadClaims), "{extra}");
        }
        // `null` is present-and-wrong, not absent (absent wse_topics would allow everything).
        for name in [
            "wse_topics",
            "wse_publish",
            "wse_subscribe",
            "wse_queue_groups",
        ] {
            let mut c = claims(json!({}));
            c[name] = Value::Null;
            assert_eq!(
                a.verify(&hs(&c, SECRET)),
                Err(AuthError::BadClaims),
                "{name}"
            );
        }
    }

    #[test]
    fn unknown_claims_are_ignored() {
        let a = auth(&hs_cfg());
        let token = hs(
            &claims(json!({"role": "admin", "scopes": [1, 2], "jti": "x"})),
            SECRET,
        );
        a.verify(&token).unwrap();
    }

    // --- extraction --------------------------------------------------------------------------

    #[test]
    fn extract_token_prefers_cookie_then_bearer_then_query() {
        let a = auth(&hs_cfg());
        let get = |c, h, q| a.extract_token(c, h, q).map(Cow::into_owned);
        let (c, h, q) = (
            Some("access_token=from-cookie"),
            Some("Bearer from-header"),
            Some("token=from-query"),
        );
        assert_eq!(get(c, h, q).as_deref(), Some("from-cookie"));
        assert_eq!(get(None, h, q).as_deref(), Some("from-header"));
        assert_eq!(get(None, None, q).as_deref(), Some("from-query"));
        assert_eq!(get(None, None, None), None);
        assert_eq!(
            get(Some("other=1"), Some("Basic dXNlcg=="), Some("a=1")),
            None
        );
    }

    #[test]
    fn extract_token_ignores_placeholder_cookies() {
        let a = auth(&hs_cfg());
        for cookie in [
            "access_token=",
            "access_token=undefined",
            "access_token=null",
            "access_token=\"\"",
            "access_token",
        ] {
            let got = a.extract_token(Some(cookie), Some("Bearer from-header"), None);
            assert_eq!(got.as_deref(), Some("from-header"), "{cookie}");
        }
        let got = a.extract_token(
            Some("access_token=null"),
            Some("Bearer null"),
            Some("token=q"),
        );
        assert_eq!(got.as_deref(), Some("q"));
        assert_eq!(
            a.extract_token(Some("access_token=undefined"), None, None),
            None
        );
    }

    #[test]
    fn cookie_parsing() {
        let a = auth(&hs_cfg());
        let get = |header| {
            a.extract_token(Some(header), None, None)
                .map(Cow::into_owned)
        };
        assert_eq!(get("a=1; access_token=tok; b=2").as_deref(), Some("tok"));
        assert_eq!(get("  access_token = tok  ;b=2").as_deref(), Some("tok"));
        assert_eq!(
            get("access_token=\"quoted.tok\"").as_deref(),
            Some("quoted.tok")
        );
        assert_eq!(get("xaccess_token=no; access_tokens=no").as_deref(), None);
        assert_eq!(
            get("access_token=; access_token=second").as_deref(),
            Some("second")
        );
        assert_eq!(get("access_token=a.b=c").as_deref(), Some("a.b=c"));

        let custom = auth(&AuthConfig {
            cookie_name: "jwt".to_owned(),
            ..hs_cfg()
        });
        let got = custom.extract_token(Some("access_token=no; jwt=yes"), None, None);
        assert_eq!(got.as_deref(), Some("yes"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let a = auth(&hs_cfg());
        for header in [
            "Bearer t",
            "bearer t",
            "BEARER t",
            "  bEaReR   t  ",
            "Bearer\tt",
        ] {
            assert_eq!(
                a.extract_token(None, Some(header), None).as_deref(),
                Some("t"),
                "{header}"
            );
        }
        for header in ["Bearer", "Bearer ", "Bearertok", "Token t", "t"] {
            assert_eq!(a.extract_token(None, Some(header), None), None, "{header}");
        }
    }

    #[test]
    fn query_token_is_percent_decoded() {
        let a = auth(&hs_cfg());
        let got = a.extract_token(
            None,
            None,
            Some("client_version=2&token=a.b.c&format=msgpack"),
        );
        assert!(matches!(got, Some(Cow::Borrowed("a.b.c"))), "{got:?}");
        let got = a.extract_token(None, None, Some("?token=a%2Eb%2ec"));
        assert!(matches!(got.as_deref(), Some("a.b.c")), "{got:?}");
        assert_eq!(
            a.extract_token(None, None, Some("token=&token=second"))
                .as_deref(),
            Some("second")
        );
        assert_eq!(
            a.extract_token(None, None, Some("xtoken=no&token_=no")),
            None
        );
        assert_eq!(a.extract_token(None, None, Some("token=%FF")), None);
    }

    #[test]
    fn extracted_token_verifies() {
        let a = auth(&hs_cfg());
        let token = hs(&claims(json!({})), SECRET);
        // What the Python client sends: cookie and header both.
        let cookie = format!("access_token={token}");
        let header = format!("Bearer {token}");
        let got = a.extract_token(Some(&cookie), Some(&header), None).unwrap();
        assert_eq!(&*a.verify(&got).unwrap().user_id, "alice");
    }

    // --- identity, errors, ACLs, globs -------------------------------------------------------

    #[test]
    fn anonymous_identity() {
        let default_publish = Acl::new(strings(&["public.*"]), vec![]);
        let id = Identity::anonymous("conn-7", &default_publish);
        assert_eq!(&*id.user_id, "conn-7");
        assert_eq!(id.subscribe, Acl::allow_all());
        assert_eq!(id.publish, default_publish);
        assert!(id.auto_subscribe.is_empty());
    }

    #[test]
    fn error_codes() {
        assert_eq!(AuthError::Missing.code().as_str(), "AUTH_REQUIRED");
        for e in AuthError::ALL
            .into_iter()
            .filter(|e| *e != AuthError::Missing)
        {
            assert_eq!(e.code().as_str(), "AUTH_FAILED", "{e:?}");
        }
    }

    #[test]
    fn acl_basics_and_deny_wins() {
        assert!(Acl::allow_all().permits("anything"));
        assert!(Acl::allow_all().permits(""));
        assert!(!Acl::deny_all().permits("anything"));
        assert_eq!(Acl::default(), Acl::allow_all());

        let acl = Acl::new(strings(&["chat/*", "news"]), strings(&["chat/secret*"]));
        assert!(acl.permits("chat/lobby"));
        assert!(acl.permits("news"));
        assert!(
            !acl.permits("chat/secret-room"),
            "deny wins over a matching allow"
        );
        assert!(!acl.permits("newsy"));

        let both = Acl::new(strings(&["*"]), strings(&["*"]));
        assert!(!both.permits("x"));
    }

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn identity_stays_lean() {
        // Two boxed slices per Acl; a regression to Vec shows up here.
        assert_eq!(size_of::<Acl>(), 32);
        assert_eq!(size_of::<Identity>(), 16 + 2 * 32 + 24 + 8);
    }

    #[test]
    fn glob_cases() {
        let cases = [
            ("", "", true),
            ("", "a", false),
            ("*", "", true),
            ("*", "anything/at.all", true),
            ("**", "x", true),
            ("?", "", false),
            ("?", "a", true),
            ("?", "ab", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("chat", "chat", true),
            ("chat", "chat2", false),
            ("chat", "cha", false),
            ("Chat", "chat", false),
            ("chat/*", "chat/", true),
            ("chat/*", "chat/a/b", true),
            ("chat/*", "chat", false),
            ("*.events", "user.1.events", true),
            ("*.events", "user.1.events.x", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("*a", "aaaa", true),
            ("*ab", "aaab", true),
            ("a*", "ba", false),
            ("[a]", "a", false),
            ("[a]", "[a]", true),
            // `?` is one char, not one byte.
            ("?", "é", true),
            ("??", "é", false),
            ("caf?", "café", true),
            ("?", "😀", true),
            ("a?b", "a😀b", true),
            ("*é", "cafée", false),
            ("*é", "caféé", true),
            ("é*", "ë", false),
            ("ü?", "üé", true),
            ("*?", "é", true),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(glob_match(pattern, text), want, "{pattern:?} vs {text:?}");
        }
    }

    #[test]
    fn pathological_glob_completes_quickly() {
        let start = Instant::now();
        let text = "a".repeat(10_000);
        assert!(!glob_match("a*a*a*a*a*a*a*a*a*a*a*a*b", &text));
        assert!(glob_match("a*a*a*a*a*a*a*a*a*a*a*a*", &text));
        let text = "ab".repeat(5_000);
        assert!(!glob_match("*a*b*a*b*a*b*a*b*c", &text));
        // Milliseconds in practice; exponential backtracking would never finish.
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn joining_a_group_takes_a_valid_name_and_the_right_to_it() {
        let anonymous = Identity::anonymous("c1", &Acl::deny_all());
        let default = ["workers".to_owned()];
        assert_eq!(anonymous.queue_group_refusal("workers", &default), None);
        assert_eq!(
            anonymous.queue_group_refusal("junk-17", &default),
            Some(ErrorCode::QueueGroupForbidden)
        );
        assert_eq!(
            anonymous.queue_group_refusal("workers", &[]),
            Some(ErrorCode::QueueGroupForbidden),
            "no claim and no default: no group"
        );
        // A malformed name is that, whatever the rights.
        assert_eq!(
            anonymous.queue_group_refusal("", &["*".to_owned()]),
            Some(ErrorCode::InvalidQueueGroup)
        );
        let mut worker = anonymous.clone();
        worker.queue_groups = Some(Box::new(Acl::new(vec!["work*".into()], vec![])));
        assert_eq!(worker.queue_group_refusal("workers", &[]), None);
        assert_eq!(
            worker.queue_group_refusal("junk", &["*".to_owned()]),
            Some(ErrorCode::QueueGroupForbidden)
        );
    }
}
