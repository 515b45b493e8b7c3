//! A whole connection (`conn::Conn`, sans-IO) fed arbitrary bytes and random frames after a valid
//! upgrade (WSE, or the Centrifuge endpoint), by a peer that reads what it is sent or never reads
//! at all.
//!
//! Bounded memory: the outbound queue never holds much more than
//! `limits.max_outbound_queue_bytes`, whatever the peer sends and whether or not it reads; a
//! connection past it is evicted with 4413 (a Centrifuge one with 3008), as the limit's
//! documentation says.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use wse_shards::admission::Admission;
use wse_shards::auth::Acl;
use wse_shards::centrifuge;
use wse_shards::codec::{CONTROL_PAYLOAD_MAX, OpCode, write_frame};
use wse_shards::config::Config;
use wse_shards::conn::{Conn, ConnEvent, ConnId, Cx};
use wse_shards::metrics::ShardMetrics;
use wse_shards::protocol::Clock;
use wse_shards::ratelimit::RateLimits;

use crate::cases;

const UPGRADE: &[u8] = b"GET /wse HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";
/// The same upgrade on the Centrifuge endpoint (JSON).
const UPGRADE_CENTRIFUGE: &[u8] = b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\n\
    Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// Small limits, so the properties reach them.
fn config() -> Config {
    let mut cfg = Config::default();
    cfg.limits.max_message_size = 2048;
    cfg.limits.max_outbound_queue_bytes = 16 * 1024;
    cfg.protocol.compression_threshold = 256;
    cfg
}

/// What a shard lends a connection, owned by the test.
struct Harness {
    cfg: Config,
    rate: RateLimits,
    publish: Acl,
    admission: Admission,
    metrics: ShardMetrics,
    events: Vec<ConnEvent>,
    ping: Option<Bytes>,
    clock: Clock,
    centrifuge: Arc<centrifuge::Settings>,
}

impl Harness {
    fn new() -> Self {
        let cfg = config();
        let rate = RateLimits {
            capacity: cfg.protocol.rate_limit_capacity,
            refill_per_sec: cfg.protocol.rate_limit_refill,
            abuse_drops: cfg.protocol.rate_limit_abuse_drops,
            abuse_window_ms: cfg.protocol.rate_limit_abuse_window.as_millis() as u64,
        };
        let centrifuge = Arc::new(centrifuge::Settings::new(
            &cfg.centrifuge,
            cfg.limits.max_outbound_queue_bytes,
        ));
        Self {
            cfg,
            rate,
            publish: Acl::allow_all(),
            admission: Admission::new(1000),
            metrics: ShardMetrics::default(),
            events: Vec::new(),
            ping: None,
            centrifuge,
            clock: Clock {
                now: Instant::now(),
                wall_ms: 1_800_000_000_000,
            },
        }
    }

    fn with<R>(&mut self, f: impl FnOnce(&mut Cx<'_>) -> R) -> R {
        let mut cx = Cx {
            clock: self.clock,
            cfg: &self.cfg,
            rate: &self.rate,
            auth: None,
            default_publish: &self.publish,
            centrifuge: &self.centrifuge,
            admission: &self.admission,
            metrics: &self.metrics,
            app_rpc: false,
            events: &mut self.events,
            ping: &mut self.ping,
            refused_lingering: 0,
        };
        f(&mut cx)
    }

    /// Moves the clock on; events are the shard's business and are dropped.
    fn tick(&mut self, ms: u64) {
        self.clock.now += Duration::from_millis(ms);
        self.clock.wall_ms += ms;
        self.events.clear();
        self.ping = None;
    }
}

/// One read from the peer, and whether the peer then reads everything queued for it.
#[derive(Clone, Debug)]
struct Step {
    bytes: Vec<u8>,
    peer_reads: bool,
    ms: u64,
}

/// Masked frames a client might send: valid WSE messages, pings, junk, random opcodes.
fn frame_bytes() -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![
        Just(br#"{"t":"ping","p":{"timestamp":1}}"#.to_vec()),
        Just(
            br#"{"t":"subscription_update","p":{"action":"subscribe","topics":["a","b:*"]}}"#
                .to_vec()
        ),
        Just(br#"{"t":"publish","p":{"topic":"a","data":{"x":1}}}"#.to_vec()),
        Just(
            br#"{"t":"batch","p":{"messages":[{"t":"ping"},{"t":"batch","p":{"messages":[]}}]}}"#
                .to_vec()
        ),
        Just(br#"{"t":"chat.message","p":{}}"#.to_vec()),
        // Centrifuge commands (the Centrifuge property's connection reads them; a WSE one
        // refuses them as it would any unknown message).
        Just(b"{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"a\"}}".to_vec()),
        Just(br#"{"id":3,"publish":{"channel":"a","data":{"x":1}}}"#.to_vec()),
        Just(br#"{"id":4,"history":{"channel":"a","limit":-1}}"#.to_vec()),
        Just(b"{}".to_vec()),
        Just(b"C:\x78\x9c\x03\x00\x00\x00\x00\x01".to_vec()),
        Just(b"M:\x81\xa1t\xa4ping".to_vec()),
        prop::collection::vec(any::<u8>(), 0..CONTROL_PAYLOAD_MAX),
        prop::collection::vec(any::<u8>(), 0..3000),
    ];
    // Mostly frames that keep the connection open, so the run gets past its first few frames.
    let opcode = prop_oneof![
        10 => Just(OpCode::Text),
        6 => Just(OpCode::Binary),
        4 => Just(OpCode::Ping),
        2 => Just(OpCode::Pong),
        1 => Just(OpCode::Close),
        2 => Just(OpCode::Continuation),
    ];
    (opcode, prop::bool::weighted(0.9), payload, any::<[u8; 4]>()).prop_map(
        |(op, fin, payload, mask)| {
            let control = matches!(op, OpCode::Ping | OpCode::Pong | OpCode::Close);
            let payload = if control {
                &payload[..payload.len().min(CONTROL_PAYLOAD_MAX)]
            } else {
                &payload[..]
            };
            let mut out = Vec::new();
            write_frame(&mut out, op, fin || control, payload, Some(mask));
            out
        },
    )
}

fn step() -> impl Strategy<Value = Step> {
    let bytes = prop_oneof![
        4 => prop::collection::vec(frame_bytes(), 1..8).prop_map(|f| f.concat()),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ];
    (bytes, prop::bool::weighted(0.5), 0u64..2000).prop_map(|(bytes, peer_reads, ms)| Step {
        bytes,
        peer_reads,
        ms,
    })
}

/// The most a connection may hold queued: the cap, one frame the socket already started on and
/// the close frame an eviction queues behind it.
fn queue_bound(cfg: &Config) -> usize {
    cfg.limits.max_outbound_queue_bytes + cfg.limits.max_message_size + 256
}

/// Upgrades, then feeds the steps (each cut into reads at `splits`), checking the queue bound
/// after every read.
fn drive(upgrade: &[u8], steps: &[Step], splits: &[Index]) -> Result<(), TestCaseError> {
    let mut h = Harness::new();
    let mut conn = Conn::new(ConnId::new(0, 1, 0), h.clock.now);
    h.with(|cx| conn.handle_bytes(&mut upgrade.to_vec(), cx));
    prop_assert!(!conn.is_closed(), "the upgrade failed");
    let bound = queue_bound(&h.cfg);
    for step in steps {
        h.tick(step.ms);
        let mut cuts: Vec<usize> = splits
            .iter()
            .map(|i| i.index(step.bytes.len() + 1))
            .collect();
        cuts.push(step.bytes.len());
        cuts.sort_unstable();
        let mut start = 0;
        for cut in cuts {
            let mut read = step.bytes[start..cut].to_vec();
            start = cut;
            h.with(|cx| {
                conn.handle_bytes(&mut read, cx);
                conn.handle_timeout(cx);
            });
            prop_assert!(
                conn.out.bytes() <= bound,
                "{} bytes queued, over {bound}",
                conn.out.bytes()
            );
        }
        if step.peer_reads {
            let queued = conn.out.bytes();
            conn.out.advance(queued);
        }
        if conn.is_closed() {
            break;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(2048))]

    #[test]
    fn arbitrary_input_after_upgrade(
        steps in prop::collection::vec(step(), 1..12),
        splits in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        drive(UPGRADE, &steps, &splits)?;
    }

    /// The same on the Centrifuge endpoint: its session (commands held behind subscribes the
    /// shard never answers here, pings, the pong timeout) stays under the same bound.
    #[test]
    fn arbitrary_input_after_a_centrifuge_upgrade(
        steps in prop::collection::vec(step(), 1..12),
        splits in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        drive(UPGRADE_CENTRIFUGE, &steps, &splits)?;
    }
}

/// A peer that sends pings and never reads: the pongs count against the outbound cap, and the
/// connection is evicted with 4413 instead of queueing without end. Found while writing
/// `arbitrary_input_after_upgrade`: replies to the peer's own frames (pongs above all, which the
/// rate limit does not charge) were not counted against `limits.max_outbound_queue_bytes`.
#[test]
fn ping_flood_without_reading_stays_bounded() {
    let mut h = Harness::new();
    let mut conn = Conn::new(ConnId::new(0, 1, 0), h.clock.now);
    h.with(|cx| conn.handle_bytes(&mut UPGRADE.to_vec(), cx));
    let mut ping = Vec::new();
    write_frame(
        &mut ping,
        OpCode::Ping,
        true,
        &[b'p'; CONTROL_PAYLOAD_MAX],
        Some([1, 2, 3, 4]),
    );
    let flood = ping.repeat(64);
    let bound = queue_bound(&h.cfg);
    for _ in 0..100 {
        h.with(|cx| conn.handle_bytes(&mut flood.clone(), cx));
        assert!(
            conn.out.bytes() <= bound,
            "{} bytes queued",
            conn.out.bytes()
        );
    }
    // Once output backs up (half the 16 KiB cap here), each Pong replaces the unsent one before
    // it: the queue stays at that threshold plus one Pong, under the cap.
    assert!(conn.is_live());
    assert!(
        conn.out.bytes() <= 8 * 1024 + 2 * (CONTROL_PAYLOAD_MAX + 2),
        "{} bytes queued",
        conn.out.bytes()
    );
}
