//! The server-wide cap on live connections (`server.max_connections`), shared by every shard.
//!
//! Owns: the count of places taken and the cap. Never: closes a connection (a connection over
//! the cap is refused by its own state machine, with close 1013); touched on upgrade and release
//! only, never per message.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The global cap on live connections (`server.max_connections`). Touched on upgrade and release
/// only, never per message.
#[derive(Debug)]
pub struct Admission {
    live: AtomicUsize,
    /// Changed by a reload; lowering it closes no connection, it only refuses new ones.
    max: AtomicUsize,
}

impl Admission {
    /// A budget of `max` live connections, none taken.
    pub fn new(max: usize) -> Self {
        Self {
            live: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }
    /// Changes the cap (reload); connections over a lowered cap stay.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }
    /// Takes a place if one is free.
    pub fn try_admit(&self) -> bool {
        if self.live.fetch_add(1, Ordering::AcqRel) >= self.max.load(Ordering::Relaxed) {
            self.live.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }
    /// Gives a place back; exactly once per successful [`Admission::try_admit`].
    pub fn release(&self) {
        let before = self.live.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "admission released more often than taken");
    }
    /// Places taken now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}
