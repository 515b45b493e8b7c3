//! The control plane: health, metrics and the server API on their own listener and thread.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use wse_shards::Server;
use wse_shards::config::ControlConfig;

/// The running control plane.
pub struct ControlPlane {}

/// Binds `cfg.listen` (synchronously, so an address in use fails here) and serves on a thread
/// of its own ("wse-control") running a single-threaded tokio runtime.
///
/// # Errors
/// The listener cannot bind, or the thread cannot start.
pub fn start(server: Arc<Server>, cfg: &ControlConfig) -> io::Result<ControlPlane> {
    let _ = (server, cfg);
    todo!()
}

impl ControlPlane {
    /// The bound address (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        todo!()
    }

    /// Stops serving and joins the thread.
    pub fn stop(self) {
        todo!()
    }
}
