//! The application event stream's distribution: which consumer gets which event, each
//! consumer's bounded queue, and the task that pulls events from the engine.
//!
//! Owns: the consumer set (event-stream sockets, or the webhook), the events held while there is
//! none, and the delivery counters. Never: talks to a socket (see [`stream`], [`webhook`]) or to
//! a shard (the engine's [`Server::next_inbound`] does).
//!
//! Routing: an event goes to the consumer that wins a rendezvous hash of its routing key (the
//! connection id) and the consumer's id, so each connection's
//! events all go to one consumer, in order. When a consumer joins, only the connections it now
//! wins move to it, and their later events go there; events already queued elsewhere stay
//! there, so across that moment one connection's events may be split between two consumers. When
//! a consumer leaves, what was queued for it and not yet written goes, in order, to the
//! consumers that now win those connections (or is held until one connects); what was already
//! written to its socket is not sent again (there is no acknowledgement).
//!
//! Backpressure: each consumer queue is bounded by count and by bytes of JSON
//! (`events.consumer_queue_capacity` and `events.consumer_queue_bytes`, or the webhook's
//! `events.webhook_queue_capacity` and `events.webhook_queue_bytes`); past either the oldest
//! events are dropped and counted (`wse_inbound_dropped_total{reason="consumer_slow"}`). A
//! consumer's queue is freed when it leaves. With no consumer at all nothing is pulled, and each
//! shard keeps its newest `limits.app_event_queue_capacity` events (older ones counted as
//! `reason="queue_full"`), delivered when a consumer connects; what the hub had already pulled
//! is held under the consumer bounds (past them counted as `reason="no_consumer"`).
//!
//! Shutdown: the control plane stops after the shards, whose last events (the `disconnect`s of
//! the connections the drain closed) are then taken and distributed; only then is each
//! event-stream socket told to write what it holds and close with 1001 (going away).

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

/// Memory one queued event is charged beyond its JSON: the queue slot (key, `String` header).
const EVENT_OVERHEAD: usize = std::mem::size_of::<(u64, String)>();
/// A queue emptied by a take keeps at most this many slots of capacity; the rest is freed.
const IDLE_SLOTS_KEPT: usize = 256;

/// A FIFO of events bounded by count and by bytes. Overflow policy: the oldest events go first,
/// but the newest is always kept, so it holds at most `max_bytes` or one event, whichever is
/// larger. The caller counts what was dropped.
#[derive(Debug, Default)]
pub(crate) struct EventQueue {
    /// (routing key, event JSON), oldest first.
    events: VecDeque<(u64, String)>,
    /// Sum of `charge` over `events`.
    bytes: usize,
}

/// What an event costs its queue: the JSON's allocation and its slot.
fn charge(json: &str) -> usize {
    json.len() + EVENT_OVERHEAD
}

impl EventQueue {
    /// Appends an event, then drops the oldest while over `max_events` or `max_bytes`; returns
    /// how many were dropped.
    fn push(&mut self, key: u64, mut json: String, max_events: usize, max_bytes: usize) -> usize {
        // `to_json` grows its buffer by doubling; what is queued is what is charged.
        if json.capacity() - json.len() > 4096 {
            json.shrink_to_fit();
        }
        self.bytes += charge(&json);
        self.events.push_back((key, json));
        let mut dropped = 0;
        while self.events.len() > 1 && (self.events.len() > max_events || self.bytes > max_bytes) {
            let (_, old) = self.events.pop_front().expect("more than one event");
            self.bytes -= charge(&old);
            dropped += 1;
        }
        dropped
    }

    /// The oldest events, at most `max_events` and, past the first, at most `max_bytes` of JSON
    /// with a comma between each two and brackets around (one frame's worth).
    fn take(&mut self, max_events: usize, max_bytes: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut frame = 1; // '['
        while out.len() < max_events
            && let Some((_, json)) = self.events.front()
        {
            let next = frame + json.len() + 1; // ',' or ']'
            if !out.is_empty() && next > max_bytes {
                break;
            }
            frame = next;
            let (_, json) = self.events.pop_front().expect("front exists");
            self.bytes -= charge(&json);
            out.push(json);
        }
        if self.events.is_empty() {
            self.events.shrink_to(IDLE_SLOTS_KEPT);
        }
        out
    }

    /// Everything queued, oldest first; the queue's memory is freed.
    fn take_all(&mut self) -> VecDeque<(u64, String)> {
        self.bytes = 0;
        std::mem::take(&mut self.events)
    }

    fn len(&self) -> usize {
        self.events.len()
    }
}

/// One consumer: a socket of `GET /api/v1/events`, or the webhook sender.
#[derive(Debug)]
pub(crate) struct Consumer {
    pub id: u64,
    /// Events waiting for the consumer's socket (or the webhook); released when it leaves.
    queue: Mutex<EventQueue>,
    /// Events the queue holds at most; past it the oldest go.
    max_events: usize,
    /// Bytes the queue holds at most (one larger event excepted); past it the oldest go.
    max_bytes: usize,
    /// Signalled when events are queued (a permit is kept when nobody waits).
    pub ready: Notify,
}

impl Consumer {
    fn new(id: u64, max_events: usize, max_bytes: usize) -> Self {
        Self {
            id,
            queue: Mutex::new(EventQueue::default()),
            max_events,
            max_bytes,
            ready: Notify::new(),
        }
    }

    fn push(&self, key: u64, json: String, metrics: &EventMetrics) {
        let dropped = self.lock().push(key, json, self.max_events, self.max_bytes);
        add(&metrics.consumer_slow, dropped);
        self.ready.notify_one();
    }

    /// The oldest events: at most `max_events`, and past the first no more than make a JSON
    /// array of `max_bytes`.
    pub fn take(&self, max_events: usize, max_bytes: usize) -> Vec<String> {
        self.lock().take(max_events, max_bytes)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EventQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Who takes events, and what waits for them.
#[derive(Debug, Default)]
struct Targets {
    consumers: Vec<Arc<Consumer>>,
    /// Events that found no consumer (pulled just before the last one left, or left behind by
    /// it), for the next; bounded like one consumer's queue.
    held: EventQueue,
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
    /// Turns true once the last events are distributed: each socket writes what it holds and
    /// closes with 1001.
    closing: watch::Sender<bool>,
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
            closing: watch::Sender::new(false),
            metrics: Arc::default(),
        })
    }

    /// A new event-stream socket's consumer. In webhook mode it receives no events.
    pub fn register_socket(&self) -> Arc<Consumer> {
        self.metrics.consumers.fetch_add(1, Ordering::Relaxed);
        let cfg = self.server.config();
        let consumer = self.new_consumer(
            cfg.events.consumer_queue_capacity,
            cfg.events.consumer_queue_bytes,
        );
        if !self.webhook {
            self.add(consumer.clone());
        }
        consumer
    }

    /// The webhook's consumer (webhook mode only).
    pub fn register_webhook(&self) -> Arc<Consumer> {
        debug_assert!(self.webhook);
        let cfg = self.server.config();
        let consumer = self.new_consumer(
            cfg.events.webhook_queue_capacity,
            cfg.events.webhook_queue_bytes,
        );
        self.add(consumer.clone());
        consumer
    }

    /// A socket went away: its unwritten events go to whoever now wins their connections, and
    /// its queue's memory is released.
    pub fn unregister_socket(&self, consumer: &Consumer) {
        self.metrics.consumers.fetch_sub(1, Ordering::Relaxed);
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        t.consumers.retain(|c| c.id != consumer.id);
        if t.consumers.is_empty() {
            // An `rpc` would wait for an answer nobody will give: 108 at once, as before.
            self.server.set_rpc_handler(false);
        }
        let left = consumer.lock().take_all();
        for (key, json) in left {
            self.place(&mut t, key, json);
        }
        drop(t);
        self.changed.notify_waiters();
    }

    /// Resolves once the last events are distributed and the sockets should close.
    pub async fn closing(&self) {
        let mut closing = self.closing.subscribe();
        // An error means the hub is gone: closing too.
        let _ = closing.wait_for(|c| *c).await;
    }

    /// Resolves once no event-stream socket is left.
    pub async fn sockets_closed(&self) {
        loop {
            let changed = self.changed.notified();
            if self.metrics.consumers.load(Ordering::Relaxed) == 0 {
                return;
            }
            changed.await;
        }
    }

    fn new_consumer(&self, max_events: usize, max_bytes: usize) -> Arc<Consumer> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Arc::new(Consumer::new(id, max_events, max_bytes))
    }

    fn add(&self, consumer: Arc<Consumer>) {
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        t.consumers.push(consumer);
        // Someone now reads the `rpc` events and may answer them.
        self.server.set_rpc_handler(true);
        let held = t.held.take_all();
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

    /// Queues each event's JSON for its consumer. The JSON is made outside the lock, which the
    /// control thread takes when a consumer comes or goes; each event's payload is freed once
    /// its JSON exists.
    fn distribute(&self, batch: Vec<AppEvent>) {
        for ev in batch {
            let (key, json) = (ev.routing_key(), ev.to_json());
            drop(ev);
            let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
            self.place(&mut t, key, json);
        }
    }

    fn place(&self, t: &mut Targets, key: u64, json: String) {
        match pick(&t.consumers, key) {
            Some(c) => c.push(key, json, &self.metrics),
            None => {
                let cfg = self.server.config();
                let dropped = t.held.push(
                    key,
                    json,
                    cfg.events.consumer_queue_capacity,
                    cfg.events.consumer_queue_bytes,
                );
                add(&self.metrics.no_consumer, dropped);
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

/// Pulls events from the engine while some consumer takes them, until `stop`; then takes the
/// shards' last events (they have stopped by then), distributes them and tells the sockets to
/// close.
pub(crate) async fn dispatch(hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    pull(&hub, &mut stop).await;
    hub.distribute(hub.server.take_remaining_inbound());
    hub.closing.send_replace(true);
}

async fn pull(hub: &Hub, stop: &mut watch::Receiver<bool>) {
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
            .map(|&id| Arc::new(Consumer::new(id, 4, 1 << 20)))
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
        let c = Consumer::new(1, 2, 1 << 20);
        let m = EventMetrics::default();
        for i in 0..5 {
            c.push(0, format!("e{i}"), &m);
        }
        assert_eq!(c.take(10, 1 << 20), ["e3", "e4"]);
        assert_eq!(m.consumer_slow.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn the_byte_budget_drops_the_oldest_but_keeps_the_newest() {
        let event = |n: usize| "x".repeat(n);
        let budget = 3 * charge(&event(100));
        let c = Consumer::new(1, usize::MAX, budget);
        let m = EventMetrics::default();
        for _ in 0..10 {
            c.push(0, event(100), &m);
        }
        assert_eq!(c.len(), 3);
        assert_eq!(m.consumer_slow.load(Ordering::Relaxed), 7);
        assert!(c.lock().bytes <= budget);
        // One event over the budget stays, alone.
        c.push(0, event(budget * 2), &m);
        assert_eq!(c.len(), 1);
        assert_eq!(m.consumer_slow.load(Ordering::Relaxed), 10);
        assert_eq!(c.take(10, 1 << 20)[0].len(), budget * 2);
        assert_eq!(c.lock().bytes, 0);
    }

    #[test]
    fn a_take_fills_one_frame_and_a_larger_event_goes_alone() {
        let mut q = EventQueue::default();
        for n in [10, 10, 10, 50, 10] {
            q.push(0, "x".repeat(n), usize::MAX, usize::MAX);
        }
        // "[" + 10 + "," + 10 + "]" = 23 bytes; a third would make 34.
        assert_eq!(q.take(100, 33).len(), 2);
        // The 10 fits; the 50 would not.
        assert_eq!(q.take(100, 33).len(), 1);
        // The 50 is over the limit: it goes alone.
        assert_eq!(q.take(100, 33), ["x".repeat(50)]);
        assert_eq!(q.take(100, 33).len(), 1);
        assert!(q.take(100, 33).is_empty());
        assert_eq!(q.bytes, 0);
    }

    #[test]
    fn leaving_releases_the_queue_memory() {
        let mut q = EventQueue::default();
        for _ in 0..10_000 {
            q.push(0, "e".to_owned(), usize::MAX, usize::MAX);
        }
        assert_eq!(q.take_all().len(), 10_000);
        assert_eq!(q.events.capacity(), 0);
        assert_eq!(q.bytes, 0);
        for _ in 0..10_000 {
            q.push(0, "e".to_owned(), usize::MAX, usize::MAX);
        }
        while !q.take(100, 1 << 20).is_empty() {}
        assert!(q.events.capacity() <= IDLE_SLOTS_KEPT);
    }
}
