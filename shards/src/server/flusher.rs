//! Keeps the control plane's held-back fabric entries moving between API calls.
//!
//! Owns: one thread, parked while the control plane holds nothing back. Never: sends anything
//! itself.
//!
//! The control plane's endpoint is flushed right after each send, which rings the destination's
//! doorbell; but an entry held back because the destination's queue was full moves on only at a
//! flush, and without this thread the next flush was the next API call: a publication accepted
//! over HTTP while a shard was busy waited for whichever request came next. Whoever flushes and
//! leaves something held wakes the thread, which flushes every [`RETRY`] until nothing is.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::fabric::Endpoint;

/// Between two flushes while something is held back: a shard takes up to 4096 entries per
/// sender per loop turn, so a full queue has room again within a turn or two.
const RETRY: Duration = Duration::from_millis(1);

pub(super) struct Flusher {
    /// Unparked to flush.
    waker: std::thread::Thread,
    /// Joined by [`Flusher::stop`] (or on drop); the lock is never held while joining.
    thread: Mutex<Option<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
}

impl Flusher {
    /// Starts the thread for `control`.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub(super) fn start(control: Arc<Mutex<Endpoint>>) -> io::Result<Flusher> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wse-fabric-flush".to_owned())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    std::thread::park();
                    while !stopped.load(Ordering::Acquire) {
                        let held = control.lock().unwrap_or_else(|e| e.into_inner()).flush();
                        if held == 0 {
                            break;
                        }
                        std::thread::sleep(RETRY);
                    }
                }
            })?;
        Ok(Flusher {
            waker: thread.thread().clone(),
            thread: Mutex::new(Some(thread)),
            stop,
        })
    }

    /// Flushes `ep` (the control plane's endpoint, locked by the caller) and, if anything is
    /// still held back, has the thread keep flushing. Returns the entries held back.
    pub(super) fn flush(&self, ep: &mut Endpoint) -> usize {
        let held = ep.flush();
        if held > 0 {
            self.waker.unpark();
        }
        held
    }

    /// Stops and joins the thread. Entries still held back stay where they are.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.waker.unpark();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;
    use crate::fabric::{FabricMsg, grid};

    /// An entry held back for a full queue reaches its destination once there is room, with no
    /// further call from the sender.
    #[test]
    fn held_back_entries_move_without_another_call() {
        let mut eps = grid(2, 1, u64::MAX);
        let control = Arc::new(Mutex::new(eps.pop().unwrap()));
        let mut shard = eps.pop().unwrap();
        let flusher = Flusher::start(control.clone()).unwrap();
        {
            let mut ep = control.lock().unwrap();
            for i in 0..3u8 {
                ep.send(
                    0,
                    FabricMsg::Deliver {
                        topic: Arc::from("t"),
                        frame: Bytes::from(vec![i]),
                    },
                );
            }
            assert_eq!(flusher.flush(&mut ep), 2, "a queue of one: two held back");
        }
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 3 && Instant::now() < deadline {
            shard.receive(usize::MAX, |_, m| {
                if let FabricMsg::Deliver { frame, .. } = m {
                    got.push(frame[0]);
                }
            });
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(got, vec![0, 1, 2]);
        flusher.stop();
    }
}
