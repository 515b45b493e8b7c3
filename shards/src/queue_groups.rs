//! Queue groups: subscribers of a topic that share its publications. Each publication goes to
//! exactly ONE member of each of the topic's groups, round-robin over the members on every shard,
//! while the topic's plain subscribers still get every publication.
//!
//! Owns: who is a member and who gets the next publication, sans-IO — [`Membership`] on a
//! topic's owner shard (how many members each shard has in each group; picks the shard) and
//! [`LocalGroups`] on every shard (which local connections are members; picks the connection).
//! Never: sends, delivers or frames anything (the shard does), or reads a clock.
//!
//! Selection, in two levels, so the owner never needs to know connections of other shards:
//! 1. the owner picks a shard per group, weighted round-robin over the members each shard has
//!    (a cursor walks the members' slots: with 3 members on shard A and 1 on B, A gets 3 of
//!    every 4 publications);
//! 2. the picked shard picks one of its local members of that group, round-robin.
//!
//! So every member gets about the same share, wherever it sits.
//!
//! Counts travel as absolute values: a shard's `Join` and `Leave` carry how many members of the
//! group it has *now*, not a ±1, so the owner's view converges to the truth whatever a refusal or
//! an interleaving did in between (the last message from a shard wins, and the fabric is FIFO per
//! pair of shards).
//!
//! A member picked by the owner may be gone by the time the publication arrives (it left, or it
//! was evicted): the shard then gives the publication to another local member of the group; when
//! none is left the publication is dropped for that group and counted
//! (`wse_dropped_total{reason="queue_group_no_member"}`). A member whose outbound queue is full is
//! evicted (4413) like any slow consumer, and the publication goes to the next local member.
//!
//! Recovery: members get publications **without** recovery stamps (`tp`/`e`/`o`). A member sees
//! only its share of the topic's offsets; stamped, those gaps would make a client ask for
//! recovery on every message. Delivery to a group is at most once, in the topic's order per
//! member (PROTOCOL.md, "Queue groups").
//!
//! Limits: [`QUEUE_GROUPS_PER_TOPIC_MAX`] groups per topic (counted by the owner, so across
//! shards); a join that would create one more is refused with `QUEUE_GROUP_LIMIT`. Since that
//! bound is shared by everyone on the topic, joining a group is a right
//! ([`Identity::queue_group_refusal`](crate::auth::Identity::queue_group_refusal)): a
//! connection joins only the groups its token's `wse_queue_groups` claim (or, without one,
//! `auth.default_queue_groups`) permits, so made-up names cannot fill a topic's slots and lock
//! its real workers out.

use std::sync::Arc;

use indexmap::IndexSet;

use crate::conn::ConnKey;

/// Queue groups one topic may have at once, over all shards. Each group costs the owner one pick
/// and (at most) one cross-shard entry per publication, so this bounds the per-publication
/// work a client can cause by inventing group names.
pub const QUEUE_GROUPS_PER_TOPIC_MAX: usize = 64;

/// A group of a topic, as one shared allocation: the owner holds one per group and hands a
/// clone to each cross-shard delivery (one pointer in the fabric entry instead of two names).
#[derive(Debug, PartialEq, Eq)]
pub struct GroupName {
    /// The topic the group belongs to.
    pub topic: Arc<str>,
    /// The group's name, as members joined it.
    pub group: Arc<str>,
}

/// A join would create a group past [`QUEUE_GROUPS_PER_TOPIC_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit;

// ------------------------------------------------------------------------------------------------
// The owner's side
// ------------------------------------------------------------------------------------------------

/// The owner's view of one topic's groups: members per shard, and the round-robin cursor.
///
/// Invariant: every group listed has at least one member (a group goes with its last member),
/// and each shard appears at most once per group, with a non-zero count.
#[derive(Debug, Default)]
pub struct Membership {
    groups: Vec<OwnerGroup>,
}

#[derive(Debug)]
struct OwnerGroup {
    name: Arc<GroupName>,
    /// (shard, its members), counts > 0.
    shards: Vec<(usize, u32)>,
    /// The sum of the counts.
    total: u64,
    /// Publications picked so far; `cursor % total` is the member slot of the next one.
    cursor: u64,
}

impl Membership {
    /// `shard` now has `members` members of `group` (a join: it has at least one). Creates the
    /// group with its first member.
    ///
    /// # Errors
    /// [`GroupLimit`] when the group is new and the topic has [`QUEUE_GROUPS_PER_TOPIC_MAX`]
    /// already; nothing changes.
    pub fn join(
        &mut self,
        topic: &Arc<str>,
        group: &Arc<str>,
        shard: usize,
        members: u32,
    ) -> Result<(), GroupLimit> {
        debug_assert!(members > 0, "a join brings a member");
        if self.find(group).is_none() {
            if self.groups.len() >= QUEUE_GROUPS_PER_TOPIC_MAX {
                return Err(GroupLimit);
            }
            self.groups.push(OwnerGroup {
                name: Arc::new(GroupName {
                    topic: topic.clone(),
                    group: group.clone(),
                }),
                shards: Vec::new(),
                total: 0,
                cursor: 0,
            });
        }
        let i = self.find(group).expect("present");
        self.groups[i].set(shard, members);
        Ok(())
    }

    /// `shard` now has `members` members of `group` (a leave). A group unknown here (its join
    /// was refused) is not created; a group without members is forgotten.
    pub fn leave(&mut self, group: &str, shard: usize, members: u32) {
        let Some(i) = self.find(group) else {
            return;
        };
        self.groups[i].set(shard, members);
        if self.groups[i].total == 0 {
            self.groups.swap_remove(i);
        }
    }

    /// Picks, for every group, the shard whose member gets the next publication; appends
    /// `(shard, group)` to `into`, one entry per group.
    pub fn pick(&mut self, into: &mut Vec<(usize, Arc<GroupName>)>) {
        for g in &mut self.groups {
            assert!(g.total > 0, "a listed group has members");
            let mut slot = g.cursor % g.total;
            g.cursor = g.cursor.wrapping_add(1);
            for &(shard, n) in &g.shards {
                if slot < u64::from(n) {
                    into.push((shard, g.name.clone()));
                    break;
                }
                slot -= u64::from(n);
            }
        }
    }

    /// Picks, for `group` only, the shard whose member gets the next publication (`None`: no
    /// such group here).
    pub fn pick_one(&mut self, group: &str) -> Option<(usize, Arc<GroupName>)> {
        let i = self.find(group)?;
        let g = &mut self.groups[i];
        let mut slot = g.cursor % g.total;
        g.cursor = g.cursor.wrapping_add(1);
        for &(shard, n) in &g.shards {
            if slot < u64::from(n) {
                return Some((shard, g.name.clone()));
            }
            slot -= u64::from(n);
        }
        None
    }

    /// The topic has no queue group left.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Groups of the topic.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Members of `group` on every shard, as the owner counts them.
    pub fn members(&self, group: &str) -> u64 {
        self.find(group).map_or(0, |i| self.groups[i].total)
    }

    fn find(&self, group: &str) -> Option<usize> {
        self.groups.iter().position(|g| *g.name.group == *group)
    }
}

impl OwnerGroup {
    fn set(&mut self, shard: usize, members: u32) {
        match self.shards.iter().position(|(s, _)| *s == shard) {
            Some(i) if members == 0 => {
                self.shards.swap_remove(i);
            }
            Some(i) => self.shards[i].1 = members,
            None if members == 0 => {}
            None => self.shards.push((shard, members)),
        }
        self.total = self.shards.iter().map(|(_, n)| u64::from(*n)).sum();
    }
}

// ------------------------------------------------------------------------------------------------
// Every shard's side
// ------------------------------------------------------------------------------------------------

/// One topic's queue-group members on this shard.
///
/// Invariant: a connection is in at most one group of the topic, and every group listed has a
/// member.
#[derive(Debug, Default)]
pub struct LocalGroups {
    groups: Vec<LocalGroup>,
}

#[derive(Debug)]
struct LocalGroup {
    name: Arc<str>,
    members: IndexSet<ConnKey>,
    /// Publications handed out so far; `next % len` is the next member.
    next: usize,
}

impl LocalGroups {
    /// The group `conn` is a member of.
    pub fn group_of(&self, conn: ConnKey) -> Option<&Arc<str>> {
        self.groups
            .iter()
            .find(|g| g.members.contains(&conn))
            .map(|g| &g.name)
    }

    /// Adds `conn` (in no group of this topic) to `group`; returns the group's local members.
    pub fn join(&mut self, group: &Arc<str>, conn: ConnKey) -> u32 {
        debug_assert!(self.group_of(conn).is_none(), "one group per topic");
        let i = match self.groups.iter().position(|g| g.name == *group) {
            Some(i) => i,
            None => {
                self.groups.push(LocalGroup {
                    name: group.clone(),
                    members: IndexSet::new(),
                    next: 0,
                });
                self.groups.len() - 1
            }
        };
        self.groups[i].members.insert(conn);
        count(self.groups[i].members.len())
    }

    /// Removes `conn` from its group; returns the group and its remaining local members.
    pub fn leave(&mut self, conn: ConnKey) -> Option<(Arc<str>, u32)> {
        let i = self.groups.iter().position(|g| g.members.contains(&conn))?;
        let g = &mut self.groups[i];
        g.members.swap_remove(&conn);
        let left = (g.name.clone(), count(g.members.len()));
        if g.members.is_empty() {
            self.groups.swap_remove(i);
        }
        Some(left)
    }

    /// The member of `group` that gets the next publication, round-robin; `None` when the
    /// group has no member here.
    pub fn pick(&mut self, group: &str) -> Option<ConnKey> {
        let g = self.groups.iter_mut().find(|g| *g.name == *group)?;
        let key = *g.members.get_index(g.next % g.members.len())?;
        g.next = g.next.wrapping_add(1);
        Some(key)
    }

    /// Local members of `group`.
    pub fn members(&self, group: &str) -> usize {
        self.groups
            .iter()
            .find(|g| *g.name == *group)
            .map_or(0, |g| g.members.len())
    }

    /// Local members of every group.
    pub fn total(&self) -> usize {
        self.groups.iter().map(|g| g.members.len()).sum()
    }

    /// No local member in any group of the topic.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// (group, local members) of every group.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, usize)> {
        self.groups.iter().map(|g| (&g.name, g.members.len()))
    }
}

/// A member count as it travels (a shard holds far fewer than 2^32 connections).
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn arc(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    /// The owner and two shards' local tables, wired by hand as the fabric would: every pick
    /// goes to the picked shard, which picks a local member.
    struct Model {
        topic: Arc<str>,
        owner: Membership,
        shards: Vec<LocalGroups>,
    }

    impl Model {
        fn new(shards: usize) -> Self {
            Model {
                topic: arc("jobs"),
                owner: Membership::default(),
                shards: (0..shards).map(|_| LocalGroups::default()).collect(),
            }
        }
        fn join(&mut self, shard: usize, group: &str, conn: ConnKey) -> Result<(), GroupLimit> {
            let group = arc(group);
            let n = self.shards[shard].join(&group, conn);
            self.owner.join(&self.topic, &group, shard, n)
        }
        fn leave(&mut self, shard: usize, conn: ConnKey) {
            let (g, n) = self.shards[shard].leave(conn).unwrap();
            self.owner.leave(&g, shard, n);
        }
        /// One publication: who got it, per group, as (shard, conn) (`None`: nobody there).
        fn publish(&mut self) -> Vec<(String, usize, Option<ConnKey>)> {
            let mut picks = Vec::new();
            self.owner.pick(&mut picks);
            picks
                .into_iter()
                .map(|(shard, name)| {
                    let conn = self.shards[shard].pick(&name.group);
                    (name.group.to_string(), shard, conn)
                })
                .collect()
        }
    }

    #[test]
    fn one_member_per_group_round_robin_across_shards() {
        let mut m = Model::new(2);
        // 3 members on shard 0 and 1 on shard 1: weighted, each member gets a quarter.
        m.join(0, "w", 1).unwrap();
        m.join(0, "w", 2).unwrap();
        m.join(1, "w", 1).unwrap();
        m.join(0, "w", 3).unwrap();
        m.join(1, "other", 7).unwrap();
        assert_eq!(m.owner.members("w"), 4);
        let mut got: HashMap<(usize, ConnKey), u32> = HashMap::new();
        for _ in 0..40 {
            let picks = m.publish();
            assert_eq!(picks.len(), 2, "one member of each group");
            for (group, shard, conn) in picks {
                let conn = conn.expect("picked shard has a member");
                if group == "w" {
                    *got.entry((shard, conn)).or_default() += 1;
                } else {
                    assert_eq!((shard, conn), (1, 7));
                }
            }
        }
        assert_eq!(got.len(), 4);
        assert!(got.values().all(|&n| n == 10), "{got:?}");
    }

    #[test]
    fn leaving_members_and_groups() {
        let mut m = Model::new(2);
        m.join(0, "w", 1).unwrap();
        m.join(1, "w", 2).unwrap();
        m.leave(1, 2);
        assert_eq!(m.owner.members("w"), 1);
        for _ in 0..4 {
            assert_eq!(m.publish(), vec![("w".into(), 0, Some(1))]);
        }
        m.leave(0, 1);
        assert!(m.owner.is_empty() && m.shards.iter().all(LocalGroups::is_empty));
        assert!(m.publish().is_empty());
    }

    #[test]
    fn a_vanished_member_leaves_the_pick_to_the_shard() {
        // The owner picked shard 1 before it heard that its member left: the shard finds
        // nobody (the caller counts the drop), or another local member.
        let mut m = Model::new(2);
        m.join(1, "w", 5).unwrap();
        m.join(1, "w", 6).unwrap();
        let mut picks = Vec::new();
        m.owner.pick(&mut picks);
        m.shards[1].leave(5);
        assert_eq!(m.shards[1].pick(&picks[0].1.group), Some(6));
        m.shards[1].leave(6);
        assert_eq!(m.shards[1].pick(&picks[0].1.group), None);
    }

    #[test]
    fn absolute_counts_converge_and_unknown_leaves_create_nothing() {
        let topic = arc("t");
        let g = arc("g");
        let mut o = Membership::default();
        o.join(&topic, &g, 0, 3).unwrap();
        o.join(&topic, &g, 0, 2).unwrap(); // a later count replaces, never adds
        assert_eq!(o.members("g"), 2);
        o.leave("nope", 0, 4);
        assert_eq!(o.len(), 1);
        o.leave("g", 0, 0);
        assert!(o.is_empty());
    }

    #[test]
    fn groups_per_topic_are_bounded() {
        let mut m = Model::new(1);
        for i in 0..QUEUE_GROUPS_PER_TOPIC_MAX {
            m.join(0, &format!("g{i}"), i as ConnKey).unwrap();
        }
        let over = arc("one-too-many");
        assert_eq!(m.owner.join(&m.topic, &over, 0, 1), Err(GroupLimit));
        assert_eq!(m.owner.len(), QUEUE_GROUPS_PER_TOPIC_MAX);
        // An existing group still takes members.
        m.join(0, "g0", 1000).unwrap();
        assert_eq!(m.owner.members("g0"), 2);
    }

    #[test]
    fn one_group_per_connection() {
        let mut l = LocalGroups::default();
        assert_eq!(l.join(&arc("a"), 1), 1);
        assert_eq!(l.group_of(1).map(|g| &**g), Some("a"));
        assert_eq!(l.leave(1), Some((arc("a"), 0)));
        assert_eq!(l.leave(1), None);
        assert!(l.is_empty());
    }
}
