//! Recently sent application event ids, so that `send_event` with an id already sent to a
//! connection sends nothing (a backend retrying a command it could not confirm).
//!
//! Owns: one bounded window per shard. Never: remembers beyond the window: an id is forgotten
//! once [`SEND_DEDUP_WINDOW`] newer (connection, id) pairs have been sent on the shard, which
//! bounds memory at about 24 bytes per entry whatever the traffic.

use std::collections::{HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::conn::ConnId;

/// (connection, event id) pairs remembered per shard. A duplicate arriving later than this many
/// sends is sent again.
pub const SEND_DEDUP_WINDOW: usize = 4096;

#[derive(Debug, Default)]
pub struct RecentIds {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
}

impl RecentIds {
    /// Records that `id` goes to `conn`; `false` when it already went there within the window.
    /// Pairs are kept as 64-bit hashes: a collision (about one in 10^15 at this window) would
    /// suppress one send.
    pub fn first_time(&mut self, conn: ConnId, id: &str) -> bool {
        let mut h = DefaultHasher::new();
        conn.hash(&mut h);
        id.hash(&mut h);
        let key = h.finish();
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > SEND_DEDUP_WINDOW
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_within_the_window_only() {
        let mut r = RecentIds::default();
        let (a, b) = (ConnId::new(0, 1, 1), ConnId::new(0, 1, 2));
        assert!(r.first_time(a, "e1"));
        assert!(!r.first_time(a, "e1"));
        assert!(r.first_time(b, "e1"), "per connection");
        for i in 0..SEND_DEDUP_WINDOW {
            r.first_time(a, &format!("x{i}"));
        }
        assert!(r.first_time(a, "e1"), "forgotten past the window");
        assert!(r.order.len() <= SEND_DEDUP_WINDOW);
    }
}
