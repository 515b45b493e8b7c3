//! What one loop turn collects for its end: the connections to write at the next `flush`, those
//! whose socket filled up, those to evict once the fan-out that found them is done; and the
//! scratch buffers the turn's steps reuse.
//!
//! Owns: those lists. Never: writes a socket or closes a connection (the shard does, from them).
//!
//! Invariant: a connection is in the write list at most once; its slot's `dirty` flag says it
//! is (see [`Turn::mark_dirty`]).

use std::sync::Arc;

use bytes::Bytes;

use crate::conn::{ConnEvent, ConnKey};
use crate::fabric::FabricMsg;
use crate::queue_groups::GroupName;
use crate::timer::Tick;

/// Connections the turn's end has to do something about.
#[derive(Default)]
pub(super) struct Turn {
    /// Connections with output queued this turn (each listed once).
    dirty: Vec<ConnKey>,
    /// Connections whose socket filled up outside `flush`, reported by the next `flush`.
    blocked: Vec<ConnKey>,
    /// Connections over their outbound cap, evicted once the step that found them is done
    /// (evicting changes the topic table a fan-out iterates).
    evict: Vec<ConnKey>,
}

impl Turn {
    /// Lists connection `key` for the next flush unless its flag `listed` says it is.
    pub fn mark_dirty(&mut self, listed: &mut bool, key: ConnKey) {
        if !*listed {
            *listed = true;
            self.dirty.push(key);
        }
    }

    /// Unlists a released connection, so a successor in its slot is not listed twice.
    pub fn unlist(&mut self, key: ConnKey) {
        self.dirty.retain(|&k| k != key);
    }

    /// The connections to write, taken.
    pub fn take_dirty(&mut self) -> Vec<ConnKey> {
        std::mem::take(&mut self.dirty)
    }

    /// Connection `key`'s socket is full.
    pub fn block(&mut self, key: ConnKey) {
        self.blocked.push(key);
    }

    /// Moves the connections whose socket filled up into `into`.
    pub fn take_blocked(&mut self, into: &mut Vec<ConnKey>) {
        into.append(&mut self.blocked);
    }

    /// Connection `key` is over its outbound cap.
    pub fn evict(&mut self, key: ConnKey) {
        self.evict.push(key);
    }

    /// The next connection to evict.
    pub fn next_eviction(&mut self) -> Option<ConnKey> {
        self.evict.pop()
    }
}

/// Buffers kept between uses for their allocations: each is taken by one step, emptied, and
/// put back.
#[derive(Default)]
pub(super) struct Scratch {
    /// What a connection asked of the shard during one call.
    pub events: Vec<ConnEvent>,
    /// The fabric entries of one receive.
    pub inbox: Vec<(usize, FabricMsg)>,
    /// The timer entries due in one run.
    pub expired: Vec<(u32, Tick)>,
    /// The queue-group picks of one publication.
    pub group_picks: Vec<(usize, Arc<GroupName>)>,
    /// The attack summary's lines.
    pub alarm_lines: Vec<String>,
    /// The ping frame of one timer run, built at most once.
    pub ping: Option<Bytes>,
}
