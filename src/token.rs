//! `wse-server token`: mints a development JWT the running configuration accepts, signed with
//! `auth.secret` (HS256) or a private key given on the command line (RS256/ES256), with the
//! configured `iss`, `aud` and `kid`. The model is Centrifugo's `gentoken`.
//!
//! Owns: the subcommand's flags and the claims it writes. Never: starts a server, or prints a
//! secret (only the token, on stdout, and one line about it on stderr).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use jsonwebtoken::crypto::{CryptoProvider, rust_crypto};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use wse_shards::config::JwtAlgorithm;

use crate::cli::{self, CliError};

/// A token's lifetime when `--ttl` is not given.
const DEFAULT_TTL: &str = "1h";

/// The subcommand's first argument: `wse-server token …`.
pub const SUBCOMMAND: &str = "token";

/// `wse-server token`: the flags.
#[derive(Debug, Parser)]
#[command(
    name = "wse-server token",
    about = "Print a JWT for a development client, signed the way the configuration checks it",
    after_help = "The configuration is read as the server reads it (--config, WSE_* variables), \
                  so a token minted with the server's --config or WSE_AUTH_SECRET is one it \
                  accepts.\nExample: wse-server token --config wse.toml --user alice --ttl 1h \
                  --topics 'chat.*' --publish 'chat.*'",
    max_term_width = 100
)]
struct TokenCli {
    /// The user id (`sub` claim).
    #[arg(long, value_name = "ID")]
    user: String,

    /// How long the token is valid, e.g. 30m, 1h, 7d.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_TTL, value_parser = humantime::parse_duration)]
    ttl: Duration,

    /// Topics (globs) it may subscribe to, comma-separated (`wse_topics`); not given: every topic.
    #[arg(long, value_name = "GLOBS", value_delimiter = ',')]
    topics: Option<Vec<String>>,

    /// Topics (globs) it may publish to, comma-separated (`wse_publish`); not given:
    /// `auth.default_publish`.
    #[arg(long, value_name = "GLOBS", value_delimiter = ',')]
    publish: Option<Vec<String>>,

    /// Topics to subscribe it to when it connects, comma-separated (`wse_subscribe`).
    #[arg(long, value_name = "TOPICS", value_delimiter = ',')]
    subscribe: Option<Vec<String>>,

    /// Queue groups (globs) it may join, comma-separated (`wse_queue_groups`).
    #[arg(long, value_name = "GLOBS", value_delimiter = ',')]
    queue_groups: Option<Vec<String>>,

    /// The configuration file, as the server's --config.
    #[arg(long, env = "WSE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// The HS256 secret, as the server's --auth-secret (overrides the file).
    #[arg(
        long,
        env = "WSE_AUTH_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    auth_secret: Option<String>,

    /// PEM private key for auth.algorithm RS256 or ES256 (the server holds only the public key).
    #[arg(long, value_name = "FILE")]
    private_key: Option<PathBuf>,
}

/// Runs `wse-server token` with `args` (after the subcommand's name): prints the token.
///
/// # Errors
/// Bad flags, an unusable configuration, no key to sign with.
pub fn run(args: impl IntoIterator<Item = OsString>) -> Result<(), CliError> {
    let argv = std::iter::once(OsString::from("wse-server token")).chain(args);
    let t = match TokenCli::try_parse_from(argv) {
        Ok(t) => t,
        Err(e) if !e.use_stderr() => {
            // --help: clap prints it and exits 0.
            e.exit()
        }
        Err(e) => return Err(CliError(e.to_string().trim().replace('\n', " "))),
    };
    let token = mint(&t, SystemTime::now())?;
    println!("{token}");
    eprintln!(
        "wse-server token: for user {:?}, valid for {}",
        t.user,
        humantime::format_duration(t.ttl)
    );
    Ok(())
}

/// The signed token for `t`, issued at `now`.
fn mint(t: &TokenCli, now: SystemTime) -> Result<String, CliError> {
    // As the server's `--config` and `--auth-secret`: the same parser, so the same precedence
    // and validation (WSE_* variables are read there too).
    let mut server_args: Vec<OsString> = vec!["wse-server".into()];
    if let Some(c) = &t.config {
        server_args.extend(["--config".into(), c.clone().into_os_string()]);
    }
    if let Some(s) = &t.auth_secret {
        server_args.extend(["--auth-secret".into(), s.into()]);
    }
    let auth = cli::parse_from(server_args)?.config.auth;

    let iat = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CliError("the clock is before 1970".to_owned()))?
        .as_secs();
    let mut claims = json!({ "sub": t.user, "iat": iat, "exp": iat + t.ttl.as_secs() });
    let c = claims.as_object_mut().expect("an object");
    let acl = |globs: &Vec<String>| json!({ "allow": globs });
    if let Some(g) = &t.topics {
        c.insert("wse_topics".into(), acl(g));
    }
    if let Some(g) = &t.publish {
        c.insert("wse_publish".into(), acl(g));
    }
    if let Some(g) = &t.queue_groups {
        c.insert("wse_queue_groups".into(), acl(g));
    }
    if let Some(s) = &t.subscribe {
        c.insert("wse_subscribe".into(), json!(s));
    }
    if let Some(iss) = &auth.issuer {
        c.insert("iss".into(), Value::from(iss.as_str()));
    }
    if let Some(aud) = auth.audience.first() {
        c.insert("aud".into(), Value::from(aud.as_str()));
    }

    let _ = CryptoProvider::install_default(&rust_crypto::DEFAULT_PROVIDER);
    let (algorithm, key) = match auth.algorithm {
        JwtAlgorithm::HS256 => {
            let secret = auth.secret.as_deref().ok_or_else(|| {
                CliError(
                    "no auth.secret to sign with: give --auth-secret, WSE_AUTH_SECRET or a \
                     --config that sets it"
                        .to_owned(),
                )
            })?;
            (
                Algorithm::HS256,
                EncodingKey::from_secret(secret.as_bytes()),
            )
        }
        alg @ (JwtAlgorithm::RS256 | JwtAlgorithm::ES256) => {
            let path = t.private_key.as_ref().ok_or_else(|| {
                CliError(format!(
                    "auth.algorithm is {alg:?}: give --private-key, the PEM key whose public \
                     half is auth.public_key_file"
                ))
            })?;
            let pem = std::fs::read(path)
                .map_err(|e| CliError(format!("--private-key {}: {e}", path.display())))?;
            let key = match alg {
                JwtAlgorithm::RS256 => {
                    EncodingKey::from_rsa_pem(&pem).map(|k| (Algorithm::RS256, k))
                }
                _ => EncodingKey::from_ec_pem(&pem).map(|k| (Algorithm::ES256, k)),
            };
            key.map_err(|e| CliError(format!("--private-key {}: {e}", path.display())))?
        }
    };
    let mut header = Header::new(algorithm);
    header.kid = auth.kid.clone();
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| CliError(format!("cannot sign the token: {e}")))
}
