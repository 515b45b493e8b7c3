//! The shard's side of the cluster core (docs/CLUSTER.md, "Fabric wiring"), for the topics this
//! shard owns: advertising the node's interest in a topic when it starts (the first plain
//! subscriber on any shard of this node) and withdrawing it when it ends, holding the joins that
//! wait for the other nodes' confirmation, and handing the core each publication made on this
//! node, once.
//!
//! Owns: which owned topics' interest is advertised, and the joins parked until it is
//! confirmed. Never: touches a cluster socket (the core does, on its own thread), nor forwards a
//! publication that came from another node (full mesh: its origin sends it to every interested
//! peer).
//!
//! Invariant: with the cluster on, an owned topic has an advert iff some shard of this node
//! (the owner included, see [`crate::topics`]) is interested in it, and one per queue group of
//! it with a member on this node; joins are parked only while their advert's `on` is
//! unconfirmed, and all of them are answered when it is confirmed or withdrawn.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::{Shard, Transport, send};
use crate::centrifuge::proto::ClientInfo;
use crate::codec::{self, OpCode};
use crate::fabric::{FabricMsg, JoinReply, Sent};
use crate::fabric_plan::cluster_participant;
use crate::metrics::DropReason;
use crate::protocol::Clock;

/// Where a publication the owner sequences was made, which says where it goes besides this
/// node's subscribers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    /// On this node (a client, the HTTP API, the engine): also to the other nodes, in a cluster.
    Here,
    /// On this node, for this node only (`broadcast_local`).
    HereOnly,
    /// On another node (from the cluster core): to this node's plain subscribers only, never
    /// back to the cluster, and not to this node's queue groups (see `sequence`).
    Peer,
}

/// A join whose answer waits for the node's interest in its topic to be confirmed: it is
/// answered (and its replay read) then, so that the replay ends where live publications to a
/// now-live subscriber begin.
pub(super) struct Parked {
    /// The answer, without its replay yet.
    pub reply: JoinReply,
    /// The shard that asked.
    pub shard: usize,
    /// The replay asked for: the client's epoch and last offset.
    pub recover: Option<(Option<u32>, u64)>,
    /// A presence event the join caused, fanned out after the answer.
    pub event: Option<Bytes>,
    /// The Centrifuge join the join caused, fanned out after the presence event.
    pub join_leave: Option<ClientInfo>,
}

/// An owned topic's interest as advertised to the other nodes.
enum Advert {
    /// `on` sent with this ticket, not confirmed yet; the joins waiting for it.
    Pending { ticket: u64, parked: Vec<Parked> },
    /// Confirmed (or the bounded wait ran out).
    On,
}

/// See the module docs.
pub(super) struct ClusterSide {
    /// A cluster core routes publications and interest (`cluster.enabled`; fixed at start).
    enabled: bool,
    /// The core's index in the fabric.
    core: usize,
    adverts: HashMap<Arc<str>, Advert>,
    next_ticket: u64,
}

impl ClusterSide {
    /// The cluster side of a shard of a server with `shards` shards.
    pub fn new(enabled: bool, shards: usize) -> Self {
        Self {
            enabled,
            core: cluster_participant(shards),
            adverts: HashMap::new(),
            next_ticket: 0,
        }
    }

    /// Where a publication that reached the owner from participant `from` was made:
    /// `Publish` entries come from this node's shards and control plane; `PublishLocal` ones
    /// from the cluster core (a peer's) or the control plane (`broadcast_local`).
    pub fn origin(&self, from: usize, local_only: bool) -> Origin {
        match (local_only, from == self.core) {
            (true, true) => Origin::Peer,
            (true, false) => Origin::HereOnly,
            (false, _) => Origin::Here,
        }
    }
}

/// The key of an advert: the topic for plain subscribers, `topic NUL group` for a queue group
/// (neither may contain a control character, so the two never collide).
fn advert_key(topic: &Arc<str>, group: Option<&str>) -> Arc<str> {
    match group {
        None => topic.clone(),
        Some(g) => Arc::from(format!("{topic}\0{g}")),
    }
}

impl<T: Transport> Shard<T> {
    /// The node may have gained its interest in `topic` (owned here), or in its queue group
    /// `group`: advertise it, once.
    pub(super) fn advertise(&mut self, topic: &Arc<str>, group: Option<&Arc<str>>) {
        if !self.cluster.enabled {
            return;
        }
        let key = advert_key(topic, group.map(|g| &**g));
        if self.cluster.adverts.contains_key(&key) {
            return;
        }
        let c = &mut self.cluster;
        let ticket = c.next_ticket;
        c.next_ticket += 1;
        let m = FabricMsg::ClusterInterest {
            topic: topic.clone(),
            group: group.cloned(),
            ticket,
            on: true,
        };
        let advert = if self.fabric.send(c.core, m) == Sent::Dropped {
            // Nothing will confirm it: subscribers are not kept waiting for ever; peers may not
            // send this node the topic until it is advertised again (counted).
            self.metrics.dropped(DropReason::FabricOverflow).inc();
            Advert::On
        } else {
            Advert::Pending {
                ticket,
                parked: Vec::new(),
            }
        };
        self.cluster.adverts.insert(key, advert);
    }

    /// The node may have lost its last interested shard in `topic` (owned here): withdraw the
    /// advert, answering any join still parked on it.
    pub(super) fn withdraw_if_idle(&mut self, topic: &str, clock: Clock) {
        if !self.cluster.enabled
            || self
                .owner
                .interest(topic)
                .is_some_and(|(_, s)| !s.is_empty())
        {
            return;
        }
        self.withdraw(topic, None, clock);
    }

    /// The node may have lost its last member of queue group `group` of `topic`: withdraw that
    /// advert, answering any join still parked on it.
    pub(super) fn withdraw_group_if_idle(&mut self, topic: &str, group: &str, clock: Clock) {
        if !self.cluster.enabled || self.owner.group_members(topic, group) > 0 {
            return;
        }
        self.withdraw(topic, Some(group), clock);
    }

    fn withdraw(&mut self, topic: &str, group: Option<&str>, clock: Clock) {
        let key = advert_key(&Arc::from(topic), group);
        let Some(advert) = self.cluster.adverts.remove(&key) else {
            return;
        };
        let m = FabricMsg::ClusterInterest {
            topic: Arc::from(topic),
            group: group.map(Arc::from),
            ticket: 0,
            on: false,
        };
        send(&mut self.fabric, &self.metrics, self.cluster.core, m);
        if let Advert::Pending { parked, .. } = advert {
            for p in parked {
                self.finish_join(p, clock);
            }
        }
    }

    /// Holds `p` while the advert it needs (its topic's, or its queue group's) is unconfirmed;
    /// else hands it back to be answered now.
    pub(super) fn park(&mut self, p: Parked) -> Option<Parked> {
        if !self.cluster.enabled {
            return Some(p);
        }
        let key = advert_key(&p.reply.topic, p.reply.queue_group.as_deref());
        match self.cluster.adverts.get_mut(&key) {
            Some(Advert::Pending { parked, .. }) => {
                parked.push(p);
                None
            }
            _ => Some(p),
        }
    }

    /// The cluster core confirmed the `on` with `ticket` for `topic` (or its queue group
    /// `group`): answer the joins parked on it. A stale ticket (withdrawn and advertised again
    /// since) is ignored: the newer `on` is answered on its own.
    pub(super) fn handle_cluster_acked(
        &mut self,
        topic: &Arc<str>,
        group: Option<&str>,
        ticket: u64,
        clock: Clock,
    ) {
        let key = advert_key(topic, group);
        let Some(advert) = self.cluster.adverts.get_mut(&key) else {
            return;
        };
        let parked = match advert {
            Advert::Pending { ticket: t, parked } if *t == ticket => std::mem::take(parked),
            _ => return,
        };
        *advert = Advert::On;
        for p in parked {
            self.finish_join(p, clock);
        }
    }

    /// A peer's publication for one member of this node's queue group `group` of `topic`: the
    /// owner picks the shard (weighted like its own publications), which picks the member.
    pub(super) fn publish_group(&mut self, topic: &str, group: &str, body: &[u8]) {
        let Some((shard, name)) = self.owner.pick_group(topic, group) else {
            // Its last member left since the peer picked this node.
            self.metrics.dropped(DropReason::QueueGroupNoMember).inc();
            return;
        };
        let frame = codec::encode_frame(OpCode::Text, body);
        if shard == self.me {
            self.deliver_group(&name.topic, &name.group, frame);
        } else {
            let m = FabricMsg::DeliverGroup { group: name, frame };
            send(&mut self.fabric, &self.metrics, shard, m);
        }
    }

    /// A publication this node made, sequenced here: one entry to the cluster core, which sends
    /// it to every interested peer.
    pub(super) fn forward_to_cluster(&mut self, topic: &str, body: &Bytes) {
        if !self.cluster.enabled {
            return;
        }
        let topic = self
            .owner
            .name(topic)
            .map_or_else(|| Arc::from(topic), Arc::clone);
        let m = FabricMsg::ClusterPublish {
            topic,
            body: body.clone(),
        };
        send(&mut self.fabric, &self.metrics, self.cluster.core, m);
    }
}
