//! One shard's view of topics: its local subscribers, and — for the topics it owns — which other
//! shards have subscribers and how many publications it has sequenced.
//!
//! Owns: the topic table. Never: sends anything; the shard turns the [`Change`]s returned here
//! into fabric messages and acknowledgements.
//!
//! Ownership: every topic has exactly one owner shard, computed from its name ([`owner_of`]).
//! All publications of a topic pass through its owner, which numbers them and fans them out, so
//! every subscriber on every shard sees one order.
//!
//! Local interest: a shard that gains its first subscriber of a topic it does not own tells the
//! owner and counts the confirmation it is waiting for; until every confirmation is in, the entry
//! is *pending*: deliveries that arrive meanwhile were sequenced before the subscription and are
//! discarded, and subscribe acknowledgements wait. An entry stays while anything is pending, so a
//! quick unsubscribe/subscribe cannot confuse an old confirmation with the new request.
//!
//! Invariant: an entry exists iff it has local subscribers, or it is owned here and some shard is
//! interested, has history or has presence members, or a confirmation is pending.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use indexmap::IndexSet;

use crate::presence::Members;
use crate::recovery::RingId;

use crate::config::SHARDS_MAX;

/// A slab key of a connection on this shard.
pub type ConnKey = u32;

/// The shard that owns `topic`: stable for the life of the process and equal on every shard.
pub fn owner_of(topic: &str, shards: usize) -> usize {
    let mut h = DefaultHasher::new();
    topic.hash(&mut h);
    (h.finish() % shards as u64) as usize
}

/// A fixed set of shard indices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardSet([u64; SHARDS_MAX / 64]);

impl ShardSet {
    pub fn insert(&mut self, s: usize) {
        self.0[s / 64] |= 1 << (s % 64);
    }
    pub fn remove(&mut self, s: usize) {
        self.0[s / 64] &= !(1 << (s % 64));
    }
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(i, w)| {
            (0..64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| i * 64 + b)
        })
    }
}

#[derive(Debug)]
pub struct Topic {
    pub name: Arc<str>,
    /// Connections on this shard subscribed to the topic.
    pub subscribers: IndexSet<ConnKey>,
    /// Interest confirmations still awaited from the owner (0 = deliveries flow).
    pending_confirms: u32,
    /// Subscribe requests (ids) waiting for this topic's confirmation.
    pub waiters: Vec<u64>,
    /// Owner only: other shards with subscribers.
    pub interested: ShardSet,
    /// Owner only: publications sequenced so far; the last one's offset.
    pub published: u64,
    /// Owner only, with recovery: the topic's history ring and its epoch.
    pub ring: Option<RingId>,
    pub epoch: u32,
    /// Owner only, with presence: the topic's members.
    pub presence: Option<Box<Members>>,
}

impl Topic {
    /// Deliveries reach local subscribers only once the owner has confirmed this shard's interest.
    pub fn is_live(&self) -> bool {
        self.pending_confirms == 0
    }

    /// Local subscribers of the topic.
    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }
}

/// What the shard must do after a table change.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing beyond the local table.
    None,
    /// Tell the owner this shard now has (`true`) or no longer has (`false`) subscribers.
    Interest { owner: usize, on: bool },
}

pub struct Topics {
    me: usize,
    shards: usize,
    map: HashMap<Arc<str>, Topic>,
}

impl Topics {
    pub fn new(me: usize, shards: usize) -> Self {
        Self {
            me,
            shards,
            map: HashMap::new(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Topic> {
        self.map.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Topic> {
        self.map.get_mut(name)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn owner_of(&self, name: &str) -> usize {
        owner_of(name, self.shards)
    }

    /// Adds `conn` as a subscriber. Returns the topic's shared name (for the connection's own
    /// list), whether it was newly added, and the change to announce.
    pub fn subscribe(&mut self, name: &str, conn: ConnKey) -> (Arc<str>, bool, Change) {
        let owner = self.owner_of(name);
        let me = self.me;
        let t = self.entry(name);
        let was_empty = t.subscribers.is_empty();
        let added = t.subscribers.insert(conn);
        let change = if added && was_empty && owner != me {
            t.pending_confirms += 1;
            Change::Interest { owner, on: true }
        } else {
            Change::None
        };
        (t.name.clone(), added, change)
    }

    /// Removes `conn`; drops the entry when nothing keeps it.
    pub fn unsubscribe(&mut self, name: &str, conn: ConnKey) -> Change {
        let owner = self.owner_of(name);
        let Some(t) = self.map.get_mut(name) else {
            return Change::None;
        };
        if !t.subscribers.swap_remove(&conn) || !t.subscribers.is_empty() {
            return Change::None;
        }
        self.gc(name);
        if owner == self.me {
            Change::None
        } else {
            Change::Interest { owner, on: false }
        }
    }

    /// The owner confirmed one `Interest { on: true }`. Returns the waiting request ids once
    /// every confirmation is in.
    pub fn confirm(&mut self, name: &str) -> Vec<u64> {
        let Some(t) = self.map.get_mut(name) else {
            debug_assert!(false, "confirmation for a topic with nothing pending");
            return Vec::new();
        };
        debug_assert!(t.pending_confirms > 0);
        t.pending_confirms = t.pending_confirms.saturating_sub(1);
        let waiters = if t.is_live() {
            std::mem::take(&mut t.waiters)
        } else {
            Vec::new()
        };
        self.gc(name);
        waiters
    }

    /// Owner side: `shard` gained or lost subscribers of `name`.
    pub fn set_interest(&mut self, name: &str, shard: usize, on: bool) {
        debug_assert_eq!(self.owner_of(name), self.me, "interest sent to a non-owner");
        if on {
            self.entry(name).interested.insert(shard);
        } else if let Some(t) = self.map.get_mut(name) {
            t.interested.remove(shard);
            self.gc(name);
        }
    }

    /// Owner side: numbers the next publication of `name`; returns its offset and the topic.
    pub fn sequence(&mut self, name: &str) -> &mut Topic {
        let t = self.entry(name);
        t.published += 1;
        t
    }

    /// Owner side: forgets a topic that was only created to sequence a publication nobody
    /// receives.
    pub fn release_if_unused(&mut self, name: &str) {
        self.gc(name);
    }

    /// The topic, created if absent.
    pub fn entry(&mut self, name: &str) -> &mut Topic {
        if !self.map.contains_key(name) {
            let name: Arc<str> = Arc::from(name);
            self.map.insert(
                name.clone(),
                Topic {
                    name,
                    subscribers: IndexSet::new(),
                    pending_confirms: 0,
                    waiters: Vec::new(),
                    interested: ShardSet::default(),
                    published: 0,
                    ring: None,
                    epoch: 0,
                    presence: None,
                },
            );
        }
        self.map.get_mut(name).expect("inserted above")
    }

    /// Drops the entry when nothing keeps it (see the module invariant; a history ring and
    /// presence members keep it too).
    pub fn gc(&mut self, name: &str) {
        let keep = self.map.get(name).is_some_and(|t| {
            !t.subscribers.is_empty()
                || !t.interested.is_empty()
                || t.pending_confirms > 0
                || t.ring.is_some()
                || t.presence.as_ref().is_some_and(|p| !p.is_empty())
        });
        if !keep {
            self.map.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn foreign_topic(me: usize, shards: usize) -> String {
        (0..)
            .map(|i| format!("t{i}"))
            .find(|t| owner_of(t, shards) != me)
            .unwrap()
    }

    #[test]
    fn owner_is_stable_and_in_range() {
        for s in 1..8 {
            let o = owner_of("chat:lobby", s);
            assert!(o < s);
            assert_eq!(o, owner_of("chat:lobby", s));
        }
    }

    #[test]
    fn first_and_last_subscriber_announce_interest() {
        let name = foreign_topic(0, 2);
        let mut t = Topics::new(0, 2);
        let (_, added, ch) = t.subscribe(&name, 1);
        assert!(added);
        assert_eq!(ch, Change::Interest { owner: 1, on: true });
        assert!(!t.get(&name).unwrap().is_live());
        assert_eq!(t.subscribe(&name, 2).2, Change::None);
        assert!(!t.subscribe(&name, 2).1, "idempotent");
        assert!(t.confirm(&name).is_empty());
        assert!(t.get(&name).unwrap().is_live());
        assert_eq!(t.unsubscribe(&name, 1), Change::None);
        assert_eq!(
            t.unsubscribe(&name, 2),
            Change::Interest {
                owner: 1,
                on: false
            }
        );
        assert!(t.is_empty());
    }

    #[test]
    fn quick_resubscribe_waits_for_its_own_confirmation() {
        let name = foreign_topic(0, 2);
        let mut t = Topics::new(0, 2);
        t.subscribe(&name, 1);
        t.unsubscribe(&name, 1);
        // Entry kept: a confirmation is pending.
        assert!(t.get(&name).is_some());
        t.subscribe(&name, 2);
        t.get_mut(&name).unwrap().waiters.push(42);
        assert!(
            t.confirm(&name).is_empty(),
            "first confirmation is for the old request"
        );
        assert!(!t.get(&name).unwrap().is_live());
        assert_eq!(t.confirm(&name), vec![42]);
        assert!(t.get(&name).unwrap().is_live());
    }

    #[test]
    fn owner_interest_and_sequence() {
        let mut t = Topics::new(0, 1);
        assert_eq!(
            t.subscribe("x", 1).2,
            Change::None,
            "owner needs no confirmation"
        );
        assert!(t.get("x").unwrap().is_live());
        assert_eq!(t.sequence("x").published, 1);
        assert_eq!(t.sequence("x").published, 2);
        let mut set = ShardSet::default();
        set.insert(3);
        set.insert(200);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![3, 200]);
    }
}
