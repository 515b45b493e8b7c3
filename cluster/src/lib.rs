//! The cluster mesh's protocol core, sans I/O (docs/CLUSTER.md): plain state machines fed with
//! bytes, socket events and a virtual clock, returning bytes to send and actions to take. The
//! thread that owns the sockets (the cluster core, the binary's `src/cluster.rs`) only moves
//! bytes.
#![warn(missing_docs)]

pub mod handshake;
pub mod interest;
pub mod membership;
pub mod node;
pub mod seal;
pub mod wire;
