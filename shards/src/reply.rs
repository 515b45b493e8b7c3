//! One-shot answers across threads: a shard fills a [`ReplySlot`] (or sends through a
//! [`Responder`]) and whoever asked awaits the [`ReplyFuture`], on any runtime.
//!
//! Owns: the slot and its waker. Never: knows what the answer means (commands, queries and
//! subscribe outcomes travel through it alike) or how the question travelled (the fabric).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// A one-shot answer: filled once by a shard, awaited by whoever asked (any runtime).
#[derive(Debug)]
pub struct ReplySlot<T> {
    state: Mutex<(Option<T>, Option<Waker>)>,
}

impl<T> ReplySlot<T> {
    /// An empty slot, shared by the asker and the shard that answers.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new((None, None)),
        })
    }

    /// Fills the slot and wakes the asker.
    pub fn complete(&self, value: T) {
        let waker = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0 = Some(value);
            s.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The answer, once it is there.
    pub fn wait(self: Arc<Self>) -> ReplyFuture<T> {
        ReplyFuture(self)
    }
}

/// The answering end of a one-shot reply, carried inside a command. Sending consumes it;
/// dropping it unsent (a shard that stops with the command still queued, a command it could not
/// handle) answers `None`, so an asker never waits for a reply that cannot come.
#[derive(Debug)]
pub struct Responder<T> {
    slot: Option<Arc<ReplySlot<Option<T>>>>,
}

impl<T> Responder<T> {
    /// A responder and the future its answer resolves (`None`: dropped unanswered).
    pub fn pair() -> (Responder<T>, ReplyFuture<Option<T>>) {
        let slot = ReplySlot::new();
        let fut = slot.clone().wait();
        (Responder { slot: Some(slot) }, fut)
    }

    /// Answers and wakes the asker.
    pub fn send(mut self, value: T) {
        if let Some(slot) = self.slot.take() {
            slot.complete(Some(value));
        }
    }
}

impl<T> Drop for Responder<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.complete(None);
        }
    }
}

/// Resolves when the shard answered.
#[derive(Debug)]
pub struct ReplyFuture<T>(Arc<ReplySlot<T>>);

impl<T> Future for ReplyFuture<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
