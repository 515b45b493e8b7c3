//! `floor`: the `fanout` scenario against a minimal sender instead of a server, so the server's
//! cost per delivery and its fan-out latency can be quoted as a ratio to what the kernel alone
//! costs on the same machine (`wse-bench compare floor.json fanout.json`).
//!
//! The sender runs inside wse-bench on threads of its own (pinned with `--floor-cpu`, as
//! compare.sh pins the server with taskset): it accepts the subscriber connections, answers the
//! upgrade and the client's few set-up messages with canned frames (`server_ready`,
//! `server_hello`, a successful `subscription_update`, noting the subscriber's topic), and then
//! does nothing but what every fan-out must: on the publishers' schedule it writes the frame
//! wse-server would write (`{"c":"U","t":"bench","p":<data>,"v":1}`, unmasked text) to every
//! subscriber socket of the topic. No protocol on the hot path, no publisher connection to read,
//! no fabric, no queues: one thread, the frames of everything due at a wake-up concatenated per
//! topic, one `write(2)` per subscriber per wake-up (the best a server can do). Everything else
//! (subscribers, scheduling, latency, gaps, the step protocol) is `fanout`'s own code, unchanged.
//!
//! The sender's CPU time (its thread's utime+stime) is reported where `fanout` reports the
//! server's, as `server_cpu_s_per_million_deliveries`, so the two reports line up figure by
//! figure.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::ControlFlow;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use serde::Serialize;
use wse_shards::codec::{Decoder, Message, OpCode, Role, write_frame};
use wse_shards::handshake::{accept_key, response_101};

use super::Setup;
use super::fanout::{self, FanoutArgs, Publisher, StepCmd, StepDone};
use crate::clock;
use crate::report::Report;
use crate::wire::{self, Stamp};

/// Listen backlog: subscribers connect `--inflight` at a time, all at once.
const BACKLOG: i32 = 4096;
/// Longest the sender lets one subscriber's unwritten bytes grow before dropping it (the
/// subscriber is then counted as closed by the client side, and the step fails).
const PENDING_MAX: usize = 16 << 20;
/// Largest HTTP upgrade request or set-up message read from a subscriber.
const HANDSHAKE_MAX: usize = 16 * 1024;
/// Most publications taken per wake-up (as `fanout`'s publishers coalesce into one write).
const FRAMES_PER_WRITE_MAX: usize = 512;
/// Sleeps shorter than this are not worth a syscall (as `fanout`'s publishers).
const SLEEP_MIN: Duration = Duration::from_micros(20);
/// How long after a step's last publication the sender keeps flushing what subscribers have
/// not taken yet.
const FLUSH_GRACE: Duration = Duration::from_secs(10);

/// Where the floor listens and runs.
#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct FloorArgs {
    /// Address the minimal sender listens on (the subscribers connect there; `--url` is not used).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub floor_listen: SocketAddr,
    /// Pin the sender's threads to this CPU (compare.sh pins the server to CPU 0).
    #[arg(long)]
    pub floor_cpu: Option<usize>,
}

/// Runs `fanout` with the minimal sender in place of server and publishers.
///
/// # Errors
/// The listener cannot be bound, or the flags are bad.
pub fn run(
    mut common: super::Common,
    args: &FanoutArgs,
    floor: &FloorArgs,
) -> anyhow::Result<Report> {
    let listener = TcpListener::bind(floor.floor_listen)?;
    // std's backlog is 128; thousands of subscribers connect at once.
    // SAFETY: listen(2) on a socket we own; a second call only changes the backlog.
    unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) };
    let addr = listener.local_addr()?;
    common.url = vec![format!("ws://{addr}/wse")];
    common.server_pid.clear();
    let topics = args.topics.max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let (subs_tx, subs_rx) = mpsc::channel();
    let (tid_tx, tid_rx) = mpsc::channel();
    let acceptor = {
        let (stop, cpu, tid_tx) = (stop.clone(), floor.floor_cpu, tid_tx.clone());
        std::thread::Builder::new()
            .name("floor-accept".into())
            .spawn(move || {
                pin(cpu);
                let _ = tid_tx.send(crate::sys::current_tid());
                accept_loop(&listener, &subs_tx, topics, &stop);
            })?
    };
    let (cmd_tx, cmd_rx) = mpsc::channel::<StepCmd>();
    let (done_tx, done_rx) = mpsc::channel::<StepDone>();
    let sender = {
        let (pad, cpu) = (wire::padding(args.size), floor.floor_cpu);
        std::thread::Builder::new()
            .name("floor-send".into())
            .spawn(move || {
                pin(cpu);
                let _ = tid_tx.send(crate::sys::current_tid());
                let mut s = Sender::new(topics, pad, subs_rx);
                while let Ok(cmd) = cmd_rx.recv() {
                    if done_tx.send(s.step(cmd)).is_err() {
                        break;
                    }
                }
            })?
    };
    let tids: Vec<u32> = (0..2)
        .filter_map(|_| tid_rx.recv().ok().flatten())
        .collect();
    let mut setup = Setup::new(common)?;
    // The floor's CPU is its threads' (it shares this process with the load generator).
    setup.server_tids = tids;
    let mut publisher = Some(Publisher {
        cmds: cmd_tx,
        done: done_rx,
        thread: sender,
    });
    let mut report = fanout::run_with(&setup, args, "floor", |_, _| {
        vec![Ok(publisher.take().expect("one sender"))]
    });
    // No server was measured: say so where the target is recorded.
    report.set("target", "floor");
    report.set("floor_listen", addr.to_string());
    // Both ends of every subscriber connection are descriptors of this process.
    setup.check_nofile(2 * args.subscribers, &mut report);
    if args.publishers > 1 {
        report.note("floor: one sender plays every publisher (--publishers ignored)");
    }
    stop.store(true, Ordering::Relaxed);
    // Wake the acceptor out of accept(2) so it sees the flag.
    let _ = TcpStream::connect(addr);
    let _ = acceptor.join();
    Ok(report)
}

/// Pins the calling thread to `cpu` when one is given.
fn pin(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity(0) act on the
    // calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A subscriber handed to the sender: its socket and topic index.
type NewSub = (TcpStream, usize);

/// Accepts subscribers one after another and answers their set-up until `stop`.
fn accept_loop(
    listener: &TcpListener,
    subs: &mpsc::Sender<NewSub>,
    topics: usize,
    stop: &AtomicBool,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(stream) = stream else { continue };
        // A subscriber that misbehaves is dropped; the client side counts it as failed.
        let _ = handshake(stream, subs, topics);
    }
}

/// The upgrade and the client's set-up messages, answered with canned frames; the socket goes to
/// the sender once the subscription is known (before its acknowledgement is written, so a
/// subscriber that counts itself ready is always in the sender's hands).
fn handshake(mut stream: TcpStream, subs: &mpsc::Sender<NewSub>, topics: usize) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; HANDSHAKE_MAX];
    let mut filled = 0;
    let head_len = loop {
        if let Some(i) = memchr::memmem::find(&buf[..filled], b"\r\n\r\n") {
            break i + 4;
        }
        if filled == buf.len() {
            return Err(bad("request head too large"));
        }
        match stream.read(&mut buf[filled..])? {
            0 => return Err(bad("closed during upgrade")),
            n => filled += n,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let key = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_owned())
        })
        .ok_or_else(|| bad("no Sec-WebSocket-Key"))?;
    let mut out = response_101(&accept_key(&key));
    canned(
        &mut out,
        br#"{"c":"WSE","t":"server_ready","p":{"connection_id":"floor"},"v":1}"#,
    );
    stream.write_all(&out)?;
    buf.copy_within(head_len..filled, 0);
    filled -= head_len;
    let mut decoder = Decoder::new(Role::Server);
    loop {
        let mut topic = None;
        let mut reply = Vec::new();
        let used = decoder
            .decode(&mut buf[..filled], HANDSHAKE_MAX, |m| {
                let Message::Text(t) = m else {
                    return ControlFlow::Continue(());
                };
                let t = t.as_bytes();
                if wire::msg_type(t) == Some(b"client_hello") {
                    canned(
                        &mut reply,
                        br#"{"c":"WSE","t":"server_hello","p":{},"v":1}"#,
                    );
                } else if wire::msg_type(t) == Some(b"subscription_update") {
                    topic = topic_index(t);
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| bad(&format!("bad frame: {e:?}")))?;
        buf.copy_within(used..filled, 0);
        filled -= used;
        if !reply.is_empty() {
            stream.write_all(&reply)?;
        }
        if let Some(t) = topic {
            let t = t
                .filter(|&t| t < topics)
                .ok_or_else(|| bad("unknown topic"))?;
            let ack = stream.try_clone()?;
            subs.send((stream, t)).map_err(|_| bad("sender gone"))?;
            let mut out = Vec::new();
            canned(
                &mut out,
                br#"{"c":"WSE","t":"subscription_update","p":{"action":"subscribe","success":true},"v":1}"#,
            );
            return (&ack).write_all(&out);
        }
        if filled == buf.len() {
            return Err(bad("set-up message too large"));
        }
        match stream.read(&mut buf[filled..])? {
            0 => return Err(bad("closed during set-up")),
            n => filled += n,
        }
    }
}

/// The topic index of `fanout`'s `bench.N` in a subscribe request; `Some(None)` when the
/// request names no such topic.
fn topic_index(request: &[u8]) -> Option<Option<usize>> {
    let at = memchr::memmem::find(request, b"\"bench.")? + b"\"bench.".len();
    let digits = request[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    Some(
        std::str::from_utf8(&request[at..at + digits])
            .ok()?
            .parse()
            .ok(),
    )
}

/// Appends `json` as one unmasked text frame.
fn canned(out: &mut Vec<u8>, json: &[u8]) {
    write_frame(out, OpCode::Text, true, json, None);
}

/// One subscriber socket on the sender's side.
struct Sub {
    stream: TcpStream,
    /// Bytes the socket did not take yet, written before anything newer.
    pending: Vec<u8>,
    /// Dropped (write error or `PENDING_MAX`): nothing more is written.
    gone: bool,
}

impl Sub {
    /// Writes `bytes` after what is pending; keeps what the socket does not take.
    fn send(&mut self, bytes: &[u8]) {
        if self.gone {
            return;
        }
        if self.pending.is_empty() {
            match self.write_some(bytes) {
                Some(n) if n < bytes.len() => self.pending.extend_from_slice(&bytes[n..]),
                _ => {}
            }
        } else {
            self.pending.extend_from_slice(bytes);
            self.flush();
        }
        if self.pending.len() > PENDING_MAX {
            self.drop_it();
        }
    }

    /// Writes what is pending, as far as the socket takes it.
    fn flush(&mut self) {
        if self.gone || self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        if let Some(n) = self.write_some(&pending) {
            self.pending = pending;
            self.pending.drain(..n);
        }
    }

    /// One nonblocking write; `None` when the subscriber is gone.
    fn write_some(&mut self, bytes: &[u8]) -> Option<usize> {
        match self.stream.write(bytes) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Some(0),
            Err(_) => {
                self.drop_it();
                None
            }
        }
    }

    fn drop_it(&mut self) {
        self.gone = true;
        self.pending = Vec::new();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// The sending thread's state: subscribers by topic, and the frame being built.
struct Sender {
    pad: String,
    subs_rx: mpsc::Receiver<NewSub>,
    by_topic: Vec<Vec<Sub>>,
    /// Per topic, the frames due at this wake-up, concatenated.
    frames: Vec<Vec<u8>>,
    json: Vec<u8>,
}

impl Sender {
    fn new(topics: usize, pad: String, subs_rx: mpsc::Receiver<NewSub>) -> Self {
        Sender {
            pad,
            subs_rx,
            by_topic: (0..topics).map(|_| Vec::new()).collect(),
            frames: (0..topics).map(|_| Vec::new()).collect(),
            json: Vec::new(),
        }
    }

    /// Takes the subscribers the acceptor has set up since the last call.
    fn adopt(&mut self) {
        while let Ok((stream, topic)) = self.subs_rx.try_recv() {
            // Set-up was blocking; from here on a full socket must not stall the others.
            if stream.set_nonblocking(true).is_ok() {
                self.by_topic[topic].push(Sub {
                    stream,
                    pending: Vec::new(),
                    gone: false,
                });
            }
        }
    }

    /// Publishes one step on `fanout`'s schedule (publication `g` due at `start + g/rate`, topic
    /// `g mod T`), as the one and only publisher (index 0).
    fn step(&mut self, cmd: StepCmd) -> StepDone {
        self.adopt();
        let topics = self.by_topic.len();
        let mut done = StepDone {
            sent: vec![0; topics],
            ..StepDone::default()
        };
        let period_ns = 1e9 / cmd.rate;
        let due = |g: u64| (cmd.start_ns as f64 + g as f64 * period_ns) as u64;
        let mut g = 0u64;
        loop {
            if super::stop_requested() {
                break;
            }
            let next = due(g);
            if next >= cmd.end_ns {
                break;
            }
            let now = clock::now_ns();
            if next > now {
                // Waiting: give slow sockets their pending bytes meanwhile.
                self.flush_all();
                let wait = Duration::from_nanos(next.saturating_sub(clock::now_ns()));
                if wait >= SLEEP_MIN {
                    std::thread::sleep(wait);
                    continue;
                }
            }
            done.lag.record_ns(now.saturating_sub(next));
            for _ in 0..FRAMES_PER_WRITE_MAX {
                let at = due(g);
                if at > now.max(next) || at >= cmd.end_ns {
                    break;
                }
                let topic = (g % topics as u64) as usize;
                done.sent[topic] += 1;
                let stamp = Stamp {
                    step: cmd.step,
                    publisher: 0,
                    topic: topic as u32,
                    seq: done.sent[topic],
                    scheduled_ns: at,
                };
                delivery(&mut self.json, &stamp, &self.pad);
                canned(&mut self.frames[topic], &self.json);
                g += 1;
            }
            for (frames, subs) in self.frames.iter_mut().zip(&mut self.by_topic) {
                if frames.is_empty() {
                    continue;
                }
                for s in subs.iter_mut() {
                    s.send(frames);
                }
                frames.clear();
            }
        }
        let deadline = Instant::now() + FLUSH_GRACE;
        while self.pending() && Instant::now() < deadline && !super::stop_requested() {
            self.flush_all();
            std::thread::yield_now();
        }
        let gone = self.by_topic.iter().flatten().filter(|s| s.gone).count();
        if gone > 0 {
            done.failure = Some(format!(
                "floor dropped {gone} subscribers (write error or backlog)"
            ));
        }
        done
    }

    fn flush_all(&mut self) {
        for s in self.by_topic.iter_mut().flatten() {
            s.flush();
        }
    }

    fn pending(&self) -> bool {
        self.by_topic
            .iter()
            .flatten()
            .any(|s| !s.pending.is_empty())
    }
}

/// The message wse-server sends a subscriber for a `fanout` publication, byte for byte:
/// `{"c":"U","t":"bench","p":{"bench":[..],"pad":".."},"v":1}`.
pub fn delivery(json: &mut Vec<u8>, stamp: &Stamp, pad: &str) {
    json.clear();
    let _ = write!(
        json,
        r#"{{"c":"U","t":"{}","p":{{"bench":[{},{},{},{},{}],"pad":"{pad}"}},"v":1}}"#,
        wire::BENCH_EVENT,
        stamp.step,
        stamp.publisher,
        stamp.topic,
        stamp.seq,
        stamp.scheduled_ns
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delivery_is_what_the_subscriber_scanner_reads() {
        let stamp = Stamp {
            step: 3,
            publisher: 0,
            topic: 2,
            seq: 7,
            scheduled_ns: 123_456,
        };
        let mut json = Vec::new();
        delivery(&mut json, &stamp, "xx");
        assert_eq!(wire::parse_stamp(&json), Some(stamp));
        assert_eq!(wire::msg_type(&json), Some(&b"bench"[..]));
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["p"]["pad"], "xx");
    }

    #[test]
    fn topic_index_reads_fanouts_topic_names() {
        let request = wire::subscribe(&["bench.12".to_owned()]);
        assert_eq!(topic_index(&request), Some(Some(12)));
        assert_eq!(topic_index(br#"{"topics":["other"]}"#), None);
    }
}
