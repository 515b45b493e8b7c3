//! One shard's local view of topics: which of its connections are subscribed to what, and
//! whether the topic's owner has confirmed this shard's interest yet.
//!
//! Owns: the local topic table. Never: sends anything (the shard turns the [`Delta`]s returned
//! here into fabric messages and acknowledgements), nor keeps what only a topic's owner keeps
//! (sequencing, history, interested shards, presence, queue-group counts: [`crate::topic_owner`]).
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
//! Queue groups ([`crate::queue_groups`]): a connection holds at most one subscription per
//! topic — plain (every publication) or as a member of one queue group (its share). Subscribing
//! again in the other mode, or in another group, replaces the subscription; again in the same
//! mode changes nothing. Only plain subscribers make a shard *interested* (the owner sends it
//! every publication); group members are counted by the owner per group and shard instead.
//!
//! In a cluster ([`Topics::set_owner_interest`]) the owner registers its own shard's interest
//! too, through the same join: the owner must know when the node's interest in a topic starts
//! and ends (any shard, itself included), and a subscription on the owner's shard is
//! acknowledged only once the other nodes have confirmed it, like any other.
//!
//! Invariant: an entry exists iff it has local subscribers or queue-group members, or a
//! confirmation is pending; a confirmation is awaited only for a topic owned elsewhere, or in a
//! cluster.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use indexmap::IndexSet;

use crate::queue_groups::LocalGroups;

use crate::config::SHARDS_MAX;
use crate::conn::ConnKey;

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
    /// Adds shard `s`.
    pub fn insert(&mut self, s: usize) {
        self.0[s / 64] |= 1 << (s % 64);
    }
    /// Removes shard `s`.
    pub fn remove(&mut self, s: usize) {
        self.0[s / 64] &= !(1 << (s % 64));
    }
    /// No shard in the set.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    /// The shards in the set, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(i, w)| {
            (0..64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| i * 64 + b)
        })
    }
}

/// A topic as one shard's connections hold it: its local subscribers, and whether deliveries
/// flow yet. What the topic's owner keeps for every shard is in [`crate::topic_owner`].
#[derive(Debug)]
pub struct Topic {
    /// The topic's name, shared with connection subscription lists.
    name: Arc<str>,
    /// Connections on this shard subscribed to the topic, plain (not in a queue group).
    subscribers: IndexSet<ConnKey>,
    /// Connections on this shard subscribed in a queue group.
    groups: LocalGroups,
    /// Interest confirmations still awaited from the owner (0 = deliveries flow).
    pending_confirms: u32,
    /// Subscribe requests (ids) waiting for this topic's confirmation.
    waiters: Vec<u64>,
}

impl Topic {
    /// The topic's name, shared with the connections' subscription lists.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Deliveries reach local subscribers only once the owner has confirmed this shard's interest.
    pub fn is_live(&self) -> bool {
        self.pending_confirms == 0
    }

    /// Local subscribers of the topic, queue-group members included.
    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len() + self.groups.total()
    }

    /// The plain subscribers (every publication goes to each).
    pub fn subscribers(&self) -> &IndexSet<ConnKey> {
        &self.subscribers
    }

    /// The local queue groups and their member counts.
    pub fn groups(&self) -> impl Iterator<Item = (&Arc<str>, usize)> + '_ {
        self.groups.iter()
    }

    /// Members of `group` here.
    pub fn group_members(&self, group: &str) -> usize {
        self.groups.members(group)
    }

    /// The next member of `group` in round-robin order.
    pub fn pick_member(&mut self, group: &str) -> Option<ConnKey> {
        self.groups.pick(group)
    }
}

/// What a subscribe or an unsubscribe changed in the local table, for the shard to tell the
/// topic's owner.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// The connection is newly on the topic (subscribe), or was on it and has left
    /// (unsubscribe).
    pub added_or_removed: bool,
    /// This shard's interest in a topic owned elsewhere (or any topic in a cluster): `Some(true)`, its first plain
    /// subscriber (register it; a confirmation is now pending); `Some(false)`, its last plain
    /// subscriber went (withdraw it).
    pub interest: Option<bool>,
    /// The connection became (`Some(true)`) or stopped being (`Some(false)`) a plain subscriber:
    /// presence joins and leaves follow this.
    pub plain: Option<bool>,
    /// The queue group it left, with this shard's remaining members of it.
    pub left_group: Option<(Arc<str>, u32)>,
    /// The queue group it joined, with this shard's members of it now.
    pub joined_group: Option<(Arc<str>, u32)>,
}

/// A shard's local topic table: the topics with a local subscriber or a pending confirmation.
pub struct Topics {
    me: usize,
    shards: usize,
    /// The owner registers its own interest (a cluster runs): see the module docs.
    owner_interest: bool,
    map: HashMap<Arc<str>, Topic>,
}

impl Topics {
    /// An empty table for shard `me` of `shards`.
    pub fn new(me: usize, shards: usize) -> Self {
        Self {
            me,
            shards,
            owner_interest: false,
            map: HashMap::new(),
        }
    }

    /// Whether this shard registers its interest with itself for the topics it owns (in a
    /// cluster: see the module docs). Set before any subscription.
    pub fn set_owner_interest(&mut self, on: bool) {
        debug_assert!(self.map.is_empty(), "set after subscriptions");
        self.owner_interest = on;
    }

    /// Whether a first plain subscriber of `name` here registers this shard's interest with
    /// the owner (and a last one withdraws it).
    fn registers(&self, name: &str) -> bool {
        self.owner_interest || self.owner_of(name) != self.me
    }

    /// The topic, if this shard knows it.
    pub fn get(&self, name: &str) -> Option<&Topic> {
        self.map.get(name)
    }

    /// The topic, mutably, if this shard knows it.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Topic> {
        self.map.get_mut(name)
    }

    /// Whether a local connection is on `name` or a confirmation for it is pending.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Subscribe request `request` waits for the confirmation pending on `name` (another
    /// request is registering this shard's interest). `false` when deliveries already flow.
    pub fn await_confirmation(&mut self, name: &str, request: u64) -> bool {
        match self.map.get_mut(name) {
            Some(t) if !t.is_live() => {
                t.waiters.push(request);
                true
            }
            _ => false,
        }
    }

    /// The topics with a local subscriber (or queue-group member) for which `keep` holds, each
    /// with that count: at most `max`, the first by name.
    pub fn subscriber_counts(
        &self,
        keep: impl Fn(&str) -> bool,
        max: usize,
    ) -> Vec<(Arc<str>, usize)> {
        let mut counts: Vec<(Arc<str>, usize)> = self
            .map
            .iter()
            .filter(|(name, t)| t.subscriber_count() > 0 && keep(name))
            .map(|(name, t)| (name.clone(), t.subscriber_count()))
            .collect();
        counts.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        counts.truncate(max);
        counts
    }

    /// Topics in the table.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No topic in the table.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The shard that owns `name` (sequences its publications, holds its history and presence).
    pub fn owner_of(&self, name: &str) -> usize {
        owner_of(name, self.shards)
    }

    /// Subscribes `conn`, plain (`group` `None`) or as a member of `group`, replacing a
    /// subscription of the other kind or in another group. Returns the topic's shared name (for
    /// the connection's own list) and what changed.
    pub fn subscribe(
        &mut self,
        name: &str,
        conn: ConnKey,
        group: Option<&Arc<str>>,
    ) -> (Arc<str>, Delta) {
        let registers = self.registers(name);
        let t = self.entry(name);
        let current_group = t.groups.group_of(conn).cloned();
        let plain_now = t.subscribers.contains(&conn);
        let mut d = Delta {
            added_or_removed: !plain_now && current_group.is_none(),
            ..Delta::default()
        };
        match (group, plain_now, &current_group) {
            (None, true, _) => return (t.name.clone(), d),
            (Some(g), _, Some(cur)) if cur == g => return (t.name.clone(), d),
            _ => {}
        }
        // Leave the current subscription (another mode or group).
        if plain_now {
            t.subscribers.swap_remove(&conn);
            d.plain = Some(false);
            if t.subscribers.is_empty() && registers {
                d.interest = Some(false);
            }
        }
        d.left_group = t.groups.leave(conn);
        match group {
            Some(g) => d.joined_group = Some((g.clone(), t.groups.join(g, conn))),
            None => {
                if t.subscribers.is_empty() && registers {
                    t.pending_confirms += 1;
                    d.interest = Some(true);
                }
                t.subscribers.insert(conn);
                d.plain = Some(true);
            }
        }
        let shared = t.name.clone();
        self.debug_check(name);
        (shared, d)
    }

    /// Removes `conn`'s subscription (plain or in a group); drops the entry when nothing keeps
    /// it.
    pub fn unsubscribe(&mut self, name: &str, conn: ConnKey) -> Delta {
        let registers = self.registers(name);
        let Some(t) = self.map.get_mut(name) else {
            return Delta::default();
        };
        let mut d = Delta::default();
        if t.subscribers.swap_remove(&conn) {
            d.added_or_removed = true;
            d.plain = Some(false);
            if t.subscribers.is_empty() && registers {
                d.interest = Some(false);
            }
        } else if let Some(left) = t.groups.leave(conn) {
            d.added_or_removed = true;
            d.left_group = Some(left);
        }
        if d.added_or_removed {
            self.gc(name);
        }
        self.debug_check(name);
        d
    }

    /// The queue group `conn` is a member of in topic `name`.
    pub fn group_of(&self, name: &str, conn: ConnKey) -> Option<&Arc<str>> {
        self.map.get(name)?.groups.group_of(conn)
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
        self.debug_check(name);
        waiters
    }

    /// The topic, created if absent.
    fn entry(&mut self, name: &str) -> &mut Topic {
        if !self.map.contains_key(name) {
            let name: Arc<str> = Arc::from(name);
            self.map.insert(
                name.clone(),
                Topic {
                    name,
                    subscribers: IndexSet::new(),
                    groups: LocalGroups::default(),
                    pending_confirms: 0,
                    waiters: Vec::new(),
                },
            );
        }
        self.map.get_mut(name).expect("inserted above")
    }

    /// Drops the entry when nothing keeps it (see the module invariant).
    fn gc(&mut self, name: &str) {
        if !self.map.get(name).is_some_and(is_kept) {
            self.map.remove(name);
        }
    }

    /// Asserts the module's invariants for `name` (debug builds): an entry is kept only while
    /// something keeps it; a confirmation is awaited by a non-owner only; requests wait only
    /// while a confirmation is pending.
    fn debug_check(&self, name: &str) {
        if !cfg!(debug_assertions) {
            return;
        }
        let Some(t) = self.map.get(name) else { return };
        debug_assert!(is_kept(t), "topic {name}: an entry nothing keeps");
        if self.owner_of(name) == self.me && !self.owner_interest {
            debug_assert_eq!(
                t.pending_confirms, 0,
                "topic {name}: the owner awaits itself"
            );
        }
        debug_assert!(
            t.waiters.is_empty() || t.pending_confirms > 0,
            "topic {name}: requests waiting on a live topic"
        );
    }
}

/// Whether anything keeps a topic's entry (the module invariant).
fn is_kept(t: &Topic) -> bool {
    !t.subscribers.is_empty() || !t.groups.is_empty() || t.pending_confirms > 0
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
        let (_, d) = t.subscribe(&name, 1, None);
        assert!(d.added_or_removed);
        assert_eq!((d.interest, d.plain), (Some(true), Some(true)));
        assert!(!t.get(&name).unwrap().is_live());
        assert_eq!(t.subscribe(&name, 2, None).1.interest, None);
        assert_eq!(
            t.subscribe(&name, 2, None).1,
            Delta::default(),
            "idempotent"
        );
        assert!(t.confirm(&name).is_empty());
        assert!(t.get(&name).unwrap().is_live());
        assert_eq!(t.unsubscribe(&name, 1).interest, None);
        let d = t.unsubscribe(&name, 2);
        assert_eq!((d.interest, d.plain), (Some(false), Some(false)));
        assert!(t.is_empty());
        assert_eq!(t.unsubscribe(&name, 2), Delta::default(), "not on it");
    }

    #[test]
    fn quick_resubscribe_waits_for_its_own_confirmation() {
        let name = foreign_topic(0, 2);
        let mut t = Topics::new(0, 2);
        t.subscribe(&name, 1, None);
        t.unsubscribe(&name, 1);
        // Entry kept: a confirmation is pending.
        assert!(t.get(&name).is_some());
        t.subscribe(&name, 2, None);
        assert!(t.await_confirmation(&name, 42));
        assert!(
            t.confirm(&name).is_empty(),
            "first confirmation is for the old request"
        );
        assert!(!t.get(&name).unwrap().is_live());
        assert_eq!(t.confirm(&name), vec![42]);
        assert!(t.get(&name).unwrap().is_live());
    }

    #[test]
    fn one_subscription_per_topic_a_new_mode_replaces_the_old() {
        let name = foreign_topic(0, 2);
        let (w, x): (Arc<str>, Arc<str>) = (Arc::from("w"), Arc::from("x"));
        let mut t = Topics::new(0, 2);
        // Plain, then in group w: the shard's only plain subscriber goes, interest with it.
        t.subscribe(&name, 1, None);
        t.confirm(&name);
        let (_, d) = t.subscribe(&name, 1, Some(&w));
        assert!(!d.added_or_removed, "still on the topic");
        assert_eq!((d.interest, d.plain), (Some(false), Some(false)));
        assert_eq!(d.joined_group, Some((w.clone(), 1)));
        assert!(t.get(&name).unwrap().subscribers().is_empty());
        assert_eq!(t.get(&name).unwrap().subscriber_count(), 1);
        // The same group again changes nothing; another group moves it.
        assert_eq!(t.subscribe(&name, 1, Some(&w)).1, Delta::default());
        let (_, d) = t.subscribe(&name, 1, Some(&x));
        assert_eq!(d.left_group, Some((w.clone(), 0)));
        assert_eq!(d.joined_group, Some((x.clone(), 1)));
        assert_eq!(t.group_of(&name, 1), Some(&x));
        // Back to plain: interest again (a new confirmation), and the group left.
        let (_, d) = t.subscribe(&name, 1, None);
        assert_eq!((d.interest, d.plain), (Some(true), Some(true)));
        assert_eq!(d.left_group, Some((x.clone(), 0)));
        assert!(!t.get(&name).unwrap().is_live());
        t.confirm(&name);
        // Group members alone keep the entry, and need no interest.
        let (_, d) = t.subscribe(&name, 2, Some(&w));
        assert!(d.added_or_removed && d.interest.is_none() && d.plain.is_none());
        t.unsubscribe(&name, 1);
        assert!(t.get(&name).is_some());
        let d = t.unsubscribe(&name, 2);
        assert!(d.added_or_removed);
        assert_eq!(d.left_group, Some((w, 0)));
        assert!(t.is_empty());
    }

    #[test]
    fn the_owner_needs_no_confirmation() {
        let mut t = Topics::new(0, 1);
        assert_eq!(
            t.subscribe("x", 1, None).1.interest,
            None,
            "owner needs no confirmation"
        );
        assert!(t.get("x").unwrap().is_live());
        assert!(!t.await_confirmation("x", 7), "nothing to wait for");
    }

    #[test]
    fn shard_sets_list_their_members() {
        let mut set = ShardSet::default();
        set.insert(3);
        set.insert(200);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![3, 200]);
    }
}
