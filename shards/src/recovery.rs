//! The publication history of the topics a shard owns (protocol.md §5), sans-IO.
//!
//! Owns: one byte log and one pool of per-topic rings per shard, both allocated and touched at
//! start so the shard's memory does not grow with traffic. Never: decides which topics have
//! history (the shard opens rings on publication) or sends anything.
//!
//! Layout:
//! - The **log** is a circular byte buffer of `memory_budget / shards` bytes. Every stamped
//!   publication frame is copied in whole, never wrapping (a frame that does not fit at the end
//!   starts again at the beginning). Positions are absolute (`head` counts every byte ever
//!   written), so an entry at `pos` is intact while `head <= pos + capacity`: the budget is
//!   enforced on write — the oldest publications of every topic are overwritten — with no sweep.
//! - A **ring** per topic with history: `buffer_size` entries (offset, log position, length,
//!   time), indexed by `offset % buffer_size`. Rings are carved from one preallocated entry array;
//!   when all are taken, the least recently written ring is reclaimed (its topic's next
//!   publication starts a new epoch).
//!
//! A replay copies the stored frames — the very bytes sent live, stamps included — into one
//! buffer, so it is encoded once per topic range and identical to the live copies.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::config::RecoveryConfig;

/// Bytes of the log per touched page when preallocating.
const PAGE: usize = 4096;
/// A frame larger than this share of the log is not kept (it would evict too much history);
/// recovering across it answers `recovered: false`.
const FRAME_SHARE_MAX: usize = 4;

/// A ring in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingId(u32);

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    /// The publication's offset; 0 = empty.
    offset: u64,
    /// Absolute log position; `u64::MAX` = not kept (too large).
    pos: u64,
    len: u32,
    /// When it was written, seconds since the history's start.
    time_s: u32,
}

#[derive(Debug)]
struct Ring {
    /// The topic using it; `None` = free.
    topic: Option<Arc<str>>,
    epoch: u32,
    last_write_ms: u64,
}

/// What a recovery request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The replayed offsets are exactly `from+1..=last`, in order.
    pub recovered: bool,
    /// The frames, concatenated (empty unless `recovered`).
    pub frames: Bytes,
    /// Frames replayed (`last - from`).
    pub count: u32,
}

/// One shard's publication history: a ring per recovered topic, carved from one byte log
/// allocated (and touched) at start, so traffic never makes it grow.
pub struct History {
    log: Box<[u8]>,
    head: u64,
    entries: Box<[Entry]>,
    rings: Vec<Ring>,
    free: Vec<u32>,
    buffer_size: usize,
    ttl_s: u64,
    max_messages: u64,
    /// Milliseconds of the first call, the origin of `Entry::time_s`.
    origin_ms: Option<u64>,
}

impl History {
    /// Allocates and touches this shard's share of the budget.
    pub fn new(cfg: &RecoveryConfig, shards: usize) -> Self {
        let log_bytes = (cfg.memory_budget / shards.max(1)).max(PAGE);
        let rings = (cfg.max_topics / shards.max(1)).max(1);
        let mut log = vec![0u8; log_bytes].into_boxed_slice();
        // Touch every page now: RSS is what it will be, and the first publications pay no faults.
        for page in log.chunks_mut(PAGE) {
            page[0] = 1;
        }
        let mut entries = vec![Entry::default(); rings * cfg.buffer_size].into_boxed_slice();
        for e in entries.iter_mut().step_by(PAGE / size_of::<Entry>()) {
            // A non-zero mark dirties the page; empty entries (offset 0) ignore their time.
            e.time_s = u32::MAX;
        }
        Self {
            log,
            head: 0,
            entries,
            rings: (0..rings)
                .map(|_| Ring {
                    topic: None,
                    epoch: 0,
                    last_write_ms: 0,
                })
                .collect(),
            free: (0..rings as u32).rev().collect(),
            buffer_size: cfg.buffer_size,
            ttl_s: cfg.ttl.as_secs(),
            max_messages: cfg.max_messages as u64,
            origin_ms: None,
        }
    }

    /// Topics with a ring now.
    pub fn topic_count(&self) -> usize {
        self.rings.len() - self.free.len()
    }

    /// Bytes held for history (the log and the ring entries).
    pub fn footprint(&self) -> usize {
        self.log.len() + self.entries.len() * size_of::<Entry>()
    }

    /// Takes a ring for `topic` with a fresh random epoch. When none is free, the least recently
    /// written one is reclaimed and the topic that had it is returned: its history is gone.
    pub fn open(&mut self, topic: Arc<str>, now_ms: u64) -> (RingId, u32, Option<Arc<str>>) {
        let (id, evicted) = match self.free.pop() {
            Some(id) => (id, None),
            None => {
                let (i, _) = self
                    .rings
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, r)| r.last_write_ms)
                    .expect("at least one ring");
                (i as u32, self.rings[i].topic.take())
            }
        };
        let epoch = loop {
            // Epochs are compared for equality only; 0 is kept for "none".
            let e: u32 = rand::random();
            if e != 0 && e != self.rings[id as usize].epoch {
                break e;
            }
        };
        let ring = &mut self.rings[id as usize];
        ring.topic = Some(topic);
        ring.epoch = epoch;
        ring.last_write_ms = now_ms;
        self.slots_mut(RingId(id)).fill(Entry::default());
        (RingId(id), epoch, evicted)
    }

    /// Gives a ring back (its topic went away).
    pub fn release(&mut self, id: RingId) {
        let ring = &mut self.rings[id.0 as usize];
        debug_assert!(ring.topic.is_some(), "ring released twice");
        ring.topic = None;
        self.free.push(id.0);
    }

    /// Forgets every publication the ring holds, keeping its epoch: the topic's offsets go on
    /// from where they were (Centrifugo's `history_remove`), and a replay across the forgotten
    /// ones is refused as across any lost publication.
    pub fn clear(&mut self, id: RingId) {
        self.slots_mut(id).fill(Entry::default());
    }

    /// The epoch of a ring.
    pub fn epoch(&self, id: RingId) -> u32 {
        self.rings[id.0 as usize].epoch
    }

    /// Records publication `offset` of the ring's topic: `frame` is the complete stamped frame.
    pub fn append(&mut self, id: RingId, offset: u64, frame: &[u8], now_ms: u64) {
        assert!(offset > 0, "offsets start at 1");
        // The owner numbers a topic's publications without gaps, from 1 in each new ring: the
        // entry before this one is its predecessor, or empty (a fresh or cleared ring).
        debug_assert!(
            offset == 1
                || [0, offset - 1].contains(
                    &self.slots(id)[((offset - 1) % self.buffer_size as u64) as usize].offset
                ),
            "offset {offset} appended without its predecessor"
        );
        let time_s = self.seconds(now_ms);
        let cap = self.log.len();
        let pos = if frame.len() > cap / FRAME_SHARE_MAX {
            u64::MAX
        } else {
            let mut at = self.head as usize % cap;
            if at + frame.len() > cap {
                // Never wrap a frame: skip the tail, start at the beginning.
                self.head += (cap - at) as u64;
                at = 0;
            }
            self.log[at..at + frame.len()].copy_from_slice(frame);
            let pos = self.head;
            self.head += frame.len() as u64;
            pos
        };
        self.rings[id.0 as usize].last_write_ms = now_ms;
        let bs = self.buffer_size;
        self.slots_mut(id)[(offset % bs as u64) as usize] = Entry {
            offset,
            pos,
            len: frame.len() as u32,
            time_s,
        };
    }

    /// The frames of offsets `after+1..=last`, if all are still held, `epoch` is the ring's, and
    /// the gap is at most `recovery.max_messages`.
    pub fn replay(
        &self,
        id: RingId,
        epoch: Option<u32>,
        after: u64,
        last: u64,
        now_ms: u64,
    ) -> Replay {
        let refused = Replay {
            recovered: false,
            frames: Bytes::new(),
            count: 0,
        };
        if epoch != Some(self.epoch(id)) || after > last || last - after > self.max_messages {
            return refused;
        }
        let now_s = self
            .origin_ms
            .map_or(0, |o| (now_ms.saturating_sub(o) / 1000) as u32);
        let oldest_s = now_s.saturating_sub(self.ttl_s as u32);
        let slots = self.slots(id);
        let cap = self.log.len() as u64;
        let mut total = 0usize;
        for offset in after + 1..=last {
            let e = &slots[(offset % self.buffer_size as u64) as usize];
            let intact = e.offset == offset && e.pos != u64::MAX && self.head <= e.pos + cap;
            if !intact || e.time_s < oldest_s {
                return refused;
            }
            total += e.len as usize;
        }
        let mut out = BytesMut::with_capacity(total);
        for offset in after + 1..=last {
            let e = &slots[(offset % self.buffer_size as u64) as usize];
            let at = (e.pos % cap) as usize;
            out.extend_from_slice(&self.log[at..at + e.len as usize]);
        }
        Replay {
            recovered: true,
            frames: out.freeze(),
            count: (last - after) as u32,
        }
    }

    /// Most publications one replay returns (`recovery.max_messages`).
    pub fn max_messages(&self) -> u64 {
        self.max_messages
    }

    /// The offset after which the ring still holds every publication up to `last` (within
    /// its TTL): `last` when it holds none of them.
    pub fn intact_after(&self, id: RingId, last: u64, now_ms: u64) -> u64 {
        let now_s = self
            .origin_ms
            .map_or(0, |o| (now_ms.saturating_sub(o) / 1000) as u32);
        let oldest_s = now_s.saturating_sub(self.ttl_s as u32);
        let slots = self.slots(id);
        let cap = self.log.len() as u64;
        let mut after = last;
        while after > 0 && last - after < self.buffer_size as u64 {
            let e = &slots[(after % self.buffer_size as u64) as usize];
            let intact = e.offset == after && e.pos != u64::MAX && self.head <= e.pos + cap;
            if !intact || e.time_s < oldest_s {
                break;
            }
            after -= 1;
        }
        after
    }

    fn seconds(&mut self, now_ms: u64) -> u32 {
        let origin = *self.origin_ms.get_or_insert(now_ms);
        (now_ms.saturating_sub(origin) / 1000) as u32
    }

    fn slots(&self, id: RingId) -> &[Entry] {
        let bs = self.buffer_size;
        &self.entries[id.0 as usize * bs..(id.0 as usize + 1) * bs]
    }

    fn slots_mut(&mut self, id: RingId) -> &mut [Entry] {
        let bs = self.buffer_size;
        &mut self.entries[id.0 as usize * bs..(id.0 as usize + 1) * bs]
    }
}

/// A read of a topic's history (`TopicOwner::history`), as the topic's owner answers it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HistoryRead {
    /// The history's epoch.
    pub epoch: u32,
    /// The topic's last offset.
    pub offset: u64,
    /// The ring still holds everything after the position asked for.
    pub complete: bool,
    /// The publications read, whole stamped frames in offset order.
    pub frames: Bytes,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg(budget: usize, topics: usize, buffer: usize) -> RecoveryConfig {
        RecoveryConfig {
            enabled: true,
            buffer_size: buffer,
            ttl: Duration::from_secs(60),
            max_messages: 100,
            max_replay_bytes: 1 << 20,
            memory_budget: budget,
            max_topics: topics,
        }
    }

    fn frame(n: u64, len: usize) -> Vec<u8> {
        let mut f = format!("[{n}]").into_bytes();
        f.resize(len, b'.');
        f
    }

    #[test]
    fn replays_exactly_the_missed_range_in_order() {
        let mut h = History::new(&cfg(1 << 16, 4, 16), 1);
        let (r, epoch, evicted) = h.open(Arc::from("t"), 0);
        assert!(evicted.is_none());
        for o in 1..=10 {
            h.append(r, o, &frame(o, 20), 0);
        }
        let rep = h.replay(r, Some(epoch), 6, 10, 0);
        assert!(rep.recovered);
        assert_eq!(rep.count, 4);
        let expected: Vec<u8> = (7..=10).flat_map(|o| frame(o, 20)).collect();
        assert_eq!(&rep.frames[..], &expected[..]);
        // Nothing missed: recovered, empty.
        assert_eq!(h.replay(r, Some(epoch), 10, 10, 0).count, 0);
        assert!(h.replay(r, Some(epoch), 10, 10, 0).recovered);
    }

    #[test]
    fn refuses_other_epochs_overrun_rings_and_large_gaps() {
        let mut h = History::new(&cfg(1 << 20, 4, 8), 1);
        let (r, epoch, _) = h.open(Arc::from("t"), 0);
        for o in 1..=20 {
            h.append(r, o, &frame(o, 10), 0);
        }
        assert!(
            !h.replay(r, Some(epoch ^ 1), 15, 20, 0).recovered,
            "wrong epoch"
        );
        assert!(!h.replay(r, None, 15, 20, 0).recovered, "no epoch");
        assert!(
            !h.replay(r, Some(epoch), 10, 20, 0).recovered,
            "ring holds only 8"
        );
        assert!(h.replay(r, Some(epoch), 12, 20, 0).recovered);
        assert_eq!(h.intact_after(r, 20, 0), 12, "the ring holds 13..=20");
        assert_eq!(h.intact_after(r, 0, 0), 0, "nothing published");
        assert!(
            !h.replay(r, Some(epoch), 21, 20, 0).recovered,
            "client ahead of the server"
        );
    }

    #[test]
    fn a_cleared_ring_keeps_its_epoch_and_refuses_what_it_forgot() {
        let mut h = History::new(&cfg(1 << 20, 4, 8), 1);
        let (r, epoch, _) = h.open(Arc::from("t"), 0);
        for o in 1..=5 {
            h.append(r, o, &frame(o, 10), 0);
        }
        h.clear(r);
        assert_eq!(h.epoch(r), epoch);
        assert_eq!(h.intact_after(r, 5, 0), 5, "holds nothing");
        assert!(!h.replay(r, Some(epoch), 3, 5, 0).recovered);
        assert!(h.replay(r, Some(epoch), 5, 5, 0).recovered, "at the top");
        // Offsets go on after the clear.
        h.append(r, 6, &frame(6, 10), 0);
        let replay = h.replay(r, Some(epoch), 5, 6, 0);
        assert!(replay.recovered);
        assert_eq!(replay.frames, Bytes::from(frame(6, 10)));
        assert!(!h.replay(r, Some(epoch), 4, 6, 0).recovered);
    }

    #[test]
    fn the_budget_overwrites_the_oldest_bytes() {
        // A log of 4096 bytes, frames of 1000: about four fit.
        let mut h = History::new(&cfg(4096, 2, 64), 1);
        let (a, ea, _) = h.open(Arc::from("a"), 0);
        let (b, eb, _) = h.open(Arc::from("b"), 0);
        h.append(a, 1, &frame(1, 1000), 0);
        for o in 1..=4 {
            h.append(b, o, &frame(o, 1000), 0);
        }
        // b4 did not fit at the end and went to the start, over a1.
        assert!(
            !h.replay(a, Some(ea), 0, 1, 0).recovered,
            "a's only entry was overwritten"
        );
        assert!(h.replay(b, Some(eb), 0, 4, 0).recovered, "b1 still intact");
        h.append(b, 5, &frame(5, 1000), 0);
        assert!(h.replay(b, Some(eb), 1, 5, 0).recovered);
        assert!(
            !h.replay(b, Some(eb), 0, 5, 0).recovered,
            "b1 overwritten by b5"
        );
    }

    #[test]
    fn ttl_expires_entries() {
        let mut h = History::new(&cfg(1 << 16, 1, 16), 1);
        let (r, e, _) = h.open(Arc::from("t"), 1_000);
        h.append(r, 1, &frame(1, 10), 1_000);
        h.append(r, 2, &frame(2, 10), 50_000);
        assert!(h.replay(r, Some(e), 0, 2, 55_000).recovered);
        assert!(
            !h.replay(r, Some(e), 0, 2, 62_000).recovered,
            "offset 1 is past the ttl"
        );
        assert!(h.replay(r, Some(e), 1, 2, 62_000).recovered);
    }

    #[test]
    fn oversized_frames_are_not_kept() {
        let mut h = History::new(&cfg(4096, 1, 16), 1);
        let (r, e, _) = h.open(Arc::from("t"), 0);
        h.append(r, 1, &frame(1, 3000), 0);
        h.append(r, 2, &frame(2, 10), 0);
        assert!(!h.replay(r, Some(e), 0, 2, 0).recovered);
        assert!(h.replay(r, Some(e), 1, 2, 0).recovered);
    }

    #[test]
    fn pool_reclaims_the_least_recently_written_ring() {
        let mut h = History::new(&cfg(1 << 16, 2, 4), 1);
        let (a, _, _) = h.open(Arc::from("a"), 0);
        let (b, _, _) = h.open(Arc::from("b"), 0);
        h.append(a, 1, &frame(1, 10), 100);
        h.append(b, 1, &frame(1, 10), 50);
        let (c, ec, evicted) = h.open(Arc::from("c"), 200);
        assert_eq!(evicted.as_deref(), Some("b"));
        assert_eq!(c, b);
        assert_ne!(ec, 0);
        h.release(a);
        let (_, _, evicted) = h.open(Arc::from("d"), 300);
        assert!(evicted.is_none(), "a freed ring is reused first");
    }
}
