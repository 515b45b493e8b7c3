//! Property test: whatever an authenticated (or unauthenticated) peer sends, the node neither
//! panics nor grows past its bounds, and answers with at most what its limits allow.

use proptest::prelude::*;
use wse_cluster::handshake::Security;
use wse_cluster::node::{Action, Config, Node};
use wse_cluster::wire::*;

fn cfg() -> Config {
    Config {
        cluster: "c".into(),
        name: "n0".into(),
        advertised: "10.0.0.0:9999".into(),
        seeds: vec![],
        security: Security::None,
        fingerprint: 1,
        compression: Default::default(),
        timing: Default::default(),
        limits: Default::default(),
    }
}

fn hello(name: &str) -> Vec<u8> {
    let mut b = Vec::new();
    encode_preface(&mut b);
    let h = Hello {
        cluster: "c".into(),
        name: name.into(),
        incarnation: 5,
        advertised: "10.0.0.1:9999".into(),
        capabilities: CAPABILITIES,
        fingerprint: 1,
        dial_seq: 1,
        nonce: [0; 32],
    };
    encode_frame(&mut b, FrameType::Hello, 0, &h.encode());
    b
}

fn record() -> impl Strategy<Value = CtrlRecord> {
    let name = "n[0-9]{1,3}";
    let pattern = prop_oneof![
        "[a-c*?]{0,4}".prop_map(|s| Pattern::parse(&s)),
        ("[a-c]{1,2}", "[gh]").prop_map(|(t, g)| Pattern::group(&t, &g)),
    ];
    let state = prop_oneof![
        Just(MemberState::Alive),
        Just(MemberState::Suspect),
        Just(MemberState::Leaving),
        Just(MemberState::Dead),
        Just(MemberState::Left)
    ];
    prop_oneof![
        prop::collection::vec((name, 0u64..10, state), 0..8).prop_map(|v| CtrlRecord::Members(
            v.into_iter()
                .map(|(name, incarnation, state)| MemberRecord {
                    name,
                    incarnation,
                    addr: "h:1".into(),
                    state
                })
                .collect()
        )),
        (any::<u64>(), name, 0u64..10).prop_map(|(id, target, incarnation)| CtrlRecord::Probe {
            id,
            target,
            incarnation
        }),
        (any::<u64>(), any::<bool>()).prop_map(|(id, alive)| CtrlRecord::ProbeAck { id, alive }),
        (0u64..6, pattern.clone()).prop_map(|(generation, pattern)| CtrlRecord::Sub {
            generation,
            pattern
        }),
        (0u64..6, pattern).prop_map(|(generation, pattern)| CtrlRecord::Unsub {
            generation,
            pattern
        }),
        (0u64..4).prop_map(|generation| CtrlRecord::SyncBegin { generation }),
        (0u64..4, 0u64..4, any::<u64>()).prop_map(|(generation, count, digest)| {
            CtrlRecord::SyncEnd {
                generation,
                count,
                digest,
            }
        }),
        any::<u64>().prop_map(|generation| CtrlRecord::Ack { generation }),
        (0u64..4, 0u64..4, any::<u64>()).prop_map(|(generation, count, digest)| {
            CtrlRecord::Digest {
                generation,
                count,
                digest,
            }
        }),
        Just(CtrlRecord::Resync),
    ]
}

/// One thing a peer may send: a well-formed CTRL frame, a frame of any type with any body, or
/// raw bytes.
fn chunk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(record(), 1..6).prop_map(|r| {
            let mut b = Vec::new();
            encode_frame(&mut b, FrameType::Ctrl, 0, &encode_ctrl(&r));
            b
        }),
        (
            1u8..9,
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(t, f, body)| {
                let mut b = Vec::new();
                encode_frame(&mut b, FrameType::Ping, 0, &body);
                b[4] = t;
                b[5] = f;
                b
            }),
        prop::collection::vec(any::<u8>(), 0..32),
    ]
}

proptest! {
    #[test]
    fn node_survives_any_peer_input(authenticated in any::<bool>(), chunks in prop::collection::vec(chunk(), 0..30)) {
        let mut n = Node::new(cfg(), 1, 7, 0);
        n.subscribe("a", 0);
        let c = n.accept("10.0.0.1:4000", 0).unwrap();
        let mut now = 0;
        if authenticated {
            n.input(c, &hello("n1"), now);
        }
        for ch in &chunks {
            now += 7_000;
            n.input(c, ch, now);
            n.publish("a", b"x", now);
            n.tick(now);
            n.flush(now);
            let mut dials = Vec::new();
            while let Some(a) = n.poll_action() {
                match a {
                    Action::Send { conn, bytes } => {
                        prop_assert!(bytes.len() <= MAX_FRAME * 2);
                        n.transmitted(conn, bytes.len());
                    }
                    // Members it learnt are dialled; those dials fail here.
                    Action::Dial { conn, .. } => dials.push(conn),
                    _ => {}
                }
            }
            for d in dials {
                n.dial_failed(d, now);
            }
            prop_assert!(n.connection_count() <= 1);
            prop_assert!(n.members().len() < 32);
        }
    }
}
