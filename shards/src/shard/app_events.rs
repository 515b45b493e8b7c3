//! The shard's queue of application events for the event stream (`Server::next_inbound`), and
//! the one event request that may wait on it; and [`AppSide`], which groups it with the other
//! parts of what a shard keeps for the application.
//!
//! Owns: the queue, its byte count and the waiting request. Never: decides what an event is
//! (the shard's connection events and presence reports do), or how the stream distributes it.
//!
//! Bounds: `limits.app_event_queue_capacity` events and `limits.app_event_queue_bytes` bytes;
//! past either the oldest is dropped and counted (`app_event_overflow`).

use std::collections::VecDeque;

use super::dedup::RecentIds;
use super::presence_events::AwaitedLeaves;
use super::users::Users;
use crate::config::LimitsConfig;
use crate::inbound::AppEvent;
use crate::metrics::{DropReason, ShardMetrics};
use crate::reply::Responder;

/// What a shard keeps for the application, each part owned by its own module.
#[derive(Default)]
pub(super) struct AppSide {
    /// Application events for the event stream, and the request waiting for them.
    pub events: AppEvents,
    /// Presence departures awaited from topic owners, and the `disconnect`s waiting for them
    /// (`presence_events`).
    pub leaves: AwaitedLeaves,
    /// Live connections by user, for `send_user` (`users`).
    pub users: Users,
    /// Event ids recently sent per connection, for `send_event` deduplication (`dedup`).
    pub recent_ids: RecentIds,
}

/// Application events waiting for the event stream, oldest first.
#[derive(Default)]
pub(super) struct AppEvents {
    queue: VecDeque<AppEvent>,
    /// The sum of the queued events' sizes.
    bytes: usize,
    /// A `TakeEvents` waiting for events: (max, responder). At most one (one consumer).
    waiter: Option<(usize, Responder<Vec<AppEvent>>)>,
}

impl AppEvents {
    /// The events queued, oldest first.
    pub fn queued(&self) -> &VecDeque<AppEvent> {
        &self.queue
    }

    /// Queues `ev`; past the queue's bounds the oldest goes (counted).
    pub fn push(&mut self, ev: AppEvent, limits: &LimitsConfig, metrics: &ShardMetrics) {
        metrics.app_events_total.inc();
        self.bytes += ev.size();
        self.queue.push_back(ev);
        while self.queue.len() > limits.app_event_queue_capacity
            || self.bytes > limits.app_event_queue_bytes
        {
            let Some(old) = self.queue.pop_front() else {
                break;
            };
            self.bytes -= old.size();
            metrics.dropped(DropReason::AppEventOverflow).inc();
        }
    }

    /// The oldest `max` queued events.
    pub fn take(&mut self, max: usize) -> Vec<AppEvent> {
        let n = max.min(self.queue.len());
        let batch: Vec<AppEvent> = self.queue.drain(..n).collect();
        self.bytes -= batch.iter().map(AppEvent::size).sum::<usize>();
        batch
    }

    /// A request for at most `max` events: answered now when some are queued, else it waits
    /// (an earlier waiting request is answered empty: its asker has given up on it).
    pub fn request(&mut self, max: usize, reply: Responder<Vec<AppEvent>>) {
        if self.queue.is_empty() {
            if let Some((_, earlier)) = self.waiter.replace((max, reply)) {
                earlier.send(Vec::new());
            }
        } else {
            reply.send(self.take(max));
        }
    }

    /// Answers the waiting request when events are queued; once per turn, so a busy shard
    /// hands out a turn's events in one batch.
    pub fn answer_waiter(&mut self) {
        if !self.queue.is_empty()
            && let Some((max, reply)) = self.waiter.take()
        {
            reply.send(self.take(max));
        }
    }

    /// The waiting request's responder, taken (the shard is stopping).
    pub fn take_waiter(&mut self) -> Option<Responder<Vec<AppEvent>>> {
        self.waiter.take().map(|(_, reply)| reply)
    }
}
