//! Random interleavings of subscribe, unsubscribe, publish, disconnect and
//! reconnect-with-recovery over several shards, with the shards' loop turns themselves part of the
//! schedule (a shard may run many turns while another runs none), checked against what each
//! connection received.
//!
//! The properties, for every connection and topic:
//! - **exactly once, in order**: the offsets it receives strictly increase, and every
//!   publication has one offset, the same on every connection;
//! - **delivered**: a publication sent after the connection received its subscribe
//!   acknowledgement, while the connection stays subscribed until that publication has settled,
//!   reaches it;
//! - **gap-free**: between its acknowledgement and its unsubscribe, the offsets it receives are
//!   consecutive (only the first may skip, to where its subscription began);
//! - **acknowledgement before delivery**: nothing of a topic arrives between a fresh subscribe
//!   and its acknowledgement, except the replay a recovering subscribe asked for, and nothing
//!   after the acknowledgement of an unsubscribe;
//! - **recovery**: a reconnecting client that recovers from the last offset it saw gets, replay
//!   then live, every later offset with none missing or repeated.

use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::cases;
use crate::harness::{Client, Engine, config, topic_owned_by};

const SHARDS: usize = 3;
const SLOTS: usize = 4;
const TOPICS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Subscribe {
        slot: usize,
        topic: usize,
    },
    Unsubscribe {
        slot: usize,
        topic: usize,
    },
    Publish {
        slot: usize,
        topic: usize,
    },
    Disconnect {
        slot: usize,
    },
    /// Disconnects first when connected, then reconnects recovering every topic it held.
    Reconnect {
        slot: usize,
        shard: usize,
    },
    /// One loop turn of one shard.
    Turn {
        shard: usize,
    },
    /// Every shard runs until nothing moves.
    Settle,
}

fn op() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS;
    let topic = 0..TOPICS;
    prop_oneof![
        4 => (slot.clone(), topic.clone()).prop_map(|(slot, topic)| Op::Subscribe { slot, topic }),
        2 => (slot.clone(), topic.clone()).prop_map(|(slot, topic)| Op::Unsubscribe { slot, topic }),
        6 => (slot.clone(), topic).prop_map(|(slot, topic)| Op::Publish { slot, topic }),
        2 => slot.clone().prop_map(|slot| Op::Disconnect { slot }),
        3 => (slot, 0..SHARDS).prop_map(|(slot, shard)| Op::Reconnect { slot, shard }),
        6 => (0..SHARDS).prop_map(|shard| Op::Turn { shard }),
        1 => Just(Op::Settle),
    ]
}

/// A connection's subscription to one topic, as the client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Off,
    /// Subscribe sent, acknowledgement not received.
    Requested,
    On,
    /// Unsubscribe sent, acknowledgement not received.
    Leaving,
}

#[derive(Debug)]
struct TopicState {
    phase: Phase,
    /// Unsubscribe acknowledgements still to come (a re-subscribe may overtake one).
    unsub_acks_due: u32,
    /// (acknowledged at step, ended at step): the spans it was subscribed.
    periods: Vec<(usize, Option<usize>)>,
    /// The last offset received, and its epoch.
    last: Option<(u64, String)>,
    /// The offset the next frame must carry (gap-free within a span); `None`: any.
    expect: Option<u64>,
    /// A recovering subscribe is waiting for its acknowledgement: replayed frames may come first.
    recovering: bool,
}

impl TopicState {
    fn new() -> Self {
        Self {
            phase: Phase::Off,
            unsub_acks_due: 0,
            periods: Vec::new(),
            last: None,
            expect: None,
            recovering: false,
        }
    }
}

struct Conn {
    client: Client,
    topics: Vec<TopicState>,
    disconnected_at: Option<usize>,
    /// Publication ids received.
    received: HashMap<u64, u32>,
}

struct Publication {
    topic: usize,
    step: usize,
}

struct Run {
    e: Engine,
    topics: Vec<String>,
    conns: Vec<Conn>,
    /// The current connection of each slot.
    slots: Vec<usize>,
    publications: Vec<Publication>,
    /// Publication id → offset, as first seen.
    offsets: HashMap<u64, u64>,
    settles: Vec<usize>,
    step: usize,
}

impl Run {
    fn new() -> Self {
        let mut cfg = config(SHARDS);
        cfg.recovery.enabled = true;
        // Small history: the log is allocated and touched at start, per engine.
        cfg.recovery.memory_budget = 1 << 20;
        cfg.recovery.max_topics = 64;
        let e = Engine::new(cfg);
        let topics: Vec<String> = (0..TOPICS)
            .map(|i| topic_owned_by(&format!("t{i}-"), i % SHARDS, SHARDS))
            .collect();
        let mut run = Run {
            e,
            topics,
            conns: Vec::new(),
            slots: Vec::new(),
            publications: Vec::new(),
            offsets: HashMap::new(),
            settles: Vec::new(),
            step: 0,
        };
        for slot in 0..SLOTS {
            let c = run.open(slot % SHARDS, slot);
            run.slots.push(c);
        }
        run.e.settle();
        run
    }

    fn open(&mut self, shard: usize, slot: usize) -> usize {
        let client = self.e.connect_unsettled(shard, &format!("user{slot}"));
        self.conns.push(Conn {
            client,
            topics: (0..TOPICS).map(|_| TopicState::new()).collect(),
            disconnected_at: None,
            received: HashMap::new(),
        });
        self.conns.len() - 1
    }

    fn live(&self, slot: usize) -> Option<usize> {
        let c = self.slots[slot];
        self.conns[c].disconnected_at.is_none().then_some(c)
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.step += 1;
        let step = self.step;
        match *op {
            Op::Subscribe { slot, topic } => {
                let Some(c) = self.live(slot) else {
                    return Ok(());
                };
                let st = &mut self.conns[c].topics[topic];
                if !matches!(st.phase, Phase::Off | Phase::Leaving) {
                    return Ok(());
                }
                st.phase = Phase::Requested;
                let client = self.conns[c].client;
                self.e
                    .send_json(client, &subscription("subscribe", &self.topics[topic]));
            }
            Op::Unsubscribe { slot, topic } => {
                let Some(c) = self.live(slot) else {
                    return Ok(());
                };
                let st = &mut self.conns[c].topics[topic];
                if st.phase != Phase::On {
                    return Ok(());
                }
                st.phase = Phase::Leaving;
                st.unsub_acks_due += 1;
                end_period(st, step);
                let client = self.conns[c].client;
                self.e
                    .send_json(client, &subscription("unsubscribe", &self.topics[topic]));
            }
            Op::Publish { slot, topic } => {
                let Some(c) = self.live(slot) else {
                    return Ok(());
                };
                let id = self.publications.len() as u64;
                self.publications.push(Publication { topic, step });
                let client = self.conns[c].client;
                self.e.send_json(
                    client,
                    &json!({"c":"WSE","t":"publish","p":{"topic":self.topics[topic],
                        "event":"m","data":{"id":id}}}),
                );
            }
            Op::Disconnect { slot } => {
                let Some(c) = self.live(slot) else {
                    return Ok(());
                };
                self.read_all()?;
                let conn = &mut self.conns[c];
                conn.disconnected_at = Some(step);
                for st in &mut conn.topics {
                    end_period(st, step);
                }
                self.e.disconnect(conn.client);
            }
            Op::Reconnect { slot, shard } => {
                let old = self.slots[slot];
                if self.conns[old].disconnected_at.is_none() {
                    self.step -= 1;
                    self.apply(&Op::Disconnect { slot })?;
                    self.step += 1;
                }
                let c = self.open(shard, slot);
                self.slots[slot] = c;
                for topic in 0..TOPICS {
                    let prev = &self.conns[old].topics[topic];
                    if prev.periods.is_empty() && prev.phase != Phase::Requested {
                        continue;
                    }
                    let name = &self.topics[topic];
                    let msg = match &prev.last {
                        Some((offset, epoch)) => {
                            let (offset, epoch) = (*offset, epoch.clone());
                            let st = &mut self.conns[c].topics[topic];
                            st.recovering = true;
                            st.expect = Some(offset + 1);
                            json!({"c":"WSE","t":"subscription_update","p":{"action":"subscribe",
                                "topics":[name],"recover":true,
                                "recovery":{name.as_str(): {"epoch": epoch, "offset": offset}}}})
                        }
                        None => subscription("subscribe", name),
                    };
                    self.conns[c].topics[topic].phase = Phase::Requested;
                    let client = self.conns[c].client;
                    self.e.send_json(client, &msg);
                }
            }
            Op::Turn { shard } => self.e.turn(shard),
            Op::Settle => {
                self.e.settle();
                self.settles.push(step);
            }
        }
        self.read_all()
    }

    /// Every live client reads what it has been sent; each frame is checked as it arrives.
    fn read_all(&mut self) -> Result<(), TestCaseError> {
        for c in 0..self.conns.len() {
            if self.conns[c].disconnected_at.is_some() {
                continue;
            }
            let client = self.conns[c].client;
            for frame in self.e.recv(client) {
                self.on_frame(c, &frame.json())?;
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, c: usize, m: &Value) -> Result<(), TestCaseError> {
        let step = self.step;
        match m["t"].as_str() {
            Some("server_ready") => {}
            Some("subscription_update") => {
                let p = &m["p"];
                prop_assert_eq!(&p["success"], &json!(true), "{}", m);
                let topics = p["success_topics"].as_array().unwrap();
                for t in topics {
                    let topic = self.topic_index(t.as_str().unwrap());
                    let st = &mut self.conns[c].topics[topic];
                    match (p["action"].as_str(), st.phase) {
                        (Some("subscribe"), Phase::Requested) => {
                            if st.recovering {
                                let info = &p["recovery"][self.topics[topic].as_str()];
                                prop_assert_eq!(&info["recovered"], &json!(true), "{}", m);
                                let offset = info["offset"].as_u64().unwrap();
                                // The replay was everything up to the reported offset.
                                prop_assert_eq!(st.expect, Some(offset + 1), "{}", m);
                                st.recovering = false;
                            } else {
                                st.expect = None;
                            }
                            st.phase = Phase::On;
                            st.periods.push((step, None));
                        }
                        (Some("unsubscribe"), _) if st.unsub_acks_due > 0 => {
                            st.unsub_acks_due -= 1;
                            if st.unsub_acks_due == 0 && st.phase == Phase::Leaving {
                                st.phase = Phase::Off;
                            }
                        }
                        other => prop_assert!(false, "unexpected ack in {other:?}: {m}"),
                    }
                }
            }
            Some("m") => {
                let topic = self.topic_index(m["tp"].as_str().unwrap());
                let offset = m["o"].as_u64().unwrap();
                let epoch = m["e"].as_str().unwrap().to_owned();
                let id = m["p"]["id"].as_u64().unwrap();
                let first = *self.offsets.entry(id).or_insert(offset);
                prop_assert_eq!(first, offset, "publication {} has two offsets", id);
                let conn = &mut self.conns[c];
                *conn.received.entry(id).or_default() += 1;
                let st = &mut conn.topics[topic];
                let fresh = st.phase == Phase::Requested && st.unsub_acks_due == 0;
                prop_assert!(
                    !fresh || st.recovering,
                    "topic {topic} delivered before the subscribe acknowledgement: {m}"
                );
                prop_assert!(
                    st.phase != Phase::Off,
                    "topic {topic} delivered after the unsubscribe acknowledgement: {m}"
                );
                if let Some((last, _)) = &st.last {
                    prop_assert!(offset > *last, "offset {offset} after {last}: {m}");
                }
                if let Some(expect) = st.expect {
                    prop_assert_eq!(offset, expect, "a gap: {}", m);
                }
                st.last = Some((offset, epoch));
                // A span stays gap-free until its unsubscribe is sent.
                st.expect = match st.phase {
                    Phase::On | Phase::Leaving => Some(offset + 1),
                    _ if st.recovering => Some(offset + 1),
                    _ => None,
                };
            }
            other => prop_assert!(false, "unexpected frame {other:?}: {m}"),
        }
        Ok(())
    }

    fn topic_index(&self, name: &str) -> usize {
        self.topics.iter().position(|t| t == name).unwrap()
    }

    /// After the final settle: every publication reached every connection that held its topic
    /// from before it was sent until it had settled.
    fn check_delivered(&self) -> Result<(), TestCaseError> {
        for (id, p) in self.publications.iter().enumerate() {
            let settled = self
                .settles
                .iter()
                .copied()
                .find(|&s| s >= p.step)
                .unwrap_or(usize::MAX);
            for (i, conn) in self.conns.iter().enumerate() {
                if conn.disconnected_at.is_some_and(|d| d <= settled) {
                    continue;
                }
                let held = conn.topics[p.topic]
                    .periods
                    .iter()
                    .any(|&(acked, ended)| acked < p.step && ended.is_none_or(|e| e > settled));
                let got = conn.received.get(&(id as u64)).copied().unwrap_or(0);
                if held {
                    prop_assert_eq!(
                        got,
                        1,
                        "connection {} got publication {} {} times",
                        i,
                        id,
                        got
                    );
                } else {
                    prop_assert!(got <= 1, "connection {i} got publication {id} {got} times");
                }
            }
        }
        Ok(())
    }
}

fn end_period(st: &mut TopicState, step: usize) {
    if let Some(last) = st.periods.last_mut()
        && last.1.is_none()
    {
        last.1 = Some(step);
    }
}

fn subscription(action: &str, topic: &str) -> Value {
    json!({"c":"WSE","t":"subscription_update","p":{"action":action,"topics":[topic]}})
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut r = Run::new();
    r.read_all()?;
    for op in ops {
        r.apply(op)?;
    }
    r.apply(&Op::Settle)?;
    r.check_delivered()
}

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn every_subscriber_gets_each_publication_once_in_order(
        ops in prop::collection::vec(op(), 1..120),
    ) {
        run(&ops)?;
    }
}
