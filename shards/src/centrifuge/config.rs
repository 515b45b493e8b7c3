//! `[centrifuge]`: the Centrifuge client protocol's endpoint, timing, channel limits and
//! namespaces (the Centrifugo options users know), part of [`crate::Config`].
//!
//! The section's shape, defaults and validation live in [`crate::config`], beside the other
//! sections, so that this module depends on the configuration and not the other way round
//! (`layering.rs`); they are named here too, where the protocol's readers look for them.

pub use crate::config::{CentrifugeConfig, NAMESPACE_NAME_MAX, NamespaceConfig};
