//! The configuration a shard runs with: the one at start, then each reload's, and what the shard
//! derives from it once per change rather than per connection event.
//!
//! Owns: the current configuration, verifier, rate limits and default publish ACL. Never:
//! changes what a connection already derived from an earlier configuration (its identity, an
//! armed deadline).

use std::sync::Arc;

use crate::auth::{Acl, Authenticator};
use crate::centrifuge;
use crate::config::{Config, ProtocolConfig};
use crate::fabric::Reload;
use crate::ratelimit::RateLimits;

/// The running configuration and what is derived from it.
pub(super) struct Running {
    cfg: Arc<Config>,
    /// `None` when authentication is off.
    auth: Option<Arc<Authenticator>>,
    rate: RateLimits,
    /// The publish ACL of connections whose token says nothing (`auth.default_publish`).
    default_publish: Acl,
    centrifuge: Arc<centrifuge::Settings>,
}

impl Running {
    /// Runs with `cfg` and `auth`.
    pub fn new(cfg: Arc<Config>, auth: Option<Arc<Authenticator>>) -> Self {
        let rate = rate_limits(&cfg.protocol);
        let default_publish = Acl::new(cfg.auth.default_publish.clone(), Vec::new());
        let centrifuge = Arc::new(centrifuge::Settings::new(
            &cfg.centrifuge,
            cfg.limits.max_outbound_queue_bytes,
        ));
        Self {
            cfg,
            auth,
            rate,
            default_publish,
            centrifuge,
        }
    }

    /// Runs with the reloaded configuration from now on.
    pub fn apply(&mut self, reload: &Reload) {
        *self = Self::new(reload.cfg.clone(), reload.auth.clone());
    }

    /// The configuration.
    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    /// The JWT verifier (`None`: authentication off).
    pub fn auth(&self) -> Option<&Authenticator> {
        self.auth.as_deref()
    }

    /// The inbound rate limits.
    pub fn rate(&self) -> &RateLimits {
        &self.rate
    }

    /// The default publish ACL.
    pub fn default_publish(&self) -> &Acl {
        &self.default_publish
    }

    /// What Centrifuge sessions share, from the `[centrifuge]` section in force.
    pub fn centrifuge(&self) -> &Arc<centrifuge::Settings> {
        &self.centrifuge
    }
}

fn rate_limits(p: &ProtocolConfig) -> RateLimits {
    RateLimits {
        capacity: p.rate_limit_capacity,
        refill_per_sec: p.rate_limit_refill,
        abuse_drops: p.rate_limit_abuse_drops,
        abuse_window_ms: p.rate_limit_abuse_window.as_millis() as u64,
    }
}
