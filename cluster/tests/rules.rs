//! The pair and membership rules, one scenario each, on the simulated network (no sockets):
//! duplicate resolution, self-dial, name conflict, restart by incarnation, a stale
//! incarnation, wrong PSK, drain and leave, the unauthenticated caps, hold-until-snapshot,
//! queue caps with the DLQ, and compression.

mod common;

use common::*;
use wse_cluster::handshake::Security;
use wse_cluster::node::{Compression, Event, Node};
use wse_cluster::wire::{MemberState, Pattern};

fn node(sim: &Sim, i: usize) -> &Node {
    sim.nodes[i].node.as_ref().unwrap()
}

fn state_of(sim: &Sim, i: usize, name: &str) -> Option<(MemberState, u64)> {
    node(sim, i)
        .members()
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| (m.state, m.incarnation))
}

/// Both nodes list each other as seeds and dial at the same instant: two sessions complete,
/// both ends keep the one the lower name dialled and close the other as a duplicate.
#[test]
fn simultaneous_dials_keep_the_lower_names_session() {
    for seed in 0..8 {
        let mut cfgs = vec![config(0, 2, true), config(1, 2, true)];
        cfgs[0].seeds = vec![cfgs[1].advertised.clone()];
        cfgs[1].seeds = vec![cfgs[0].advertised.clone()];
        let mut sim = Sim::with_configs(cfgs, seed, (MS, MS));
        sim.run_until(5 * SEC);
        sim.check_quiescent()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let (c0, _) = node(&sim, 0).sessions()[0].clone();
        assert!(
            sim.nodes[0].dialled.contains(&c0),
            "seed {seed}: n0 (the lower name) dialled the survivor"
        );
        assert_eq!(node(&sim, 0).stats().duplicates_closed, 1, "seed {seed}");
        assert_eq!(node(&sim, 1).stats().duplicates_closed, 1, "seed {seed}");
        // The duplicate was no sign of failure: nobody was suspected.
        for i in 0..2 {
            assert_eq!(node(&sim, i).stats().suspicions, 0, "seed {seed}");
        }
    }
}

/// A seed address that turns out to be this node: refused as SELF and never dialled again.
#[test]
fn self_dial_is_detected_and_not_repeated() {
    let mut cfgs = vec![config(0, 2, false), config(1, 2, false)];
    cfgs[0].seeds = vec!["self.example:9999".into(), cfgs[1].advertised.clone()];
    let mut sim = Sim::with_configs(cfgs, 1, (MS, 2 * MS));
    sim.aliases.insert("self.example:9999".into(), 0);
    sim.run_until(60 * SEC);
    assert_eq!(sim.dials.get("self.example:9999"), Some(&1));
    assert!(sim.nodes[0].events.iter().any(
        |(_, e)| matches!(e, Event::HandshakeFailed { error, .. } if error.contains("SelfDial"))
    ));
    sim.check_quiescent().unwrap();
}

/// Two processes configured with the same name: the second is refused with NAME_CONFLICT
/// (an alarm) while the first is alive, and the first keeps its place.
#[test]
fn name_conflict_is_refused_and_reported() {
    let mut cfgs = vec![config(0, 3, true), config(1, 3, true), config(2, 3, true)];
    cfgs[2].name = "n1".into();
    let mut sim = Sim::with_configs(cfgs, 3, (MS, 2 * MS));
    // Start the impostor later, at a higher incarnation, so it looks like a restart.
    let impostor = sim.nodes[2].node.take();
    sim.run_until(5 * SEC);
    let first = node(&sim, 1).incarnation();
    drop(impostor);
    sim.restart_at(2, first + 10);
    sim.run_until(20 * SEC);
    assert!(
        sim.nodes[0]
            .events
            .iter()
            .any(|(_, e)| matches!(e, Event::NameConflict { name, .. } if name == "n1"))
    );
    assert_eq!(state_of(&sim, 0, "n1"), Some((MemberState::Alive, first)));
    let links: Vec<_> = node(&sim, 0).sessions();
    assert_eq!(links.len(), 1);
    assert!(
        sim.links
            .get(&(0, links[0].0))
            .is_some_and(|(peer, _)| peer.0 == 1),
        "n0's link is to the first n1"
    );
}

/// A restarted node (new, higher incarnation) replaces its old self at once: the old one is
/// never declared dead, the new one is Alive everywhere right after its handshake.
#[test]
fn restart_replaces_the_old_incarnation_at_once() {
    let mut sim = Sim::new(4, 5, (MS, 2 * MS), true);
    sim.subscribe(3, "a");
    sim.run_until(10 * SEC);
    sim.check_quiescent().unwrap();
    let old = node(&sim, 3).incarnation();
    sim.kill(3);
    sim.run_until(sim.now + 100 * MS);
    sim.restart_at(3, old + 1);
    sim.run_until(sim.now + 500 * MS);
    for i in 0..3 {
        assert_eq!(
            state_of(&sim, i, "n3"),
            Some((MemberState::Alive, old + 1)),
            "at n{i}"
        );
        assert!(!sim.nodes[i].events.iter().any(|(_, e)| matches!(e, Event::Member { name, state: MemberState::Dead, .. } if name == "n3")));
    }
    sim.run_until(sim.now + 10 * SEC);
    sim.check_quiescent().unwrap();
    assert_eq!(
        node(&sim, 0).remote_interest("n3"),
        Some([Pattern::parse("a")].into())
    );
}

/// A node restarted with a lower incarnation than its peers remember (a clock that went back)
/// is told STALE_INCARNATION, jumps past the known one and joins.
#[test]
fn stale_incarnation_jumps_past_the_known_one() {
    let mut sim = Sim::new(3, 6, (MS, 2 * MS), false);
    sim.run_until(10 * SEC);
    let old = node(&sim, 2).incarnation();
    sim.kill(2);
    sim.run_until(sim.now + 100 * MS);
    sim.restart_at(2, 1);
    sim.run_until(sim.now + 20 * SEC);
    sim.check_quiescent().unwrap();
    assert!(node(&sim, 2).incarnation() > old);
    assert!(node(&sim, 2).stats().refutations >= 1);
}

/// A node with another PSK never gets a session, so it never becomes a member.
#[test]
fn wrong_psk_never_joins() {
    let mut cfgs = vec![config(0, 3, true), config(1, 3, true), config(2, 3, true)];
    cfgs[2].security = Security::Psk {
        current: b"other".to_vec(),
        previous: None,
    };
    let mut sim = Sim::with_configs(cfgs, 7, (MS, 2 * MS));
    sim.run_until(30 * SEC);
    for i in 0..2 {
        assert_eq!(state_of(&sim, i, "n2"), None, "n{i} never learnt n2");
    }
    assert!(node(&sim, 2).sessions().is_empty());
    assert!(sim.nodes[0].events.iter().any(
        |(_, e)| matches!(e, Event::HandshakeFailed { error, .. } if error.contains("AuthFailed"))
    ));
    // Rotation: n2 now holds the cluster's key as the previous one and gets in.
    let mut sim = {
        let mut cfgs = vec![config(0, 3, true), config(1, 3, true), config(2, 3, true)];
        cfgs[2].security = Security::Psk {
            current: b"new".to_vec(),
            previous: Some(b"secret".to_vec()),
        };
        Sim::with_configs(cfgs, 7, (MS, 2 * MS))
    };
    sim.run_until(10 * SEC);
    sim.check_quiescent().unwrap();
}

/// Drain is lame duck: peers see Leaving, the drained node's interest stays and it still
/// receives; after leave it is Left everywhere and never redialled.
#[test]
fn drain_keeps_interest_then_leave_is_final() {
    let mut sim = Sim::new(3, 8, (MS, 2 * MS), true);
    sim.subscribe(2, "a");
    sim.run_until(10 * SEC);
    let now = sim.now;
    sim.nodes[2].node.as_mut().unwrap().drain(now);
    sim.drain(2);
    sim.run_until(sim.now + SEC);
    let inc = node(&sim, 2).incarnation();
    for i in 0..2 {
        assert_eq!(state_of(&sim, i, "n2"), Some((MemberState::Leaving, inc)));
        assert_eq!(
            node(&sim, i).remote_interest("n2"),
            Some([Pattern::parse("a")].into())
        );
    }
    let start = sim.now;
    sim.publish(0, "a");
    sim.run_until(sim.now + SEC);
    assert_eq!(
        sim.check_deliveries(start),
        Ok(1),
        "the draining node still receives"
    );
    let now = sim.now;
    sim.nodes[2].node.as_mut().unwrap().leave(now);
    sim.drain(2);
    sim.run_until(sim.now + SEC);
    let dials_before = sim.dials.get(&sim.nodes[2].addr).copied().unwrap_or(0);
    sim.run_until(sim.now + 60 * SEC);
    for i in 0..2 {
        assert_eq!(state_of(&sim, i, "n2"), Some((MemberState::Left, inc)));
        assert_eq!(node(&sim, i).sessions().len(), 1);
    }
    assert_eq!(
        sim.dials.get(&sim.nodes[2].addr).copied().unwrap_or(0),
        dials_before,
        "never redialled"
    );
}

/// At most 64 unauthenticated inbound sockets (8 per IP); silence is closed after 5 s.
#[test]
fn unauthenticated_sockets_are_capped_and_timed_out() {
    let mut n = Node::new(config(0, 1, true), 1, 1, 0);
    let mut accepted = Vec::new();
    for ip in 0..20 {
        for port in 0..10 {
            if let Some(c) = n.accept(&format!("192.0.2.{ip}:{port}"), 0) {
                accepted.push(c);
            }
        }
    }
    assert_eq!(accepted.len(), 64);
    assert_eq!(n.stats().refused_unauthenticated, 200 - 64);
    assert_eq!(n.accept("192.0.2.0:99", 0), None, "8 per IP");
    n.tick(4_999_999);
    assert_eq!(n.connection_count(), 64);
    n.tick(5_000_000);
    assert_eq!(n.connection_count(), 0, "all closed at the 5 s deadline");
    let closes = std::iter::from_fn(|| n.poll_action())
        .filter(|a| matches!(a, wse_cluster::node::Action::Close { .. }))
        .count();
    assert_eq!(closes, 64);
}

/// A publication made while the new peer's snapshot is still unknown is held, then sent
/// filtered through it: delivered once, nothing unwanted sent.
#[test]
fn publications_for_a_new_peer_wait_for_its_snapshot() {
    for seed in 0..6 {
        let mut sim = Sim::new(2, seed, (20 * MS, 30 * MS), false);
        sim.subscribe(0, "a");
        sim.run_until(0);
        // Step until n1's link to n0 is up but n0's interest not yet known there.
        let mut held = false;
        for _ in 0..10_000 {
            sim.run_until(sim.now + 100);
            let n1 = node(&sim, 1);
            if !n1.sessions().is_empty() && n1.remote_interest("n0").is_none() {
                sim.publish(1, "a");
                sim.publish(1, "b");
                held = true;
                break;
            }
        }
        assert!(held, "seed {seed}: never saw the window");
        sim.run_until(sim.now + 2 * SEC);
        assert_eq!(sim.check_deliveries(0), Ok(1), "seed {seed}");
        assert_eq!(
            node(&sim, 0).stats().unwanted,
            0,
            "seed {seed}: b was filtered out at the sender"
        );
        assert_eq!(node(&sim, 1).stats().hold_overflows, 0, "seed {seed}");
    }
}

/// A peer whose socket does not drain: past its byte cap publications are dropped, counted
/// and kept in the bounded DLQ.
#[test]
fn peer_queue_cap_drops_into_a_bounded_dlq() {
    let mut cfgs = vec![config(0, 2, false), config(1, 2, false)];
    cfgs[1].limits.peer_queue_bytes = 64 * 1024;
    cfgs[1].limits.dlq_entries = 16;
    let mut sim = Sim::with_configs(cfgs, 9, (MS, 2 * MS));
    sim.subscribe(0, "a");
    sim.run_until(5 * SEC);
    sim.nodes[1].stall_writes = true;
    sim.publish_many(1, "a", 200, 990);
    let n1 = node(&sim, 1);
    assert!(
        n1.stats().dropped_queue >= 130,
        "{}",
        n1.stats().dropped_queue
    );
    let dlq: Vec<_> = n1.dlq().collect();
    assert_eq!(dlq.len(), 16);
    assert!(dlq.iter().all(|e| e.peer == "n0"
        && e.topic == "a"
        && (990..=1000).contains(&e.bytes)
        && e.prefix.len() == 64
        && e.reason == "peer_queue_full"));
    // A socket that takes nothing is no live link: dropped after link_timeout (3 s).
    let t0 = sim.now;
    sim.run_until(t0 + 2 * SEC);
    assert!(
        !sim.nodes[1]
            .events
            .iter()
            .any(|(t, e)| *t >= t0 && matches!(e, Event::LinkDown { .. }))
    );
    sim.run_until(t0 + 4 * SEC);
    assert!(
        sim.nodes[1]
            .events
            .iter()
            .any(|(t, e)| *t >= t0 && matches!(e, Event::LinkDown { peer } if peer == "n0"))
    );
}

/// `on` compresses batches of 4 KiB and more, `off` never does; either way they arrive.
#[test]
fn compression_modes() {
    for (mode, compressed) in [(Compression::On, true), (Compression::Off, false)] {
        let mut cfgs = vec![config(0, 2, false), config(1, 2, false)];
        cfgs[1].compression = mode;
        let mut sim = Sim::with_configs(cfgs, 10, (MS, 2 * MS));
        sim.subscribe(0, "prices");
        sim.run_until(5 * SEC);
        let start = sim.now;
        sim.publish_many(1, "prices", 200, 120);
        sim.run_until(sim.now + SEC);
        assert_eq!(sim.check_deliveries(start), Ok(200));
        let st = node(&sim, 1).stats();
        assert!(st.batch_bytes_raw > 200 * 120);
        if compressed {
            assert!(
                st.batch_bytes_wire * 4 < st.batch_bytes_raw,
                "{mode:?}: {st:?}"
            );
        } else {
            assert_eq!(st.batch_bytes_wire, st.batch_bytes_raw, "{mode:?}: {st:?}");
        }
    }
}

/// A pattern whose last subscriber leaves stays advertised for `unsub_linger` (2 s): a quick
/// resubscription sends nothing; after the linger the peers drop it. Meanwhile publications that
/// still arrive are not delivered (nobody wants them) but counted.
#[test]
fn unsubscribe_lingers_before_withdrawing() {
    let mut sim = Sim::new(2, 11, (MS, 2 * MS), false);
    sim.subscribe(0, "a");
    sim.run_until(5 * SEC);
    let a: std::collections::BTreeSet<Pattern> = [Pattern::parse("a")].into();
    assert_eq!(node(&sim, 1).remote_interest("n0"), Some(a.clone()));
    let now = sim.now;
    sim.nodes[0].node.as_mut().unwrap().unsubscribe("a", now);
    sim.run_until(now + SEC);
    assert_eq!(
        node(&sim, 1).remote_interest("n0"),
        Some(a.clone()),
        "lingering"
    );
    sim.publish(1, "a");
    sim.run_until(sim.now + 100 * MS);
    assert!(sim.nodes[0].delivered.is_empty());
    assert_eq!(node(&sim, 0).stats().unwanted, 1);
    let now = sim.now;
    let ticket = sim.nodes[0].node.as_mut().unwrap().subscribe("a", now);
    sim.nodes[0].pending_tickets.insert(ticket, "a".into());
    sim.drain(0);
    assert_eq!(
        sim.nodes[0].acked.get(&ticket).map(|(_, t)| *t),
        Some(now),
        "still advertised: acked at once"
    );
    sim.run_until(now + 3 * SEC);
    assert_eq!(
        node(&sim, 1).remote_interest("n0"),
        Some(a),
        "resubscribed within the linger"
    );
    let now = sim.now;
    sim.nodes[0].node.as_mut().unwrap().unsubscribe("a", now);
    sim.run_until(now + 1_900 * MS);
    assert!(
        node(&sim, 1)
            .remote_interest("n0")
            .unwrap()
            .contains(&Pattern::parse("a"))
    );
    sim.run_until(now + 2_200 * MS);
    assert_eq!(
        node(&sim, 1).remote_interest("n0"),
        Some(Default::default())
    );
}

/// Anti-entropy, with a hand-driven peer on the other end of one session: every 30 s the node
/// sends a DIGEST of its interest; a DIGEST that disagrees with the table held for the peer
/// makes it ask for a fresh snapshot (RESYNC), and a RESYNC makes it send one.
#[test]
fn digest_mismatch_asks_for_a_fresh_snapshot() {
    use wse_cluster::node::Action;
    use wse_cluster::wire::*;

    let mut cfg = config(0, 2, false);
    cfg.seeds.clear();
    let mut n = Node::new(cfg, 1, 1, 0);
    n.subscribe("a", 0);
    let c = n.accept("10.0.0.1:4000", 0).unwrap();
    let mut input = Vec::new();
    encode_preface(&mut input);
    let hello = Hello {
        cluster: "sim".into(),
        name: "n1".into(),
        incarnation: 5,
        advertised: "10.0.0.1:9999".into(),
        capabilities: CAPABILITIES,
        fingerprint: 42,
        dial_seq: 1,
        nonce: [0; 32],
    };
    encode_frame(&mut input, FrameType::Hello, 0, &hello.encode());
    n.input(c, &input, 0);

    let mut from_node = FrameDecoder::new(MAX_FRAME);
    let mut preface_seen = false;
    // Feeds CTRL records at `now`, runs a loop turn, returns the CTRL records the node sent.
    let mut turn = |n: &mut Node, recs: &[CtrlRecord], now: u64| -> Vec<CtrlRecord> {
        if !recs.is_empty() {
            let mut f = Vec::new();
            encode_frame(&mut f, FrameType::Ctrl, 0, &encode_ctrl(recs));
            n.input(c, &f, now);
        }
        n.tick(now);
        n.flush(now);
        let mut out = Vec::new();
        while let Some(a) = n.poll_action() {
            if let Action::Send { conn, bytes } = a {
                assert_eq!(conn, c);
                n.transmitted(conn, bytes.len());
                from_node.push(&bytes);
            }
        }
        if !preface_seen {
            preface_seen = from_node.take_raw::<PREFACE_LEN>().is_some();
        }
        while let Some(f) = from_node.next_frame().unwrap() {
            if f.ty == FrameType::Ctrl {
                out.extend(decode_ctrl(&f.body).unwrap());
            }
        }
        out
    };
    let x = Pattern::parse("x");
    let a = Pattern::parse("a");
    let digest_of = |p: &Pattern| stable_hash(p.kind, &p.text);
    let sent = turn(
        &mut n,
        &[
            CtrlRecord::SyncBegin { generation: 1 },
            CtrlRecord::Sub {
                generation: 1,
                pattern: x.clone(),
            },
            CtrlRecord::SyncEnd {
                generation: 1,
                count: 1,
                digest: digest_of(&x),
            },
        ],
        1_000,
    );
    assert_eq!(n.remote_interest("n1"), Some([x.clone()].into()));
    assert!(
        sent.contains(&CtrlRecord::Sub {
            generation: 1,
            pattern: a.clone()
        }),
        "{sent:?}"
    );

    let sent = turn(
        &mut n,
        &[CtrlRecord::Digest {
            generation: 1,
            count: 1,
            digest: digest_of(&x),
        }],
        2_000,
    );
    assert!(
        !sent.contains(&CtrlRecord::Resync),
        "agreeing digest: {sent:?}"
    );
    let sent = turn(
        &mut n,
        &[CtrlRecord::Digest {
            generation: 1,
            count: 2,
            digest: 0,
        }],
        3_000,
    );
    assert!(sent.contains(&CtrlRecord::Resync), "{sent:?}");
    assert_eq!(n.stats().resyncs, 1);

    let sent = turn(&mut n, &[CtrlRecord::Resync], 4_000);
    let (count, digest) = (1, digest_of(&a));
    assert_eq!(
        sent.iter()
            .filter(|r| !matches!(r, CtrlRecord::Ack { .. }))
            .cloned()
            .collect::<Vec<_>>(),
        [
            CtrlRecord::SyncBegin { generation: 2 },
            CtrlRecord::Sub {
                generation: 2,
                pattern: a.clone()
            },
            CtrlRecord::SyncEnd {
                generation: 2,
                count,
                digest
            },
        ]
    );

    // The periodic digest, 30 s after the session started (the peer keeps it alive).
    let mut digests = Vec::new();
    for s in 1..=31u64 {
        let mut ping = Vec::new();
        encode_frame(&mut ping, FrameType::Ping, 0, &0u64.to_le_bytes());
        n.input(c, &ping, s * 1_000_000);
        let sent = turn(&mut n, &[], s * 1_000_000);
        digests.extend(
            sent.into_iter()
                .filter(|r| matches!(r, CtrlRecord::Digest { .. }))
                .map(|r| (s, r)),
        );
    }
    assert_eq!(
        digests,
        [(
            30,
            CtrlRecord::Digest {
                generation: 2,
                count,
                digest
            }
        )]
    );
}

/// Two sessions of a pair: the peer's publications on the older one (still draining after the
/// duplicate rule closed it) are delivered before those it sent later on the survivor, even
/// when the survivor's bytes arrive first.
#[test]
fn the_survivor_waits_for_the_loser_to_drain() {
    use wse_cluster::node::Action;
    use wse_cluster::wire::*;

    let hello = |dial_seq: u64| {
        let mut b = Vec::new();
        encode_preface(&mut b);
        let h = Hello {
            cluster: "sim".into(),
            name: "n1".into(),
            incarnation: 5,
            advertised: "10.0.0.1:9999".into(),
            capabilities: CAPABILITIES,
            fingerprint: 42,
            dial_seq,
            nonce: [0; 32],
        };
        encode_frame(&mut b, FrameType::Hello, 0, &h.encode());
        b
    };
    let batch = |seq: u64| {
        let mut body = Vec::new();
        PubRecord::new("a", format!("n1:{seq}").as_bytes()).encode(&mut body);
        let mut f = Vec::new();
        encode_frame(&mut f, FrameType::Batch, 0, &body);
        f
    };
    let drain = |n: &mut Node| -> (Vec<u64>, Vec<String>) {
        n.flush(0);
        let (mut dials, mut got) = (Vec::new(), Vec::new());
        while let Some(a) = n.poll_action() {
            match a {
                Action::Dial { conn, .. } => dials.push(conn),
                Action::Deliver { payload, .. } => got.push(String::from_utf8(payload).unwrap()),
                _ => {}
            }
        }
        (dials, got)
    };

    let mut cfg = config(0, 2, false);
    cfg.seeds = vec!["10.0.0.1:9999".into()];
    let mut n = Node::new(cfg, 1, 1, 0);
    n.subscribe("a", 0);
    n.tick(0);
    let (dials, _) = drain(&mut n);
    let b = dials[0];
    // n1 dials n0 first: session A, dialled by the higher name.
    let a = n.accept("10.0.0.1:4000", 0).unwrap();
    n.input(a, &hello(7), 0);
    drain(&mut n);
    assert_eq!(n.sessions(), [(a, "n1".to_string())]);
    // n0's own dial completes: session B, dialled by the lower name, wins; A drains.
    n.connected(b, 0);
    n.input(b, &hello(0), 0);
    drain(&mut n);
    assert_eq!(n.sessions(), [(b, "n1".to_string())]);
    assert_eq!(n.stats().duplicates_closed, 1);
    // n1 had sent #1 on A before it learnt of B, then #2 on B; B's bytes come first.
    n.input(b, &batch(2), 0);
    let (_, got) = drain(&mut n);
    assert!(got.is_empty(), "#2 waits for A to drain: {got:?}");
    n.input(a, &batch(1), 0);
    let mut goodbye = Vec::new();
    encode_frame(
        &mut goodbye,
        FrameType::Goodbye,
        0,
        &Goodbye {
            reason: Reason::Duplicate,
            retry_after_ms: 0,
            no_reconnect: false,
            incarnation: 0,
        }
        .encode(),
    );
    n.input(a, &goodbye, 0);
    let (_, got) = drain(&mut n);
    assert_eq!(got, ["n1:1", "n1:2"]);
    n.input(b, &batch(3), 0);
    assert_eq!(drain(&mut n).1, ["n1:3"], "no deferral once A is gone");
}

/// With `psk` every byte after AUTH is sealed: a bit flipped on the path closes the link
/// instead of delivering a corrupted publication, and the link comes back.
#[test]
fn psk_sessions_are_sealed_against_tampering() {
    let mut sim = Sim::new(2, 12, (MS, 2 * MS), true);
    sim.subscribe(0, "a");
    sim.run_until(5 * SEC);
    sim.check_quiescent().unwrap();
    let t0 = sim.now;
    sim.corrupt_next_to = Some(0);
    sim.publish(1, "a");
    sim.run_until(t0 + SEC);
    assert!(sim.corrupt_next_to.is_none(), "the publication went out");
    assert!(
        sim.nodes[0].delivered.is_empty(),
        "nothing tampered is delivered"
    );
    assert!(
        sim.nodes[0]
            .events
            .iter()
            .any(|(t, e)| *t >= t0 && matches!(e, Event::LinkDown { peer } if peer == "n1"))
    );
    sim.run_until(t0 + 10 * SEC);
    sim.check_quiescent().unwrap();
    let t1 = sim.now;
    sim.publish(1, "a");
    sim.run_until(t1 + SEC);
    assert_eq!(sim.check_deliveries(t1), Ok(1));
}

/// Queue groups across nodes: each publication reaches one member of each group cluster-wide,
/// members on different nodes take turns, a local member is preferred, and plain subscribers
/// still get everything.
#[test]
fn queue_groups_deliver_once_per_group_cluster_wide() {
    let mut sim = Sim::new(3, 13, (MS, 2 * MS), true);
    let now = sim.now;
    for i in [1, 2] {
        let n = sim.nodes[i].node.as_mut().unwrap();
        n.subscribe_group("jobs", "workers", now);
    }
    sim.subscribe(2, "jobs");
    sim.run_until(5 * SEC);
    sim.check_quiescent().unwrap();
    for _ in 0..100 {
        sim.publish(0, "jobs");
    }
    sim.run_until(sim.now + SEC);
    let (g1, g2) = (&sim.nodes[1].group_delivered, &sim.nodes[2].group_delivered);
    assert_eq!(g1.len() + g2.len(), 100, "one member per publication");
    assert!(
        g1.keys().all(|k| !g2.contains_key(k)) && g1.values().chain(g2.values()).all(|c| *c == 1)
    );
    assert!(
        g1.len() >= 30 && g2.len() >= 30,
        "members take turns: {} / {}",
        g1.len(),
        g2.len()
    );
    assert_eq!(
        sim.nodes[2].delivered.len(),
        100,
        "the plain subscriber gets every one"
    );
    assert!(sim.nodes[1].delivered.is_empty());
    // A member on the publishing node takes them all (the shards deliver locally).
    let now = sim.now;
    sim.nodes[0]
        .node
        .as_mut()
        .unwrap()
        .subscribe_group("jobs", "workers", now);
    sim.drain(0);
    for _ in 0..10 {
        sim.publish(0, "jobs");
    }
    sim.run_until(sim.now + SEC);
    let total: usize = sim.nodes.iter().map(|n| n.group_delivered.len()).sum();
    assert_eq!(
        total, 100,
        "no remote group delivery while a local member exists"
    );
    assert_eq!(
        node(&sim, 1).remote_interest("n0").unwrap(),
        [Pattern::group("jobs", "workers")].into()
    );
}
