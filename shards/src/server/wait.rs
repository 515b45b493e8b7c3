//! Driving the engine's futures without an async runtime: the answers to commands are
//! runtime-agnostic futures, and an embedder on a plain thread blocks on them here.
//!
//! Owns: a minimal executor for one future on the calling thread (woken by unparking it).
//! Never: spawns, or runs anything but the future it is given.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `fut` to completion on this thread, parking while it waits.
///
/// ```no_run
/// # fn demo(server: &wse_shards::Server) {
/// let connections = wse_shards::block_on(server.get_connections()).unwrap();
/// # }
/// ```
pub fn block_on<F: Future>(fut: F) -> F::Output {
    run(fut, None).expect("no deadline")
}

/// Runs `fut` on this thread for at most `timeout`; `None` when it was not done by then (the
/// future is dropped).
pub fn block_on_timeout<F: Future>(fut: F, timeout: Duration) -> Option<F::Output> {
    run(fut, Some(Instant::now() + timeout))
}

fn run<F: Future>(fut: F, deadline: Option<Instant>) -> Option<F::Output> {
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        // A wake before the park makes the park return at once; a spurious return just polls
        // again.
        match deadline {
            None => thread::park(),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                thread::park_timeout(left);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Responder;

    #[test]
    fn wakes_on_an_answer_from_another_thread_and_times_out() {
        let (reply, answer) = Responder::pair();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            reply.send(7);
        });
        assert_eq!(block_on(answer), Some(7));
        t.join().unwrap();
        let (reply, answer) = Responder::<u8>::pair();
        assert_eq!(block_on_timeout(answer, Duration::from_millis(20)), None);
        drop(reply);
    }
}
