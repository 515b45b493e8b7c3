//! Routing publications to their topic's owner, and queueing frames to local subscribers and
//! to one local member of a queue group.

use std::sync::Arc;

use bytes::Bytes;

use super::cluster::Origin;
use super::{Shard, Transport};
use crate::centrifuge::proto::ClientInfo;
use crate::conn::ConnId;
use crate::dialect::Delivery;
use crate::fabric::{FabricMsg, Sent};
use crate::metrics::DropReason;
use crate::protocol::Clock;

impl<T: Transport> Shard<T> {
    /// Sends a publication to its topic's owner (or sequences it here when this shard owns it).
    /// `false` when the fabric dropped it (counted): it never happens, and no acknowledgement
    /// will come.
    pub fn route_publication(
        &mut self,
        topic: &str,
        body: Bytes,
        ack: Option<ConnId>,
        clock: Clock,
    ) -> bool {
        let owner = self.topics.owner_of(topic);
        if owner == self.me {
            self.sequence(topic, &body, ack, Origin::Here, clock);
            return true;
        }
        let m = FabricMsg::Publish {
            topic: Arc::from(topic),
            body,
            ack,
        };
        if self.fabric.send(owner, m) == Sent::Dropped {
            self.metrics.dropped(DropReason::FabricOverflow).inc();
            return false;
        }
        true
    }

    /// Queues a Centrifuge join (`joined`) or leave push of `client` to the local subscribers of
    /// `topic` that asked for them (each format encoded once); overflowing ones are listed for
    /// eviction, as for publications.
    pub(super) fn deliver_join_leave(&mut self, topic: &str, joined: bool, client: &ClientInfo) {
        let Some(t) = self.topics.get(topic) else {
            return;
        };
        let max = self.run.cfg().limits.max_outbound_queue_bytes;
        let mut delivery = Delivery::join_leave(topic, joined, client);
        for &key in t.subscribers() {
            let Some(slot) = self.conns.get_mut(key as usize) else {
                debug_assert!(false, "subscriber {key} has no slot");
                continue;
            };
            if !slot.offer(key, &mut delivery, max, &self.metrics, &mut self.turn) {
                self.turn.evict(key);
            }
        }
    }

    /// Queues `frame` to every live local subscriber of `topic`; overflowing ones are listed for
    /// eviction (done after the loop, since evicting changes the topic table).
    pub(super) fn deliver_local(&mut self, topic: &str, frame: &Bytes) {
        let Some(t) = self.topics.get(topic) else {
            return;
        };
        if !t.is_live() {
            // Sequenced before this shard's subscription took effect.
            return;
        }
        let max = self.run.cfg().limits.max_outbound_queue_bytes;
        // Each dialect's frame is made once, for the first subscriber that speaks it.
        let mut delivery = Delivery::new(Some(topic), frame);
        let mut delivered = 0;
        for &key in t.subscribers() {
            let Some(slot) = self.conns.get_mut(key as usize) else {
                debug_assert!(false, "subscriber {key} has no slot");
                continue;
            };
            if slot.conn.is_recovering(topic) {
                // Part of the replay on its way (or older than the position it recovers to).
                continue;
            }
            if slot.offer(key, &mut delivery, max, &self.metrics, &mut self.turn) {
                delivered += 1;
            } else {
                self.turn.evict(key);
            }
        }
        self.metrics.deliveries_total.add(delivered);
        self.metrics.messages_out_total.add(delivered);
    }

    /// Queues `frame` to ONE local member of queue group `group` of `topic`, round-robin. A
    /// member over its outbound cap is evicted (as any slow consumer) and the next member tried;
    /// with no member left (they left or were evicted since the owner picked this shard) the
    /// publication is dropped for the group and counted (`queue_group_no_member`).
    pub(super) fn deliver_group(&mut self, topic: &str, group: &str, frame: Bytes) {
        let max = self.run.cfg().limits.max_outbound_queue_bytes;
        let mut delivery = Delivery::new(Some(topic), &frame);
        let Some(t) = self.topics.get_mut(topic) else {
            self.metrics.dropped(DropReason::QueueGroupNoMember).inc();
            return;
        };
        // Each member at most once: a full round of refusals means nobody here can take it.
        for _ in 0..t.group_members(group) {
            let Some(key) = t.pick_member(group) else {
                break;
            };
            let Some(slot) = self.conns.get_mut(key as usize) else {
                debug_assert!(false, "group member {key} has no slot");
                continue;
            };
            if slot.offer(key, &mut delivery, max, &self.metrics, &mut self.turn) {
                self.metrics.deliveries_total.inc();
                self.metrics.messages_out_total.inc();
                return;
            }
            self.turn.evict(key);
        }
        self.metrics.dropped(DropReason::QueueGroupNoMember).inc();
    }

    pub(super) fn evict_pending(&mut self, clock: Clock) {
        while let Some(key) = self.turn.next_eviction() {
            self.with_conn(key, clock, |c, cx| c.evict(cx));
        }
    }

    pub(super) fn send_publish_ack(
        &mut self,
        conn: ConnId,
        topic: &str,
        epoch: Option<u32>,
        offset: u64,
        clock: Clock,
    ) {
        if self
            .conns
            .get(conn.key() as usize)
            .is_some_and(|s| s.conn.id() == conn)
        {
            self.with_conn(conn.key(), clock, |c, cx| {
                c.publish_acked(topic, epoch, offset, cx);
            });
        } else {
            self.metrics.dropped(DropReason::ConnectionGone).inc();
        }
    }
}
