//! The simulated network shared by the cluster tests: nodes of the sans-IO core on a virtual
//! clock, with seeded delays, resets, partitions (stalled bytes), kills and restarts.
#![allow(dead_code)] // each test crate uses a different part

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wse_cluster::handshake::Security;
use wse_cluster::node::{Action, Compression, Config, ConnId, Event, Node};
use wse_cluster::wire::{MemberState, Pattern};

pub const MS: u64 = 1_000;
pub const SEC: u64 = 1_000_000;
/// Timer granularity of the simulated loop.
pub const TICK: u64 = 10 * MS;
/// Hard bound on processed events per run (a livelock fails the test instead of hanging it).
pub const MAX_EVENTS: u64 = 5_000_000;

pub type End = (usize, ConnId);

#[derive(Debug)]
pub enum Ev {
    Accept { from: End, to: usize },
    Connected(End),
    DialFailed(End),
    Deliver(End, Vec<u8>),
    Closed(End),
}

pub struct SimNode {
    pub node: Option<Node>,
    pub name: String,
    pub addr: String,
    pub incarnation: u64,
    pub subs: BTreeSet<String>,
    pub acked: BTreeMap<u64, (String, u64)>,
    pub pending_tickets: BTreeMap<u64, String>,
    /// (origin, seq) → times delivered.
    pub delivered: BTreeMap<(String, u64), u32>,
    /// Per origin, the last sequence number delivered (ordering check).
    pub last_seq: BTreeMap<String, u64>,
    pub order_violations: u32,
    pub cfg: Config,
    /// Everything the node reported, with the time.
    pub events: Vec<(u64, Event)>,
    /// Connections this node dialled (the rest it accepted).
    pub dialled: BTreeSet<ConnId>,
    /// The socket never drains: `transmitted` is not reported (a stalled peer).
    pub stall_writes: bool,
    /// Queue-group deliveries: (origin, seq) → times.
    pub group_delivered: BTreeMap<(String, u64), u32>,
}

pub struct Sim {
    pub now: u64,
    pub rng: StdRng,
    pub nodes: Vec<SimNode>,
    pub links: BTreeMap<End, (End, u64)>,
    pub events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    pub payloads: BTreeMap<usize, Ev>,
    pub seq: u64,
    pub blocked: BTreeSet<(usize, usize)>,
    /// Bytes sent across a cut, in order: TCP retransmits them once the cut heals.
    pub stalled: Vec<(End, Vec<u8>)>,
    pub delay: (u64, u64),
    pub processed: u64,
    pub next_tick: u64,
    /// (origin, seq, topic, time published).
    pub published: Vec<(String, u64, String, u64)>,
    pub pub_seq: u64,
    pub psk: bool,
    /// Extra addresses that reach a node (a second name for it).
    pub aliases: BTreeMap<String, usize>,
    /// Dials per address.
    pub dials: BTreeMap<String, u32>,
    /// Per publication, the peers its publisher had a link to when it published.
    pub linked: BTreeMap<(String, u64), BTreeSet<String>>,
    /// Flip one bit in the next chunk of bytes sent to this node (an on-path attacker).
    pub corrupt_next_to: Option<usize>,
}

pub fn config(i: usize, n: usize, psk: bool) -> Config {
    let seed = if i == 0 { 1 % n } else { 0 };
    Config {
        cluster: "sim".into(),
        name: format!("n{i}"),
        advertised: format!("10.0.0.{i}:9999"),
        seeds: vec![format!("10.0.0.{seed}:9999")],
        security: if psk {
            Security::Psk {
                current: b"secret".to_vec(),
                previous: None,
            }
        } else {
            Security::None
        },
        fingerprint: 42,
        compression: Compression::Auto,
        timing: Default::default(),
        limits: Default::default(),
    }
}

impl Sim {
    pub fn new(n: usize, seed: u64, delay: (u64, u64), psk: bool) -> Self {
        let mut s = Self::with_configs((0..n).map(|i| config(i, n, psk)).collect(), seed, delay);
        s.psk = psk;
        s
    }

    pub fn with_configs(cfgs: Vec<Config>, seed: u64, delay: (u64, u64)) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let nodes = cfgs
            .into_iter()
            .map(|cfg| {
                let inc = 1_000 + rng.random_range(0..1_000);
                SimNode {
                    node: Some(Node::new(cfg.clone(), inc, rng.random(), 0)),
                    name: cfg.name.clone(),
                    addr: cfg.advertised.clone(),
                    cfg,
                    events: Vec::new(),
                    dialled: BTreeSet::new(),
                    stall_writes: false,
                    group_delivered: BTreeMap::new(),
                    incarnation: inc,
                    subs: BTreeSet::new(),
                    acked: BTreeMap::new(),
                    pending_tickets: BTreeMap::new(),
                    delivered: BTreeMap::new(),
                    last_seq: BTreeMap::new(),
                    order_violations: 0,
                }
            })
            .collect();
        Self {
            now: 0,
            rng,
            nodes,
            links: BTreeMap::new(),
            events: BinaryHeap::new(),
            payloads: BTreeMap::new(),
            seq: 0,
            blocked: BTreeSet::new(),
            stalled: Vec::new(),
            delay,
            processed: 0,
            next_tick: 0,
            published: Vec::new(),
            pub_seq: 0,
            psk: false,
            aliases: BTreeMap::new(),
            dials: BTreeMap::new(),
            linked: BTreeMap::new(),
            corrupt_next_to: None,
        }
    }

    pub fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        let key = self.seq as usize;
        self.payloads.insert(key, ev);
        self.events.push(Reverse((at, self.seq, key)));
    }

    pub fn delay(&mut self) -> u64 {
        self.rng.random_range(self.delay.0..=self.delay.1)
    }

    pub fn cut(&self, a: usize, b: usize) -> bool {
        self.blocked.contains(&(a.min(b), a.max(b)))
    }

    pub fn alive(&self, i: usize) -> bool {
        self.nodes[i].node.is_some()
    }

    /// Carries out node `i`'s actions.
    pub fn drain(&mut self, i: usize) {
        loop {
            let Some(node) = self.nodes[i].node.as_mut() else {
                return;
            };
            node.flush(self.now);
            let Some(a) = node.poll_action() else { return };
            match a {
                Action::Dial { conn, addr } => {
                    *self.dials.entry(addr.clone()).or_insert(0) += 1;
                    self.nodes[i].dialled.insert(conn);
                    let target = self
                        .nodes
                        .iter()
                        .position(|n| n.addr == addr)
                        .or_else(|| self.aliases.get(&addr).copied());
                    let d = self.delay();
                    match target {
                        Some(j) if self.alive(j) && !self.cut(i, j) => self.schedule(
                            self.now + d,
                            Ev::Accept {
                                from: (i, conn),
                                to: j,
                            },
                        ),
                        // Refused at once, or (blackholed) a connect timeout later.
                        Some(j) if self.cut(i, j) => {
                            self.schedule(self.now + SEC, Ev::DialFailed((i, conn)))
                        }
                        _ => self.schedule(self.now + d, Ev::DialFailed((i, conn))),
                    }
                }
                Action::Send { conn, bytes } => {
                    let n = bytes.len();
                    if let Some(&(peer, next)) = self.links.get(&(i, conn)) {
                        if self.cut(i, peer.0) {
                            self.stalled.push(((i, conn), bytes));
                        } else {
                            let mut bytes = bytes;
                            if self.corrupt_next_to == Some(peer.0) {
                                self.corrupt_next_to = None;
                                let mid = bytes.len() / 2;
                                bytes[mid] ^= 0x10;
                            }
                            let at = next.max(self.now + self.delay());
                            self.links.get_mut(&(i, conn)).unwrap().1 = at;
                            self.schedule(at, Ev::Deliver(peer, bytes));
                        }
                    }
                    if !self.nodes[i].stall_writes {
                        self.nodes[i].node.as_mut().unwrap().transmitted(conn, n);
                    }
                }
                Action::Close { conn } => {
                    if let Some((peer, next)) = self.links.remove(&(i, conn))
                        && !self.cut(i, peer.0)
                    {
                        let at = next.max(self.now + self.delay());
                        self.schedule(at, Ev::Closed(peer));
                    }
                }
                Action::Deliver {
                    from: _,
                    topic: _,
                    payload,
                } => {
                    let s = String::from_utf8(payload).unwrap();
                    let (origin, seq) = s.split_once(':').unwrap();
                    let seq: u64 = seq.split(' ').next().unwrap().parse().unwrap();
                    let sn = &mut self.nodes[i];
                    *sn.delivered.entry((origin.to_owned(), seq)).or_insert(0) += 1;
                    let last = sn.last_seq.entry(origin.to_owned()).or_insert(0);
                    if seq <= *last {
                        sn.order_violations += 1;
                    }
                    *last = seq;
                }
                Action::SubscribeAcked {
                    ticket,
                    timed_out: _,
                } => {
                    let now = self.now;
                    let sn = &mut self.nodes[i];
                    if let Some(t) = sn.pending_tickets.remove(&ticket) {
                        sn.acked.insert(ticket, (t, now));
                    }
                }
                Action::DeliverGroup { payload, .. } => {
                    let s = String::from_utf8(payload).unwrap();
                    let (origin, seq) = s.split_once(':').unwrap();
                    let seq: u64 = seq.split(' ').next().unwrap().parse().unwrap();
                    *self.nodes[i]
                        .group_delivered
                        .entry((origin.to_owned(), seq))
                        .or_insert(0) += 1;
                }
                Action::Event(e) => {
                    let now = self.now;
                    self.nodes[i].events.push((now, e));
                }
            }
        }
    }

    pub fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Accept { from, to } => {
                if !self.alive(to) || !self.alive(from.0) || self.cut(from.0, to) {
                    return self.schedule(self.now, Ev::DialFailed(from));
                }
                let src = format!(
                    "{}:{}",
                    self.nodes[from.0].addr.split(':').next().unwrap(),
                    40000 + from.1
                );
                let Some(c) = self.nodes[to].node.as_mut().unwrap().accept(&src, self.now) else {
                    return self.schedule(self.now, Ev::DialFailed(from));
                };
                let d = self.delay();
                let connected_at = self.now + d;
                self.links.insert((to, c), (from, connected_at));
                self.links.insert(from, ((to, c), self.now));
                self.schedule(connected_at, Ev::Connected(from));
                self.drain(to);
            }
            Ev::Connected(e) => {
                if let Some(n) = self.nodes[e.0].node.as_mut() {
                    if self.links.contains_key(&e) {
                        n.connected(e.1, self.now);
                    } else {
                        n.dial_failed(e.1, self.now);
                    }
                    self.drain(e.0);
                }
            }
            Ev::DialFailed(e) => {
                self.links.remove(&e);
                if let Some(n) = self.nodes[e.0].node.as_mut() {
                    n.dial_failed(e.1, self.now);
                    self.drain(e.0);
                }
            }
            Ev::Deliver(e, bytes) => {
                if self.links.contains_key(&e)
                    && let Some(n) = self.nodes[e.0].node.as_mut()
                {
                    n.input(e.1, &bytes, self.now);
                    self.drain(e.0);
                }
            }
            Ev::Closed(e) => {
                if self.links.remove(&e).is_some()
                    && let Some(n) = self.nodes[e.0].node.as_mut()
                {
                    n.closed(e.1, self.now);
                    self.drain(e.0);
                }
            }
        }
    }

    /// Runs events and ticks up to virtual time `until`.
    pub fn run_until(&mut self, until: u64) {
        loop {
            let next_ev = self.events.peek().map(|Reverse((t, _, _))| *t);
            let next = match next_ev {
                Some(t) if t < self.next_tick => t,
                _ => self.next_tick,
            };
            if next > until {
                self.now = until;
                return;
            }
            self.now = next;
            self.processed += 1;
            assert!(
                self.processed < MAX_EVENTS,
                "event bound hit at t = {} ms",
                self.now / MS
            );
            if next_ev == Some(next) && next < self.next_tick {
                let Reverse((_, _, key)) = self.events.pop().unwrap();
                let ev = self.payloads.remove(&key).unwrap();
                self.handle(ev);
            } else {
                for i in 0..self.nodes.len() {
                    if let Some(n) = self.nodes[i].node.as_mut() {
                        n.tick(self.now);
                        self.drain(i);
                    }
                }
                self.next_tick += TICK;
            }
        }
    }

    pub fn subscribe(&mut self, i: usize, topic: &str) {
        let now = self.now;
        let sn = &mut self.nodes[i];
        let Some(n) = sn.node.as_mut() else { return };
        if !sn.subs.insert(topic.to_owned()) {
            return;
        }
        let t = n.subscribe(topic, now);
        sn.pending_tickets.insert(t, topic.to_owned());
        self.drain(i);
    }

    pub fn publish(&mut self, i: usize, topic: &str) {
        let now = self.now;
        self.pub_seq += 1;
        let seq = self.pub_seq;
        let name = self.nodes[i].name.clone();
        let Some(n) = self.nodes[i].node.as_mut() else {
            return;
        };
        let linked = n
            .members()
            .into_iter()
            .filter(|m| m.link.is_some())
            .map(|m| m.name)
            .collect();
        self.linked.insert((name.clone(), seq), linked);
        n.publish(topic, format!("{name}:{seq}").as_bytes(), now);
        self.published.push((name, seq, topic.to_owned(), now));
        self.drain(i);
    }

    /// Ends every cut: stalled bytes go through on connections still open at both ends, and
    /// an end whose other end was closed meanwhile gets a reset.
    pub fn heal(&mut self) {
        self.blocked.clear();
        for (from, bytes) in std::mem::take(&mut self.stalled) {
            if let Some(&(peer, next)) = self.links.get(&from) {
                let at = next.max(self.now + self.delay());
                self.links.get_mut(&from).unwrap().1 = at;
                self.schedule(at, Ev::Deliver(peer, bytes));
            }
        }
        let orphans: Vec<End> = self
            .links
            .iter()
            .filter(|(_, (peer, _))| !self.links.contains_key(peer))
            .map(|(e, _)| *e)
            .collect();
        for e in orphans {
            let d = self.delay();
            self.schedule(self.now + d, Ev::Closed(e));
        }
    }

    /// `count` publications in one loop turn (so they share batches), each padded with
    /// `pad` bytes of JSON-like text.
    pub fn publish_many(&mut self, i: usize, topic: &str, count: usize, pad: usize) {
        let now = self.now;
        let name = self.nodes[i].name.clone();
        let filler =
            r#"{"t":"price","p":{"sym":"EURUSD","bid":1.0842,"ask":1.0843}}"#.repeat(pad / 60 + 1);
        for _ in 0..count {
            self.pub_seq += 1;
            let seq = self.pub_seq;
            let payload = format!("{name}:{seq} {}", &filler[..pad]);
            self.nodes[i]
                .node
                .as_mut()
                .unwrap()
                .publish(topic, payload.as_bytes(), now);
            self.published
                .push((name.clone(), seq, topic.to_owned(), now));
        }
        self.drain(i);
    }

    pub fn kill(&mut self, i: usize) {
        self.nodes[i].node = None;
        let ends: Vec<End> = self.links.keys().filter(|e| e.0 == i).copied().collect();
        for e in ends {
            let (peer, _) = self.links.remove(&e).unwrap();
            if !self.cut(i, peer.0) {
                let d = self.delay();
                self.schedule(self.now + d, Ev::Closed(peer));
            }
        }
    }

    pub fn restart(&mut self, i: usize) {
        // Sometimes a lower incarnation than before (a clock that went back): the node must
        // learn the old one from its peers and jump past it.
        let inc = if self.rng.random_bool(0.3) {
            1
        } else {
            self.nodes[i].incarnation + 1_000
        };
        self.restart_at(i, inc);
    }

    pub fn restart_at(&mut self, i: usize, inc: u64) {
        let seed = self.rng.random();
        self.nodes[i].incarnation = inc;
        self.nodes[i].dialled.clear();
        self.nodes[i].node = Some(Node::new(self.nodes[i].cfg.clone(), inc, seed, self.now));
        let subs = std::mem::take(&mut self.nodes[i].subs);
        self.nodes[i].pending_tickets.clear();
        for t in subs {
            self.subscribe(i, &t);
        }
    }

    pub fn reset_random_link(&mut self) {
        let ends: Vec<End> = self.links.keys().copied().collect();
        if ends.is_empty() {
            return;
        }
        let e = ends[self.rng.random_range(0..ends.len())];
        let (peer, _) = self.links.remove(&e).unwrap();
        self.links.remove(&peer);
        let d = self.delay();
        self.schedule(self.now + d, Ev::Closed(e));
        self.schedule(self.now + d, Ev::Closed(peer));
        // The Closed events find no link any more: deliver them directly.
        for x in [e, peer] {
            if let Some(n) = self.nodes[x.0].node.as_mut() {
                n.closed(x.1, self.now);
                self.drain(x.0);
            }
        }
    }

    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.alive(i)).collect()
    }

    // ---------------------------------------------------------------------------------------
    // Invariants.

    pub fn check_one_link_per_pair(&self) -> Result<(), String> {
        for &i in &self.live() {
            let n = self.nodes[i].node.as_ref().unwrap();
            let sessions = n.sessions();
            for &j in &self.live() {
                if i == j {
                    continue;
                }
                let peer = &self.nodes[j].name;
                let mine: Vec<ConnId> = sessions
                    .iter()
                    .filter(|(_, p)| p == peer)
                    .map(|(c, _)| *c)
                    .collect();
                if mine.len() != 1 {
                    return Err(format!(
                        "{} has {} sessions to {peer}",
                        self.nodes[i].name,
                        mine.len()
                    ));
                }
                let Some(&((pj, pc), _)) = self.links.get(&(i, mine[0])) else {
                    return Err(format!(
                        "{}'s session to {peer} has no socket",
                        self.nodes[i].name
                    ));
                };
                let theirs = self.nodes[pj].node.as_ref().unwrap().sessions();
                if pj != j
                    || !theirs
                        .iter()
                        .any(|(c, p)| *c == pc && *p == self.nodes[i].name)
                {
                    return Err(format!(
                        "{} and {peer} use different connections",
                        self.nodes[i].name
                    ));
                }
            }
            if n.connection_count() != sessions.len() || sessions.len() != self.live().len() - 1 {
                return Err(format!(
                    "{}: {} connections, {} sessions, {} live peers",
                    self.nodes[i].name,
                    n.connection_count(),
                    sessions.len(),
                    self.live().len() - 1
                ));
            }
        }
        Ok(())
    }

    pub fn check_membership(&self) -> Result<(), String> {
        for &i in &self.live() {
            let view = self.nodes[i].node.as_ref().unwrap().members();
            for j in 0..self.nodes.len() {
                if i == j {
                    continue;
                }
                let m = view.iter().find(|m| m.name == self.nodes[j].name);
                match (&self.nodes[j].node, m) {
                    (Some(nj), Some(m))
                        if m.state == MemberState::Alive && m.incarnation == nj.incarnation() => {}
                    (None, Some(m)) if m.state == MemberState::Dead => {}
                    (None, None) => {}
                    (other, m) => {
                        return Err(format!(
                            "{} sees {} as {m:?}; actual incarnation {:?}",
                            self.nodes[i].name,
                            self.nodes[j].name,
                            other.as_ref().map(Node::incarnation)
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn check_interest(&self) -> Result<(), String> {
        for &i in &self.live() {
            for &j in &self.live() {
                if i == j {
                    continue;
                }
                let want: BTreeSet<Pattern> = self.nodes[j].node.as_ref().unwrap().local_interest();
                let got = self.nodes[i]
                    .node
                    .as_ref()
                    .unwrap()
                    .remote_interest(&self.nodes[j].name);
                if got.as_ref() != Some(&want) {
                    return Err(format!(
                        "{} holds {got:?} for {}, which wants {want:?}",
                        self.nodes[i].name, self.nodes[j].name
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn check_quiescent(&self) -> Result<(), String> {
        self.check_one_link_per_pair()?;
        self.check_membership()?;
        self.check_interest()
    }

    /// Every publication made after a subscription was acknowledged (and from `since` on)
    /// reached that subscriber exactly once; nothing is ever delivered twice or out of order.
    /// With links that only ever close as duplicates: every publication reaches every node
    /// its publisher had a link to and whose subscription was acknowledged before it.
    pub fn check_deliveries_linked(&self) -> Result<usize, String> {
        let mut checked = 0;
        for sn in &self.nodes {
            for (origin, seq, topic, at) in &self.published {
                let linked = self
                    .linked
                    .get(&(origin.clone(), *seq))
                    .is_some_and(|l| l.contains(&sn.name));
                if !linked
                    || !sn
                        .acked
                        .values()
                        .any(|(t, ack_at)| t == topic && ack_at <= at)
                {
                    continue;
                }
                checked += 1;
                if !sn.delivered.contains_key(&(origin.clone(), *seq)) {
                    return Err(format!(
                        "{} lost {origin}:{seq} on {topic} (published at {} µs)",
                        sn.name, at
                    ));
                }
            }
        }
        self.check_deliveries(u64::MAX).map(|_| checked)
    }

    pub fn check_deliveries(&self, since: u64) -> Result<usize, String> {
        let mut checked = 0;
        for sn in &self.nodes {
            if sn.order_violations > 0 {
                return Err(format!(
                    "{}: {} publications out of per-publisher order",
                    sn.name, sn.order_violations
                ));
            }
            if let Some((k, c)) = sn.delivered.iter().find(|(_, c)| **c > 1) {
                return Err(format!("{}: {k:?} delivered {c} times", sn.name));
            }
            if sn.node.is_none() {
                continue;
            }
            for (origin, seq, topic, at) in &self.published {
                if *origin == sn.name || *at < since {
                    continue;
                }
                let acked_before = sn
                    .acked
                    .values()
                    .any(|(t, ack_at)| t == topic && ack_at <= at);
                if acked_before {
                    checked += 1;
                    if !sn.delivered.contains_key(&(origin.clone(), *seq)) {
                        return Err(format!(
                            "{} lost {origin}:{seq} on {topic} (published at {} ms)",
                            sn.name,
                            at / MS
                        ));
                    }
                }
            }
        }
        Ok(checked)
    }
}

pub const TOPICS: [&str; 6] = ["a", "b", "c", "d", "prices.eu", "prices.us"];

pub fn random_topic(rng: &mut StdRng) -> &'static str {
    TOPICS[rng.random_range(0..TOPICS.len())]
}
