//! The constructor's keyword arguments, upstream's names and units, mapped onto
//! [`wse_shards::Config`].
//!
//! Owns: the mapping and its warnings. Where upstream accepts a value ours refuses (a message
//! size under 1 KiB, a recovery buffer that is not a power of two, ...) the nearest value ours
//! takes is used and a `RuntimeWarning` says so; what ours cannot do at all raises.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use wse_shards::Config;
use wse_shards::config::JwtAlgorithm;

/// Upstream's keyword arguments, in its order, with its defaults (see `RustWSEServer.__init__`).
pub struct Options {
    pub host: String,
    pub port: u16,
    pub max_connections: usize,
    pub jwt_secret: Option<Vec<u8>>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwt_cookie_name: Option<String>,
    pub jwt_previous_secret: Option<Vec<u8>>,
    pub jwt_key_id: Option<String>,
    pub jwt_algorithm: Option<String>,
    pub jwt_private_key: Option<Vec<u8>>,
    pub max_inbound_queue_size: usize,
    pub recovery_enabled: bool,
    pub recovery_buffer_size: usize,
    pub recovery_ttl: u64,
    pub recovery_max_messages: usize,
    pub recovery_memory_budget: usize,
    pub presence_enabled: bool,
    pub presence_max_data_size: usize,
    pub presence_max_members: usize,
    pub rate_limit_capacity: f64,
    pub rate_limit_refill: f64,
    pub max_message_size: usize,
    pub ping_interval: u64,
    pub idle_timeout: u64,
    pub max_outbound_queue_bytes: usize,
}

/// Our smallest and largest accepted values (see `Config::validate`).
const MESSAGE_SIZE_MIN: usize = 1024;
const MESSAGE_SIZE_MAX: usize = 64 << 20;
const OUTBOUND_QUEUE_MIN: usize = 64 * 1024;
const RECOVERY_BUDGET_MIN: usize = 1 << 20;
const PRESENCE_DATA_MAX: usize = 64 * 1024;
/// HS256 keys shorter than this are refused, as upstream refuses them (RFC 7518 §3.2).
const HS256_KEY_MIN: usize = 32;

impl Options {
    /// The engine configuration these options describe, and the warnings for values adjusted.
    ///
    /// # Errors
    /// `ValueError` for a value neither server accepts (an HS256 secret under 32 bytes, a PEM
    /// key that is not one, a host that does not resolve).
    pub fn to_config(&self) -> PyResult<(Config, Vec<String>)> {
        let mut warnings = Vec::new();
        let mut cfg = Config::default();
        cfg.server.listen = resolve(&self.host, self.port)?;
        cfg.server.max_connections = self.max_connections.max(1);
        self.auth(&mut cfg, &mut warnings)?;
        cfg.limits.app_event_queue_capacity = self.max_inbound_queue_size.max(1);
        cfg.recovery.enabled = self.recovery_enabled;
        cfg.recovery.buffer_size = self.recovery_buffer_size;
        if !self.recovery_buffer_size.is_power_of_two() || self.recovery_buffer_size < 2 {
            let size = self
                .recovery_buffer_size
                .max(2)
                .next_power_of_two()
                .min(1 << 20);
            warnings.push(format!(
                "recovery_buffer_size={} is not a power of two >= 2; using {size}",
                self.recovery_buffer_size
            ));
            cfg.recovery.buffer_size = size;
        }
        cfg.recovery.ttl = Duration::from_secs(self.recovery_ttl);
        cfg.recovery.max_messages = self.recovery_max_messages.max(1);
        cfg.recovery.memory_budget = at_least(
            self.recovery_memory_budget,
            RECOVERY_BUDGET_MIN,
            "recovery_memory_budget",
            &mut warnings,
        );
        cfg.presence.enabled = self.presence_enabled;
        cfg.presence.max_data_size = self.presence_max_data_size;
        if self.presence_max_data_size > PRESENCE_DATA_MAX {
            warnings.push(format!(
                "presence_max_data_size={} is over our ceiling; using {PRESENCE_DATA_MAX}",
                self.presence_max_data_size
            ));
            cfg.presence.max_data_size = PRESENCE_DATA_MAX;
        }
        cfg.presence.max_members = self.presence_max_members;
        cfg.protocol.rate_limit_capacity = tokens(
            self.rate_limit_capacity,
            "rate_limit_capacity",
            &mut warnings,
        );
        cfg.protocol.rate_limit_refill =
            tokens(self.rate_limit_refill, "rate_limit_refill", &mut warnings);
        let size = at_least(
            self.max_message_size,
            MESSAGE_SIZE_MIN,
            "max_message_size",
            &mut warnings,
        );
        if size > MESSAGE_SIZE_MAX {
            warnings.push(format!(
                "max_message_size={size} is over our ceiling; using {MESSAGE_SIZE_MAX}"
            ));
        }
        cfg.limits.max_message_size = size.min(MESSAGE_SIZE_MAX);
        cfg.limits.max_outbound_queue_bytes = at_least(
            self.max_outbound_queue_bytes,
            OUTBOUND_QUEUE_MIN,
            "max_outbound_queue_bytes",
            &mut warnings,
        );
        let ping = Duration::from_secs(self.ping_interval.max(1));
        let mut idle = Duration::from_secs(self.idle_timeout);
        if idle <= ping {
            idle = ping * 2;
            warnings.push(format!(
                "idle_timeout={} must be longer than ping_interval={}; using {}",
                self.idle_timeout,
                self.ping_interval,
                idle.as_secs()
            ));
        }
        // Upstream hands client subscriptions and publications to the application (which calls
        // subscribe_connection / broadcast itself); code written for it expects them.
        cfg.protocol.app_handles_requests = true;
        // Upstream's send_event sends binary frames, JSON included.
        cfg.protocol.binary_event_frames = true;
        // Upstream asks no permission to put a connection in a queue group: the application
        // decides. Ours asks the connection's (`wse_queue_groups` claim, else this default), so
        // every group is allowed unless a token's own claim says otherwise.
        cfg.auth.default_queue_groups = vec!["*".to_owned()];
        cfg.protocol.ping_interval = ping;
        cfg.protocol.idle_timeout = idle;
        cfg.validate()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        // Parses the keys now (a bad PEM fails here, not at start()).
        if cfg.auth.enabled {
            wse_shards::auth::Authenticator::new(&cfg.auth)
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
        }
        Ok((cfg, warnings))
    }

    fn auth(&self, cfg: &mut Config, warnings: &mut Vec<String>) -> PyResult<()> {
        let Some(secret) = &self.jwt_secret else {
            for (name, set) in [
                ("jwt_issuer", self.jwt_issuer.is_some()),
                ("jwt_audience", self.jwt_audience.is_some()),
                ("jwt_previous_secret", self.jwt_previous_secret.is_some()),
            ] {
                if set {
                    warnings.push(format!("{name} has no effect without jwt_secret"));
                }
            }
            return Ok(());
        };
        cfg.auth.enabled = true;
        match self.jwt_algorithm.as_deref().unwrap_or("HS256") {
            "HS256" => {
                cfg.auth.algorithm = JwtAlgorithm::HS256;
                cfg.auth.secret_bytes = Some(hs256_key("jwt_secret", secret)?);
                cfg.auth.previous_secret_bytes = self
                    .jwt_previous_secret
                    .as_deref()
                    .map(|s| hs256_key("jwt_previous_secret", s))
                    .transpose()?;
            }
            alg @ ("RS256" | "ES256") => {
                // As upstream: `jwt_secret` (and `jwt_previous_secret`) hold the PEM public key.
                cfg.auth.algorithm = if alg == "RS256" {
                    JwtAlgorithm::RS256
                } else {
                    JwtAlgorithm::ES256
                };
                cfg.auth.public_key_pem = Some(pem_text("jwt_secret", secret)?);
                cfg.auth.previous_public_key_pem = self
                    .jwt_previous_secret
                    .as_deref()
                    .map(|s| pem_text("jwt_previous_secret", s))
                    .transpose()?;
            }
            other => {
                return Err(PyValueError::new_err(format!(
                    "jwt_algorithm must be HS256, RS256 or ES256, not {other:?}"
                )));
            }
        }
        cfg.auth.issuer = self.jwt_issuer.clone();
        cfg.auth.audience = self.jwt_audience.iter().cloned().collect();
        cfg.auth.kid = self.jwt_key_id.clone();
        if let Some(name) = &self.jwt_cookie_name {
            cfg.auth.cookie_name = name.clone();
        }
        if self.jwt_private_key.is_some() {
            warnings.push("jwt_private_key is ignored: this server only verifies tokens".into());
        }
        Ok(())
    }
}

fn hs256_key(name: &str, key: &[u8]) -> PyResult<Vec<u8>> {
    if key.len() < HS256_KEY_MIN {
        return Err(PyValueError::new_err(format!(
            "{name} must be at least 32 bytes (RFC 7518 HS256 minimum)"
        )));
    }
    // Any bytes, as upstream (a binary key too).
    Ok(key.to_vec())
}

fn pem_text(name: &str, key: &[u8]) -> PyResult<String> {
    String::from_utf8(key.to_vec())
        .map_err(|_| PyValueError::new_err(format!("{name} must be a PEM public key (text)")))
}

fn resolve(host: &str, port: u16) -> PyResult<SocketAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| PyValueError::new_err(format!("cannot resolve host {host:?}")))
}

fn at_least(value: usize, min: usize, name: &str, warnings: &mut Vec<String>) -> usize {
    if value < min {
        warnings.push(format!("{name}={value} is under our minimum; using {min}"));
        return min;
    }
    value
}

/// Upstream's token counts are floats; ours whole tokens, at least one.
fn tokens(value: f64, name: &str, warnings: &mut Vec<String>) -> u32 {
    let rounded = value.round().clamp(1.0, f64::from(u32::MAX)) as u32;
    if f64::from(rounded) != value {
        warnings.push(format!(
            "{name}={value} is not a whole number of tokens >= 1; using {rounded}"
        ));
    }
    rounded
}
