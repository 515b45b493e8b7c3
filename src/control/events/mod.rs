//! The application event stream's distribution: which consumer gets which event, each
//! consumer's bounded queue, and the task that pulls events from the engine.
//!
//! Owns: the consumer set (event-stream sockets, or the webhook), the events held while there is
//! none, and the delivery counters. Never: talks to a socket (see [`stream`], [`webhook`]) or to
//! a shard (the engine's [`Server::next_inbound`] does).
//!
//! Routing: an event goes to the consumer that wins a rendezvous hash of its routing key (the
//! connection id; the topic for `presence_leave`) and the consumer's id, so each connection's
//! events all go to one consumer, in order. When a consumer joins, only the connections it now
//! wins move to it, and their later events go there; events already queued elsewhere stay
//! there, so across that moment one connection's events may be split between two consumers. When
//! a consumer leaves, what was queued for it and not yet written goes, in order, to the
//! consumers that now win those connections (or is held until one connects); what was already
//! written to its socket is not sent again (there is no acknowledgement).
//!
//! Backpressure: each consumer queue is bounded (`events.consumer_queue_capacity`, or
//! `events.webhook_queue_capacity`); past it the oldest event is dropped and counted
//! (`wse_inbound_dropped_total{reason="consumer_slow"}`). With no consumer at all nothing is
//! pulled, and each shard keeps its newest `limits.app_event_queue_capacity` events (older ones
//! counted as `reason="queue_full"`), delivered when a consumer connects.

pub(super) mod stream;
pub(super) mod webhook;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};
use wse_shards::{AppEvent, Server};

/// Events pulled from the engine at once.
const DISPATCH_BATCH_MAX: usize = 4096;

/// Delivery counters, read by `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct EventMetrics {
    /// Events written to a consumer's socket or accepted by the webhook.
    pub delivered: AtomicU64,
    /// Events dropped from a full consumer queue (oldest first).
    pub consumer_slow: AtomicU64,
    /// Events dropped while no consumer was connected, beyond what is held for the next one.
    pub no_consumer: AtomicU64,
    /// Events in webhook batches given up after every retry.
    pub webhook_failed: AtomicU64,
    /// Gauge: event-stream consumers connected (sockets; the webhook is not counted).
    pub consumers: AtomicU64,
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// One consumer: a socket of `GET /api/v1/events`, or the webhook sender.
#[derive(Debug)]
pub(crate) struct Consumer {
    pub id: u64,
    /// (routing key, event JSON), oldest first.
    queue: Mutex<VecDeque<(u64, String)>>,
    /// Events the queue holds at most; past it the oldest goes.
    capacity: usize,
    /// Signalled when events are queued (a permit is kept when nobody waits).
    pub ready: Notify,
}

impl Consumer {
    fn new(id: u64, capacity: usize) -> Self {
        Self {
            id,
            queue: Mutex::new(VecDeque::new()),
            capacity,
            ready: Notify::new(),
        }
    }

    fn push(&self, key: u64, json: String, metrics: &EventMetrics) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= self.capacity {
                q.pop_front();
                add(&metrics.consumer_slow, 1);
            }
            q.push_back((key, json));
        }
        self.ready.notify_one();
    }

    /// The oldest `max` events.
    pub fn take(&self, max: usize) -> Vec<String> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let n = max.min(q.len());
        q.drain(..n).map(|(_, json)| json).collect()
    }

    pub fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Who takes events, and what waits for them.
#[derive(Debug, Default)]
struct Targets {
    consumers: Vec<Arc<Consumer>>,
    /// Events that found no consumer (pulled just before the last one left), for the next.
    held: VecDeque<(u64, String)>,
}

/// The distribution point between the engine and the consumers.
pub(crate) struct Hub {
    server: Arc<Server>,
    targets: Mutex<Targets>,
    /// Signalled when the consumer set changes.
    changed: Notify,
    next_id: AtomicU64,
    /// Events go to the webhook only; sockets may still send commands.
    webhook: bool,
    pub metrics: Arc<EventMetrics>,
}

impl Hub {
    pub fn new(server: Arc<Server>, webhook: bool) -> Arc<Self> {
        Arc::new(Self {
            server,
            targets: Mutex::new(Targets::default()),
            changed: Notify::new(),
            next_id: AtomicU64::new(1),
            webhook,
            metrics: Arc::default(),
        })
    }

    /// A new event-stream socket's consumer. In webhook mode it receives no events.
    pub fn register_socket(&self) -> Arc<Consumer> {
        self.metrics.consumers.fetch_add(1, Ordering::Relaxed);
        let capacity = self.server.config().events.consumer_queue_capacity;
        let consumer = self.new_consumer(capacity);
        if !self.webhook {
            self.add(consumer.clone());
        }
        consumer
    }

    /// The webhook's consumer (webhook mode only).
    pub fn register_webhook(&self) -> Arc<Consumer> {
        debug_assert!(self.webhook);
        let capacity = self.server.config().events.webhook_queue_capacity;
        let consumer = self.new_consumer(capacity);
        self.add(consumer.clone());
        consumer
    }

    /// A socket went away: its unwritten events go to whoever now wins their connections.
    pub fn unregister_socket(&self, consumer: &Consumer) {
        self.metrics.consumers.fetch_sub(1, Ordering::Relaxed);
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        t.consumers.retain(|c| c.id != consumer.id);
        let left: Vec<(u64, String)> = consumer
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for (key, json) in left {
            self.place(&mut t, key, json);
        }
        drop(t);
        self.changed.notify_waiters();
    }

    fn new_consumer(&self, capacity: usize) -> Arc<Consumer> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Arc::new(Consumer::new(id, capacity))
    }

    fn add(&self, consumer: Arc<Consumer>) {
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        t.consumers.push(consumer);
        let held: Vec<(u64, String)> = t.held.drain(..).collect();
        for (key, json) in held {
            self.place(&mut t, key, json);
        }
        drop(t);
        self.changed.notify_waiters();
    }

    fn has_consumers(&self) -> bool {
        !self
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .consumers
            .is_empty()
    }

    fn distribute(&self, batch: Vec<AppEvent>) {
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        for ev in batch {
            self.place(&mut t, ev.routing_key(), ev.to_json());
        }
    }

    fn place(&self, t: &mut Targets, key: u64, json: String) {
        match pick(&t.consumers, key) {
            Some(c) => c.push(key, json, &self.metrics),
            None => {
                // Bounded like one consumer's queue; the oldest goes first.
                let max = self.server.config().events.consumer_queue_capacity;
                if t.held.len() >= max {
                    t.held.pop_front();
                    add(&self.metrics.no_consumer, 1);
                }
                t.held.push_back((key, json));
            }
        }
    }
}

/// The consumer that wins `key`: highest hash of (key, consumer id) — rendezvous hashing, so a
/// consumer coming or going moves only the keys it wins or won.
fn pick(consumers: &[Arc<Consumer>], key: u64) -> Option<&Arc<Consumer>> {
    consumers.iter().max_by_key(|c| mix(key ^ mix(c.id)))
}

/// splitmix64's finaliser: a cheap, well-spread 64-bit mix.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Pulls events from the engine while some consumer takes them, until `stop`.
pub(crate) async fn dispatch(hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    loop {
        // Nothing is pulled without a consumer: the shards keep their (bounded) backlog.
        loop {
            let changed = hub.changed.notified();
            if hub.has_consumers() {
                break;
            }
            tokio::select! {
                _ = changed => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        let batch = tokio::select! {
            batch = hub.server.next_inbound(DISPATCH_BATCH_MAX) => batch,
            _ = stop.wait_for(|s| *s) => return,
        };
        hub.distribute(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumers(ids: &[u64]) -> Vec<Arc<Consumer>> {
        ids.iter()
            .map(|&id| Arc::new(Consumer::new(id, 4)))
            .collect()
    }

    #[test]
    fn rendezvous_moves_only_the_keys_of_the_consumer_that_changed() {
        let three = consumers(&[1, 2, 3]);
        let two = consumers(&[1, 2]);
        let mut moved = 0;
        let mut counts = [0usize; 4];
        for key in 0..3000u64 {
            let a = pick(&three, key).unwrap().id;
            let b = pick(&two, key).unwrap().id;
            counts[a as usize] += 1;
            if a != 3 {
                assert_eq!(a, b, "a key not on the removed consumer moved");
            } else {
                moved += 1;
            }
        }
        assert_eq!(moved, counts[3]);
        for c in &counts[1..] {
            assert!((700..1300).contains(c), "uneven spread {counts:?}");
        }
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts() {
        let c = Consumer::new(1, 2);
        let m = EventMetrics::default();
        for i in 0..5 {
            c.push(0, format!("e{i}"), &m);
        }
        assert_eq!(c.take(10), ["e3", "e4"]);
        assert_eq!(m.consumer_slow.load(Ordering::Relaxed), 3);
    }
}
