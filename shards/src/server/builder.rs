//! [`Server::builder`]: a configuration assembled in code, for embedders.
//!
//! Owns: nothing but the [`Config`] it builds; `start` is [`Server::start`].

use std::net::SocketAddr;

use super::{Server, StartError};
use crate::config::Config;

/// Builds a [`Config`] and starts a [`Server`] with it.
///
/// ```no_run
/// use std::time::Duration;
/// use wse_shards::Server;
///
/// let server = Server::builder()
///     .listen("127.0.0.1:5007".parse().unwrap())
///     .cores(2)
///     .configure(|cfg| cfg.presence.enabled = true)
///     .start()
///     .expect("started");
/// println!("serving on {}", server.local_addr());
/// server.stop(Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Default)]
#[must_use = "a builder does nothing until `start`"]
pub struct Builder {
    cfg: Config,
}

impl Server {
    /// A builder starting from [`Config::default`] (the development configuration:
    /// authentication off).
    pub fn builder() -> Builder {
        Builder::default()
    }
}

impl Builder {
    /// Replaces the whole configuration.
    pub fn config(mut self, cfg: Config) -> Self {
        self.cfg = cfg;
        self
    }

    /// `server.listen`: the WebSocket address (port 0 picks a free one; see
    /// [`Server::local_addr`]).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.cfg.server.listen = addr;
        self
    }

    /// `server.cores`: the number of shards (0 = every online core).
    pub fn cores(mut self, cores: usize) -> Self {
        self.cfg.server.cores = cores;
        self
    }

    /// Changes anything else in the configuration.
    pub fn configure(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.cfg);
        self
    }

    /// Validates the configuration and starts the server ([`Server::start`]).
    ///
    /// # Errors
    /// As [`Server::start`].
    pub fn start(self) -> Result<Server, StartError> {
        Server::start(self.cfg)
    }
}
