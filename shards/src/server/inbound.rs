//! Collecting application events from the shards for the one consumer of the engine's event
//! stream (an embedder calling [`Server::drain_inbound`], or the binary's dispatcher awaiting
//! [`Server::next_inbound`]).
//!
//! Owns: one `TakeEvents` request in flight per shard, and the events answered but not yet
//! handed out. Never: queues events beyond that — the shards hold them, bounded.
//!
//! Why the consumer pulls rather than the shards pushing: a shard's bounded queue (drop oldest,
//! counted) is then the only buffer, and it fills exactly when the consumer falls behind; a
//! push would need a second bounded buffer on the control side and credit to stop shards from
//! overrunning it. The request waits in the shard while it has nothing, and the shard answers at
//! the end of the turn that queued something, so a busy shard hands out a whole turn's events
//! in one fabric entry and an idle one costs nothing. Events of one shard arrive in order (the
//! next request goes out once the previous answer is in); shards are interleaved.
//!
//! One consumer at a time: each answer wakes the last task that polled.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use super::Server;
use crate::command::Command;
use crate::fabric::{FabricMsg, Sent};
use crate::inbound::AppEvent;
use crate::reply::{ReplyFuture, Responder};

/// Events one shard hands out per request.
pub const INBOUND_BATCH_MAX: usize = 1024;

type Answer = ReplyFuture<Option<Vec<AppEvent>>>;

pub(super) struct Inbound {
    /// Per shard: the request in flight.
    waiting: Vec<Option<Answer>>,
    /// Per shard: stopped (its last request was dropped unanswered); not asked again.
    gone: Vec<bool>,
    /// Answered, not yet handed out. No new request goes out while this holds
    /// [`INBOUND_BATCH_MAX`] events or `limits.app_event_queue_bytes` bytes, so it holds at most
    /// that plus one answer per shard.
    ready: VecDeque<AppEvent>,
    /// [`AppEvent::size`] summed over `ready`.
    ready_bytes: usize,
}

impl Inbound {
    pub(super) fn new(shards: usize) -> Self {
        Self {
            waiting: (0..shards).map(|_| None).collect(),
            gone: vec![false; shards],
            ready: VecDeque::new(),
            ready_bytes: 0,
        }
    }
}

impl Server {
    /// Up to `max` application events (see [`crate::inbound`]), waiting at most `timeout` for
    /// the first; an empty list when none came. Blocks the calling thread — upstream's
    /// `drain_inbound(max_count, timeout_ms)`.
    ///
    /// ```no_run
    /// # fn demo(server: &wse_shards::Server) {
    /// use std::time::Duration;
    /// use wse_shards::inbound::AppEventKind;
    /// loop {
    ///     for ev in server.drain_inbound(256, Duration::from_millis(50)) {
    ///         if ev.kind == AppEventKind::Msg {
    ///             println!("{} sent {}", ev.user, String::from_utf8_lossy(&ev.payload));
    ///         }
    ///     }
    /// }
    /// # }
    /// ```
    ///
    /// While nobody collects, each shard keeps its newest `limits.app_event_queue_capacity`
    /// events and drops older ones (counted in `wse_dropped_total{reason="app_event_overflow"}`).
    pub fn drain_inbound(&self, max: usize, timeout: Duration) -> Vec<AppEvent> {
        super::block_on_timeout(self.next_inbound(max), timeout).unwrap_or_default()
    }

    /// Up to `max` application events, once there is at least one: the async form of
    /// [`Server::drain_inbound`], for a consumer on an async runtime. Never resolves once every
    /// shard has stopped.
    pub fn next_inbound(&self, max: usize) -> impl Future<Output = Vec<AppEvent>> + '_ {
        std::future::poll_fn(move |cx| self.poll_inbound(cx, max.max(1)))
    }

    /// Every event the shards handed out and [`Server::next_inbound`] has not returned yet,
    /// without waiting: for a consumer's last take once the shards have stopped (after
    /// [`Server::stop`]), when each shard has answered its last request with all it had left.
    /// A request still unanswered is abandoned.
    pub fn take_remaining_inbound(&self) -> Vec<AppEvent> {
        let mut inbound = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        let inbound = &mut *inbound;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for slot in &mut inbound.waiting {
            if let Some(answer) = slot.take()
                && let Poll::Ready(Some(batch)) = Pin::new(&mut { answer }).poll(&mut cx)
            {
                inbound.ready.extend(batch);
            }
        }
        inbound.ready_bytes = 0;
        inbound.ready.drain(..).collect()
    }

    fn poll_inbound(&self, cx: &mut Context<'_>, max: usize) -> Poll<Vec<AppEvent>> {
        let mut inbound = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        let inbound = &mut *inbound;
        loop {
            self.request_events(inbound);
            let mut answered = false;
            for (shard, slot) in inbound.waiting.iter_mut().enumerate() {
                let Some(answer) = slot else { continue };
                match Pin::new(answer).poll(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Some(batch)) => {
                        inbound.ready_bytes += batch.iter().map(AppEvent::size).sum::<usize>();
                        inbound.ready.extend(batch);
                        *slot = None;
                        answered = true;
                    }
                    Poll::Ready(None) => {
                        inbound.gone[shard] = true;
                        *slot = None;
                    }
                }
            }
            // Ask again at once where answers came in, so the next batch is on its way (and
            // this poll's waker is registered with every request in flight).
            if !answered || self.ready_full(inbound) {
                break;
            }
        }
        if inbound.ready.is_empty() {
            return Poll::Pending;
        }
        let n = max.min(inbound.ready.len());
        let batch: Vec<AppEvent> = inbound.ready.drain(..n).collect();
        inbound.ready_bytes -= batch.iter().map(AppEvent::size).sum::<usize>();
        Poll::Ready(batch)
    }

    /// Sends a `TakeEvents` to every running shard without one in flight, unless enough events
    /// are waiting to be handed out already.
    fn request_events(&self, inbound: &mut Inbound) {
        if self.ready_full(inbound) {
            return;
        }
        let mut ep = self.control.lock().unwrap_or_else(|e| e.into_inner());
        for shard in 0..self.shared.shards {
            if inbound.waiting[shard].is_some() || inbound.gone[shard] {
                continue;
            }
            let (reply, answer) = Responder::pair();
            let cmd = Command::TakeEvents {
                max: INBOUND_BATCH_MAX,
                reply,
            };
            if ep.send(shard, FabricMsg::Command(Box::new(cmd))) == Sent::Queued {
                inbound.waiting[shard] = Some(answer);
            }
        }
        self.flusher.flush(&mut ep);
    }

    /// Whether enough is waiting to be handed out that no shard is asked for more: the engine
    /// buffers no more than one shard's queue holds, whatever the consumer's pace.
    fn ready_full(&self, inbound: &Inbound) -> bool {
        inbound.ready.len() >= INBOUND_BATCH_MAX
            || inbound.ready_bytes >= self.config().limits.app_event_queue_bytes
    }
}
