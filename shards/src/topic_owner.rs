//! The topic owner's role, for the topics one shard owns: numbering publications (with their
//! history ring when recovery is on), which other shards are interested, presence members, and
//! queue-group membership as the owner counts it.
//!
//! Owns: that state, and the shard's recovery history. Never: sends anything or touches a
//! connection (the shard's `owner` glue turns what these methods return into frames and fabric
//! entries), nor knows which local connections are subscribed (the local view,
//! [`crate::topics`]).
//!
//! Every publication and every join of a topic passes through its owner, in the order the owner
//! handles them; that order is the topic's order on every shard.
//!
//! Invariants: only topics owned here have an entry; an entry exists while some shard is
//! interested, or the topic has a history ring, presence members or queue-group members, or the
//! shard's own connections hold the topic (`held_locally` in [`TopicOwner::release`]: without
//! recovery its offsets count on while anyone here listens); offsets in a history ring are
//! gap-free from 1 (or from the first after a [`TopicOwner::history_remove`]).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::centrifuge::proto::ClientInfo;
use crate::codec::{self, OpCode};
use crate::command::TopicStats;
use crate::config::RecoveryConfig;
use crate::conn::ConnId;
use crate::presence::{Joined, Members};
use crate::protocol::{self, RecoveryInfo};
use crate::queue_groups::{GroupLimit, GroupName, Membership};
use crate::recovery::{History, HistoryRead, RingId};
use crate::topics::{ShardSet, owner_of};

/// A publication as its owner numbered it.
#[derive(Debug)]
pub struct Sequenced {
    /// The frame every plain subscriber gets: stamped (`tp`/`e`/`o`) when recovery is on.
    pub frame: Bytes,
    /// The publication's offset in its topic.
    pub offset: u64,
    /// The history's epoch, when recovery is on.
    pub epoch: Option<u32>,
}

/// What the owner keeps for one topic it owns.
#[derive(Debug)]
struct Owned {
    /// The topic's name, shared with the fabric entries that carry it.
    name: Arc<str>,
    /// Other shards with plain subscribers.
    interested: ShardSet,
    /// Publications sequenced so far: the last one's offset.
    published: u64,
    /// Publications sequenced since this entry was made (`published` restarts with an epoch).
    messages: u64,
    /// With recovery: the topic's history ring.
    ring: Option<RingId>,
    /// With recovery: the history's epoch (changes when the ring is recreated).
    epoch: u32,
    /// With presence: the topic's members.
    presence: Option<Box<Members>>,
    /// With presence: each member's connections, as Centrifuge's `presence` lists them (one
    /// entry per connection counted in `presence`).
    clients: HashMap<ConnId, ClientInfo>,
    /// The topic's queue groups, members counted per shard.
    membership: Option<Box<Membership>>,
}

impl Owned {
    /// Whether anything the owner keeps keeps the entry (besides the shard's own connections).
    fn is_kept(&self) -> bool {
        !self.interested.is_empty()
            || self.ring.is_some()
            || self.presence.as_ref().is_some_and(|p| !p.is_empty())
            || !self.clients.is_empty()
            || self.membership.as_ref().is_some_and(|m| !m.is_empty())
    }
}

/// The topics one shard owns, as their owner.
pub struct TopicOwner {
    me: usize,
    shards: usize,
    topics: HashMap<Arc<str>, Owned>,
    /// The history of the owned topics (recovery on); allocated at start.
    history: Option<History>,
    /// Presence members and the topics that have any, over the owned topics (for the gauges).
    presence: PresenceCounts,
}

/// How many presence members a shard's owned topics have, and how many of them have any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PresenceCounts {
    /// Owned topics with at least one member.
    pub topics: usize,
    /// Members over all owned topics (a user counts once per topic).
    pub users: usize,
}

impl TopicOwner {
    /// The owner role of shard `me` of `shards`, its history allocated when recovery is on.
    pub fn new(me: usize, shards: usize, recovery: &RecoveryConfig) -> Self {
        Self {
            me,
            shards,
            topics: HashMap::new(),
            history: recovery.enabled.then(|| History::new(recovery, shards)),
            presence: PresenceCounts::default(),
        }
    }

    /// Whether this shard owns `topic`.
    pub fn owns(&self, topic: &str) -> bool {
        owner_of(topic, self.shards) == self.me
    }

    /// Numbers the next publication of `topic` and frames it once: recorded in the topic's
    /// history when recovery is on, and then stamped when it is a JSON object (starts with `{`).
    pub fn sequence(&mut self, topic: &str, body: &[u8], now_ms: u64) -> Sequenced {
        debug_assert!(self.owns(topic), "sequenced off its owner");
        if self.history.is_some() {
            let (ring, epoch, last) = self.ensure_ring(topic, now_ms);
            let offset = last + 1;
            let t = self.entry(topic);
            t.published = offset;
            t.messages += 1;
            // Only a JSON object can carry stamps (`Server::broadcast_text` lets other text
            // through, as it is): it is numbered and kept all the same.
            let frame = if body.first() == Some(&b'{') {
                codec::encode_frame(OpCode::Text, &protocol::stamped(topic, epoch, offset, body))
            } else {
                codec::encode_frame(OpCode::Text, body)
            };
            let history = self.history.as_mut().expect("checked above");
            history.append(ring, offset, &frame, now_ms);
            Sequenced {
                frame,
                offset,
                epoch: Some(epoch),
            }
        } else {
            let t = self.entry(topic);
            t.published += 1;
            t.messages += 1;
            Sequenced {
                frame: codec::encode_frame(OpCode::Text, body),
                offset: t.published,
                epoch: None,
            }
        }
    }

    /// The topic's shared name and the other shards interested in it (`None`: no entry).
    pub fn interest(&self, topic: &str) -> Option<(&Arc<str>, ShardSet)> {
        self.topics.get(topic).map(|t| (&t.name, t.interested))
    }

    /// The owned topics' figures: how many have a subscriber or queue-group member on any shard
    /// (`held_locally`: whether this shard's own connections are on it), and the `top` with the
    /// most publications. One pass over the owned topics, keeping `top` of them.
    pub fn stats(&self, held_locally: impl Fn(&str) -> bool, top: usize) -> TopicStats {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut subscribed = 0;
        let mut most = BinaryHeap::with_capacity(top + 1);
        for (name, t) in &self.topics {
            if !t.interested.is_empty()
                || t.membership.as_ref().is_some_and(|m| !m.is_empty())
                || held_locally(name)
            {
                subscribed += 1;
            }
            if t.messages > 0 && top > 0 {
                // A min-heap of the largest: the smallest (then the last name) leaves first.
                most.push(Reverse((t.messages, Reverse(t.name.clone()))));
                if most.len() > top {
                    most.pop();
                }
            }
        }
        let mut publications: Vec<(Arc<str>, u64)> = most
            .into_iter()
            .map(|Reverse((n, Reverse(name)))| (name, n))
            .collect();
        publications.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        TopicStats {
            subscribed,
            publications,
        }
    }

    /// The topic's shared name, if it has an entry.
    pub fn name(&self, topic: &str) -> Option<&Arc<str>> {
        self.topics.get(topic).map(|t| &t.name)
    }

    /// Shard `shard` gained (`on`) or lost its plain subscribers of `topic`.
    pub fn set_interest(&mut self, topic: &str, shard: usize, on: bool) {
        debug_assert!(self.owns(topic), "interest sent to a non-owner");
        if on {
            self.entry(topic).interested.insert(shard);
        } else if let Some(t) = self.topics.get_mut(topic) {
            t.interested.remove(shard);
        }
    }

    /// Picks, per queue group of `topic`, the shard whose member gets the publication (weighted
    /// round-robin, see [`crate::queue_groups`]). `false` when the topic has no groups.
    pub fn pick_groups(&mut self, topic: &str, picks: &mut Vec<(usize, Arc<GroupName>)>) -> bool {
        let Some(membership) = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.membership.as_deref_mut())
        else {
            return false;
        };
        membership.pick(picks);
        true
    }

    /// Picks the shard whose member of queue group `group` of `topic` gets the next publication
    /// (`None`: the group has no member on this node).
    pub fn pick_group(&mut self, topic: &str, group: &str) -> Option<(usize, Arc<GroupName>)> {
        self.topics
            .get_mut(topic)?
            .membership
            .as_deref_mut()?
            .pick_one(group)
    }

    /// Members of queue group `group` of `topic` on every shard of this node.
    pub fn group_members(&self, topic: &str, group: &str) -> u64 {
        self.topics
            .get(topic)
            .and_then(|t| t.membership.as_deref())
            .map_or(0, |m| m.members(group))
    }

    /// Shard `shard` now has `members` members of queue group `group` of `topic`.
    ///
    /// # Errors
    /// [`GroupLimit`] when that would make one group more than the topic may have.
    pub fn join_group(
        &mut self,
        topic: &str,
        group: &Arc<str>,
        shard: usize,
        members: u32,
    ) -> Result<(), GroupLimit> {
        let t = self.entry(topic);
        let membership = t.membership.get_or_insert_with(Default::default);
        let joined = membership.join(&t.name, group, shard, members);
        if membership.is_empty() {
            t.membership = None;
        }
        joined
    }

    /// Shard `shard` has `members` members of queue group `group` of `topic` left.
    pub fn leave_group(&mut self, topic: &str, group: &str, shard: usize, members: u32) {
        if let Some(t) = self.topics.get_mut(topic)
            && let Some(membership) = t.membership.as_mut()
        {
            membership.leave(group, shard, members);
            if membership.is_empty() {
                t.membership = None;
            }
        }
    }

    /// The replay for a subscriber recovering `topic` from (`epoch`, `after`): where the
    /// history stands and the frames it missed. `None` when recovery is off.
    pub fn replay(
        &mut self,
        topic: &str,
        epoch: Option<u32>,
        after: u64,
        now_ms: u64,
    ) -> Option<(RecoveryInfo, Bytes)> {
        self.history.as_ref()?;
        let (ring, current, last) = self.ensure_ring(topic, now_ms);
        let history = self.history.as_ref().expect("checked above");
        let replay = history.replay(ring, epoch, after, last, now_ms);
        let info = RecoveryInfo {
            epoch: current,
            offset: last,
            recovered: replay.recovered,
            count: replay.count,
        };
        Some((info, replay.frames))
    }

    /// A read of `topic`'s history, of which only the newest `keep` publications count: at
    /// most `limit` publications after `after` (or after the oldest one held), the oldest of
    /// them (`reverse`: the newest). `None` when recovery is off.
    pub fn history(
        &mut self,
        topic: &str,
        after: Option<u64>,
        limit: usize,
        reverse: bool,
        keep: usize,
        now_ms: u64,
    ) -> Option<HistoryRead> {
        self.history.as_ref()?;
        let (ring, epoch, last) = self.ensure_ring(topic, now_ms);
        let history = self.history.as_ref().expect("checked above");
        let held = history
            .intact_after(ring, last, now_ms)
            .max(last.saturating_sub(keep as u64));
        // The asked position is still followed by everything after it (or is the top).
        let complete = after.is_none_or(|a| a >= held);
        let from = after.map_or(held, |a| a.max(held)).min(last);
        // One read is one replay, bounded like one (`recovery.max_messages`).
        let limit = (limit as u64).min(history.max_messages());
        let (lo, hi) = if reverse {
            (from.max(last.saturating_sub(limit)), last)
        } else {
            (from, last.min(from.saturating_add(limit)))
        };
        let frames = history.replay(ring, Some(epoch), lo, hi, now_ms).frames;
        Some(HistoryRead {
            epoch,
            offset: last,
            complete,
            frames,
        })
    }

    /// Forgets the publications `topic`'s history holds, keeping its position: the next
    /// publication gets the next offset in the same epoch, and a position before the removal is
    /// no longer recoverable (Centrifugo's `history_remove`). `false` when recovery is off.
    pub fn history_remove(&mut self, topic: &str) -> bool {
        let Some(history) = self.history.as_mut() else {
            return false;
        };
        if let Some(ring) = self.topics.get(topic).and_then(|t| t.ring) {
            history.clear(ring);
        }
        true
    }

    /// `user` (with `data`) joins `topic`'s presence, of at most `max` members.
    pub fn presence_join(&mut self, topic: &str, user: &str, data: Bytes, max: usize) -> Joined {
        let members = self
            .entry(topic)
            .presence
            .get_or_insert_with(Default::default);
        let first = members.is_empty();
        let joined = members.join(user, data, max);
        if matches!(joined, Joined::New) {
            self.presence.users += 1;
            self.presence.topics += usize::from(first);
        }
        joined
    }

    /// One of `user`'s connections left `topic`: the member's data when that was its last.
    pub fn presence_leave(&mut self, topic: &str, user: &str) -> Option<Bytes> {
        let members = self.topics.get_mut(topic)?.presence.as_mut()?;
        let data = members.leave(user)?;
        self.presence.users -= 1;
        self.presence.topics -= usize::from(members.is_empty());
        Some(data)
    }

    /// Presence members and topics with members, over the owned topics.
    pub fn presence_counts(&self) -> PresenceCounts {
        self.presence
    }

    /// The history's topics and bytes held (`None`: recovery off).
    pub fn history_footprint(&self) -> Option<(usize, usize)> {
        self.history
            .as_ref()
            .map(|h| (h.topic_count(), h.footprint()))
    }

    /// New data for member `user` of `topic`; `true` when it changed.
    pub fn presence_update(&mut self, topic: &str, user: &str, data: Bytes) -> bool {
        self.topics
            .get_mut(topic)
            .and_then(|t| t.presence.as_mut())
            .is_some_and(|m| m.update(user, data))
    }

    /// Connection `conn`, counted in `topic`'s presence by [`TopicOwner::presence_join`], shows
    /// in the member list as `client`.
    pub fn client_join(&mut self, topic: &str, conn: ConnId, client: ClientInfo) {
        self.entry(topic).clients.insert(conn, client);
    }

    /// Connection `conn` left `topic`'s member list: its entry, if it had one.
    pub fn client_leave(&mut self, topic: &str, conn: ConnId) -> Option<ClientInfo> {
        self.topics.get_mut(topic)?.clients.remove(&conn)
    }

    /// The connections of `topic`'s presence members, in no particular order.
    pub fn clients(&self, topic: &str) -> impl Iterator<Item = &ClientInfo> {
        self.topics
            .get(topic)
            .into_iter()
            .flat_map(|t| t.clients.values())
    }

    /// The topic's presence members.
    pub fn presence(&self, topic: &str) -> Option<&Members> {
        self.topics.get(topic).and_then(|t| t.presence.as_deref())
    }

    /// Forgets `topic` when nothing keeps it (see the module invariants); `held_locally`: this
    /// shard's own connections are on it.
    pub fn release(&mut self, topic: &str, held_locally: bool) {
        if !held_locally && !self.topics.get(topic).is_some_and(Owned::is_kept) {
            self.topics.remove(topic);
        }
    }

    /// The topic's entry, created if absent.
    fn entry(&mut self, topic: &str) -> &mut Owned {
        debug_assert!(self.owns(topic), "owner-only state off the owner");
        if !self.topics.contains_key(topic) {
            let name: Arc<str> = Arc::from(topic);
            self.topics.insert(
                name.clone(),
                Owned {
                    name,
                    interested: ShardSet::default(),
                    published: 0,
                    messages: 0,
                    ring: None,
                    epoch: 0,
                    presence: None,
                    clients: HashMap::new(),
                    membership: None,
                },
            );
        }
        self.topics.get_mut(topic).expect("inserted above")
    }

    /// The topic's history ring, opened (with a new epoch, offsets restarting at 1) if it has
    /// none. Returns the ring, its epoch and the last offset. Opening one may take the ring of
    /// the least recently used topic, whose entry then goes unless something else keeps it:
    /// without a ring its offsets restart with its next ring, so nothing else is lost.
    fn ensure_ring(&mut self, topic: &str, now_ms: u64) -> (RingId, u32, u64) {
        let t = self.entry(topic);
        if let Some(ring) = t.ring {
            return (ring, t.epoch, t.published);
        }
        let history = self.history.as_mut().expect("recovery is on");
        let t = self.topics.get_mut(topic).expect("created above");
        let (ring, epoch, evicted) = history.open(t.name.clone(), now_ms);
        t.ring = Some(ring);
        t.epoch = epoch;
        t.published = 0;
        if let Some(evicted) = evicted
            && let Some(old) = self.topics.get_mut(&evicted)
        {
            old.ring = None;
            if !old.is_kept() {
                self.topics.remove(&evicted);
            }
        }
        (ring, epoch, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recovery(enabled: bool) -> RecoveryConfig {
        RecoveryConfig {
            enabled,
            memory_budget: 1 << 20,
            max_topics: 16,
            ..RecoveryConfig::default()
        }
    }

    #[test]
    fn offsets_count_on_while_the_topic_is_held() {
        let mut o = TopicOwner::new(0, 1, &recovery(false));
        assert_eq!(o.sequence("x", b"{}", 0).offset, 1);
        o.release("x", true);
        assert_eq!(o.sequence("x", b"{}", 0).offset, 2);
        // Nobody listens: the count starts again.
        o.release("x", false);
        assert!(o.name("x").is_none());
        assert_eq!(o.sequence("x", b"{}", 0).offset, 1);
    }

    #[test]
    fn history_remove_keeps_the_position() {
        let mut o = TopicOwner::new(0, 1, &recovery(true));
        for _ in 0..3 {
            o.sequence("x", b"{}", 0);
        }
        let before = o.history("x", None, 10, false, 100, 0).unwrap();
        assert!(o.history_remove("x"));
        assert!(o.history_remove("never-published"));
        let after = o.history("x", None, 10, false, 100, 0).unwrap();
        assert_eq!((after.epoch, after.offset), (before.epoch, 3));
        assert!(after.frames.is_empty());
        assert!(!o.history("x", Some(1), 10, false, 100, 0).unwrap().complete);
        let next = o.sequence("x", b"{}", 0);
        assert_eq!((next.offset, next.epoch), (4, Some(before.epoch)));
        let read = o.history("x", Some(3), 10, false, 100, 0).unwrap();
        assert!(read.complete);
        assert_eq!(read.frames, next.frame);
        assert!(!TopicOwner::new(0, 1, &recovery(false)).history_remove("x"));
    }

    #[test]
    fn stats_count_subscribed_topics_and_list_the_busiest() {
        let mut o = TopicOwner::new(0, 1, &recovery(false));
        for (topic, n) in [("a", 2), ("b", 5), ("c", 2), ("d", 1)] {
            for _ in 0..n {
                o.sequence(topic, b"{}", 0);
            }
        }
        o.set_interest("a", 2, true);
        let local = |name: &str| name == "c";
        let s = o.stats(local, 3);
        assert_eq!(s.subscribed, 2, "a on shard 2, c here");
        let listed: Vec<(&str, u64)> = s.publications.iter().map(|(t, n)| (&**t, *n)).collect();
        assert_eq!(listed, [("b", 5), ("a", 2), ("c", 2)]);
        assert!(o.stats(local, 0).publications.is_empty());
    }

    #[test]
    fn interest_keeps_the_entry() {
        let mut o = TopicOwner::new(0, 1, &recovery(false));
        o.set_interest("x", 3, true);
        o.release("x", false);
        let (_, set) = o.interest("x").expect("kept by the interest");
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![3]);
        o.set_interest("x", 3, false);
        o.release("x", false);
        assert!(o.interest("x").is_none());
    }

    #[test]
    fn history_stamps_and_replays() {
        let mut o = TopicOwner::new(0, 1, &recovery(true));
        let first = o.sequence("x", b"{}", 0);
        assert_eq!((first.offset, first.epoch.is_some()), (1, true));
        o.sequence("x", b"{}", 0);
        o.release("x", false);
        let (info, _) = o.replay("x", first.epoch, 1, 0).expect("recovery is on");
        assert_eq!((info.offset, info.count, info.recovered), (2, 1, true));
        assert!(
            TopicOwner::new(0, 1, &recovery(false))
                .replay("x", None, 0, 0)
                .is_none()
        );
    }
}
