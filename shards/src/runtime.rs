//! The I/O edge of a shard: its thread, its compio (io_uring) runtime, its sockets and the loop
//! that drives the sans-IO [`Shard`]. All runtime-specific code lives here, so replacing the
//! runtime touches this file only.
//!
//! Sockets use readiness (`PollFd`, an io_uring poll) and a per-shard scratch buffer for reads:
//! an idle connection holds no read buffer at all, only its pending poll. Writes are plain
//! non-blocking `writev`s issued by [`Shard::flush`] once per loop turn; a connection whose socket
//! is full gets a one-off task that waits for write readiness.
//!
//! The loop, per turn: run ready tasks (accepts and reads), handle the fabric, run timers, flush
//! (one write per connection with output), then park in io_uring until I/O, a timer or a doorbell.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use compio::runtime::fd::PollFd;
use rustix::io::Errno;
use rustix::net::SocketFlags;

use crate::conn::ConnKey;
use crate::fabric::Endpoint;
use crate::metrics::{RejectReason, ShardMetrics};
use crate::protocol::Clock;
use crate::shard::{Shard, Shared, Transport};

/// Bytes read per `read(2)`; one buffer per shard, shared by all its connections.
const READ_SCRATCH_BYTES: usize = 64 * 1024;
/// Reads per readiness event before yielding to other connections.
const READS_PER_WAKE: usize = 8;
/// Accepts per readiness event before yielding.
const ACCEPTS_PER_WAKE: usize = 64;
/// Pause after `accept` fails for lack of descriptors, so a full table is not a busy loop.
const FD_LIMIT_BACKOFF: Duration = Duration::from_millis(100);
/// Tasks run per turn before the loop looks at I/O, the fabric and timers again.
const TASKS_PER_TURN: usize = 256;

/// A connected or listening socket.
#[derive(Debug)]
pub struct Socket(OwnedFd);

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

type Sock = Rc<PollFd<Socket>>;

impl Transport for Sock {
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        rustix::io::writev(self.as_fd(), bufs).map_err(io::Error::from)
    }
    fn shutdown(&self, how: Shutdown) {
        let how = match how {
            Shutdown::Read => rustix::net::Shutdown::Read,
            Shutdown::Write => rustix::net::Shutdown::Write,
            Shutdown::Both => rustix::net::Shutdown::Both,
        };
        let _ = rustix::net::shutdown(self.as_fd(), how);
    }
    fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        socket2::SockRef::from(&**self)
            .peer_addr()
            .ok()?
            .as_socket()
    }
}

/// What a shard thread starts with.
pub struct Boot {
    /// The shard's index (its connection ids' first byte).
    pub id: usize,
    /// What every shard shares: the start configuration and verifier, the connection budget, the
    /// shutdown flag and every shard's metrics.
    pub shared: Arc<Shared>,
    /// The shard's ends of the fabric grid.
    pub fabric: Endpoint,
    /// The shard's own SO_REUSEPORT listener, bound by `Server::start`.
    pub listener: socket2::Socket,
    /// The shard's counters, read by the control plane.
    pub metrics: Arc<ShardMetrics>,
    /// Core to pin to, if any.
    pub core: Option<core_affinity::CoreId>,
    /// Told once the runtime exists and the doorbell is registered (or why it failed).
    pub ready: mpsc::Sender<io::Result<()>>,
}

struct Ctx {
    shard: RefCell<Shard<Sock>>,
    scratch: RefCell<Box<[u8]>>,
    metrics: Arc<ShardMetrics>,
}

/// Runs one shard until it has drained after a shutdown request.
///
/// # Errors
/// The runtime could not be built.
pub fn run(boot: Boot) -> io::Result<()> {
    if let Some(core) = boot.core
        && !core_affinity::set_for_current(core)
    {
        tracing::warn!(
            shard = boot.id,
            core = core.id,
            "could not pin shard thread"
        );
    }
    let rt = match compio::runtime::RuntimeBuilder::new()
        .event_interval(TASKS_PER_TURN)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = boot
                .ready
                .send(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
    };
    boot.fabric.doorbells().register(boot.id, rt.waker());
    let Boot {
        id,
        shared,
        fabric,
        listener,
        metrics,
        ready,
        ..
    } = boot;
    let clock = Clock::read();
    let shard = Shard::new(id, shared.clone(), fabric, metrics.clone(), clock.now);
    let ctx = Rc::new(Ctx {
        shard: RefCell::new(shard),
        scratch: RefCell::new(vec![0u8; READ_SCRATCH_BYTES].into_boxed_slice()),
        metrics,
    });
    rt.enter(|| {
        let listener: Sock = Rc::new(PollFd::new(Socket(listener.into()))?);
        compio::runtime::spawn(accept_loop(ctx.clone(), listener.clone())).detach();
        // Sent and dropped: the starter stops waiting once every shard has reported or is gone.
        let _ = { ready }.send(Ok(()));
        drive(&rt, &ctx, &shared, &listener);
        Ok(())
    })
}

/// The shard's loop; returns once drained.
fn drive(rt: &compio::runtime::Runtime, ctx: &Rc<Ctx>, shared: &Shared, listener: &Sock) {
    let mut blocked: Vec<ConnKey> = Vec::new();
    let mut adopted = Vec::new();
    let mut listener_shut = false;
    loop {
        ctx.metrics.loop_turns.inc();
        let more_tasks = rt.run();
        let clock = Clock::read();
        let (deadline, fabric_work) = {
            let mut shard = ctx.shard.borrow_mut();
            if shared.shutdown.load(Ordering::Acquire) && !shard.is_draining() {
                shard.begin_drain(clock);
            }
            shard.handle_fabric(clock);
            if shard.is_draining() && !listener_shut {
                // Stop accepting (a shutdown, or a drain command): waking the accept loop with a
                // shut-down listener ends it.
                listener.shutdown(Shutdown::Read);
                listener_shut = true;
            }
            shard.take_adopted(&mut adopted);
            shard.handle_timers(clock);
            shard.flush(&mut blocked, clock);
            if shard.is_drained(clock.now) {
                // Whatever is still queued to this shard is dropped: commands answer "not
                // running" rather than never.
                shard.close_fabric();
                return;
            }
            (shard.next_deadline(), shard.has_fabric_work())
        };
        let spawned = !blocked.is_empty() || !adopted.is_empty();
        for fd in adopted.drain(..) {
            adopt(ctx, fd);
        }
        for key in blocked.drain(..) {
            if let Some(sock) = ctx.shard.borrow().socket(key) {
                compio::runtime::spawn(wait_writable(ctx.clone(), key, sock)).detach();
            }
        }
        let timeout = if more_tasks || spawned || fabric_work {
            Some(Duration::ZERO)
        } else {
            let ours = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            match (ours, rt.current_timeout()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        rt.poll_with(timeout);
    }
}

async fn accept_loop(ctx: Rc<Ctx>, listener: Sock) {
    loop {
        if listener.accept_ready().await.is_err() {
            return;
        }
        for _ in 0..ACCEPTS_PER_WAKE {
            match rustix::net::accept_with(
                listener.as_fd(),
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            ) {
                Ok(fd) => {
                    let here = ctx.shard.borrow_mut().place(fd);
                    if let Some(fd) = here {
                        adopt(&ctx, fd);
                    }
                }
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR | Errno::CONNABORTED) => {}
                Err(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM) => {
                    // Counted, not logged: the attack summary (`alarms`) reports it once per
                    // `log.attack_summary_interval`, where a line here came every 100 ms.
                    ctx.metrics.rejected(RejectReason::FdLimit).inc();
                    compio::time::sleep(FD_LIMIT_BACKOFF).await;
                    break;
                }
                Err(e) => {
                    // EINVAL after shutdown(listener): the shard is draining.
                    if ctx.shard.borrow().is_draining() {
                        return;
                    }
                    tracing::warn!(error = %e, "accept failed");
                    break;
                }
            }
        }
    }
}

fn adopt(ctx: &Rc<Ctx>, fd: OwnedFd) {
    // Latency over throughput per segment: every frame is a complete message.
    let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
    let sock: Sock = match PollFd::new(Socket(fd)) {
        Ok(p) => Rc::new(p),
        Err(e) => {
            tracing::warn!(error = %e, "cannot register socket");
            return;
        }
    };
    let key = ctx.shard.borrow_mut().accept(sock.clone(), Clock::read());
    if let Some(key) = key {
        compio::runtime::spawn(read_loop(ctx.clone(), key, sock)).detach();
    }
}

/// The connection's one task: wait until readable, read, hand the bytes to the shard. Ends at
/// EOF or error (including the shard shutting the socket down), then releases the slot.
async fn read_loop(ctx: Rc<Ctx>, key: ConnKey, sock: Sock) {
    loop {
        if sock.read_ready().await.is_err() || !read_available(&ctx, key, &sock) {
            break;
        }
    }
    ctx.shard.borrow_mut().release(key, Clock::read());
}

/// Reads what the socket has (up to `READS_PER_WAKE` buffers). `false` at EOF or error.
fn read_available(ctx: &Ctx, key: ConnKey, sock: &Sock) -> bool {
    let mut scratch = ctx.scratch.borrow_mut();
    for _ in 0..READS_PER_WAKE {
        match rustix::io::read(sock.as_fd(), &mut scratch[..]) {
            Ok(0) => {
                ctx.shard.borrow_mut().handle_eof(key, Clock::read());
                return false;
            }
            Ok(n) => {
                ctx.shard
                    .borrow_mut()
                    .handle_bytes(key, &mut scratch[..n], Clock::read());
                if n < scratch.len() {
                    return true;
                }
            }
            Err(Errno::AGAIN) => return true,
            Err(Errno::INTR) => {}
            Err(_) => {
                ctx.shard.borrow_mut().handle_eof(key, Clock::read());
                return false;
            }
        }
    }
    true
}

async fn wait_writable(ctx: Rc<Ctx>, key: ConnKey, sock: Sock) {
    let _ = sock.write_ready().await;
    ctx.shard.borrow_mut().handle_writable(key);
}
