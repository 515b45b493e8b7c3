//! A Rust client for the WSE protocol.
