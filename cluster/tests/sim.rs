//! Deterministic simulation of the protocol core: N nodes on a simulated network with seeded
//! delays, resets, partitions (blackholes), kills and restarts, on a virtual clock. Every run
//! is bounded in events and virtual time, and replays exactly from its seed.
//!
//! Invariants checked: one link per pair at quiescence (the same connection at both ends),
//! membership converges (every live node Alive at its current incarnation everywhere, killed
//! ones Dead), the interest a node holds for a peer equals that peer's own after sync, and no
//! publication is lost or duplicated between acknowledged subscribers while links are up.

mod common;

use common::*;
use rand::Rng;
use std::collections::BTreeSet;
use wse_cluster::wire::MemberState;

/// Joins by one seed form the full mesh; then, with links up and random delays, subscriptions
/// (exact and glob) and publications interleave: nothing acknowledged is missed.
fn run_stable(seed: u64, n: usize, psk: bool) {
    let mut sim = Sim::new(n, seed, (100, 5 * MS), psk);
    sim.run_until(10 * SEC);
    sim.check_quiescent()
        .unwrap_or_else(|e| panic!("seed {seed}: mesh after 10 s: {e}"));
    let start = sim.now;
    for step in 0..400 {
        let i = sim.rng.random_range(0..n);
        if sim.rng.random_bool(0.15) {
            let t = if sim.rng.random_bool(0.2) {
                "prices.*"
            } else {
                random_topic(&mut sim.rng)
            };
            sim.subscribe(i, t);
        } else {
            let t = random_topic(&mut sim.rng);
            sim.publish(i, t);
        }
        let until = sim.now + sim.rng.random_range(0..3 * MS);
        sim.run_until(until);
        let _ = step;
    }
    sim.run_until(sim.now + 5 * SEC);
    sim.check_quiescent()
        .unwrap_or_else(|e| panic!("seed {seed}: after traffic: {e}"));
    let checked = sim
        .check_deliveries(start)
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    assert!(
        checked > 50,
        "seed {seed}: only {checked} deliveries checked"
    );
    for sn in &sim.nodes {
        let st = sn.node.as_ref().unwrap().stats();
        assert_eq!(
            st.sub_ack_timeouts, 0,
            "seed {seed}: {} timed out acks with links up",
            sn.name
        );
    }
}

/// Seeds per test: a few in CI; `WSE_SIM_SEEDS=500` explores more locally, `WSE_SIM_SEEDS=48..49`
/// replays one.
fn seeds(default: u64) -> std::ops::Range<u64> {
    let v = std::env::var("WSE_SIM_SEEDS").unwrap_or_default();
    match v.split_once("..") {
        Some((a, b)) => a.parse().unwrap_or(0)..b.parse().unwrap_or(0),
        None => 0..v.parse().unwrap_or(default),
    }
}

#[test]
fn join_by_one_seed_and_no_loss_with_links_up() {
    for seed in seeds(12) {
        run_stable(seed, 4, seed.is_multiple_of(2));
    }
}

/// Every node lists every other as a seed and all start at once, with traffic from the first
/// instant: concurrent dials make duplicate sessions everywhere. No faults, so every link that
/// closes closes as a duplicate; nothing a publisher sent to a peer it was linked to is lost.
fn run_dial_storm(seed: u64, n: usize) {
    let cfgs = (0..n)
        .map(|i| {
            let mut c = config(i, n, seed.is_multiple_of(2));
            c.seeds = (0..n)
                .filter(|&j| j != i)
                .map(|j| format!("10.0.0.{j}:9999"))
                .collect();
            c
        })
        .collect();
    let mut sim = Sim::with_configs(cfgs, seed, (100, 4 * MS));
    for _ in 0..600 {
        let i = sim.rng.random_range(0..n);
        if sim.rng.random_bool(0.1) {
            let t = random_topic(&mut sim.rng);
            sim.subscribe(i, t);
        } else {
            let t = random_topic(&mut sim.rng);
            sim.publish(i, t);
        }
        let until = sim.now + sim.rng.random_range(0..MS);
        sim.run_until(until);
    }
    sim.run_until(sim.now + 10 * SEC);
    sim.check_quiescent()
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let checked = sim
        .check_deliveries_linked()
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let dups: u64 = sim
        .nodes
        .iter()
        .map(|s| s.node.as_ref().unwrap().stats().duplicates_closed)
        .sum();
    assert!(checked > 100, "seed {seed}: {checked} checked");
    assert!(dups > 0, "seed {seed}: the storm made no duplicate");
}

#[test]
fn dial_storm_loses_nothing_between_linked_nodes() {
    for seed in seeds(24) {
        run_dial_storm(seed, 5);
    }
}

/// Delays, resets, partitions, kills and restarts; then the network heals and the cluster must
/// settle: one link per pair, converged membership, equal interest, and delivery again.
fn run_chaos(seed: u64, n: usize) {
    let mut sim = Sim::new(n, seed, (100, 20 * MS), seed.is_multiple_of(3));
    sim.run_until(5 * SEC);
    for i in 0..n {
        let t = random_topic(&mut sim.rng);
        sim.subscribe(i, t);
    }
    let mut killed = BTreeSet::new();
    let fault_end = 60 * SEC;
    while sim.now < fault_end {
        let r = sim.rng.random_range(0..100);
        let i = sim.rng.random_range(0..n);
        match r {
            0..=4 => sim.reset_random_link(),
            5..=7 => {
                let j = sim.rng.random_range(0..n);
                if i != j {
                    sim.blocked.insert((i.min(j), i.max(j)));
                }
            }
            8..=10 => sim.heal(),
            11 if killed.len() + 2 < n && sim.alive(i) => {
                sim.kill(i);
                killed.insert(i);
            }
            12..=13 if killed.contains(&i) => {
                sim.restart(i);
                killed.remove(&i);
            }
            14..=20 => {
                let t = random_topic(&mut sim.rng);
                sim.subscribe(i, t);
            }
            _ => {
                let t = random_topic(&mut sim.rng);
                if sim.alive(i) {
                    sim.publish(i, t);
                }
            }
        }
        let until = sim.now + sim.rng.random_range(10 * MS..400 * MS);
        sim.run_until(until);
    }
    // Heal: no more faults; one killed node stays dead, the others come back.
    sim.heal();
    let stay_dead = killed.iter().next().copied();
    for &i in &killed {
        if Some(i) != stay_dead {
            sim.restart(i);
        }
    }
    // Long enough for suspicion, open breakers (≤ 30 s ± 20 %) and rejoin rounds.
    sim.run_until(sim.now + 90 * SEC);
    sim.check_quiescent()
        .unwrap_or_else(|e| panic!("seed {seed}: after heal: {e}"));
    let start = sim.now;
    for _ in 0..100 {
        let i = sim.rng.random_range(0..n);
        if sim.alive(i) {
            let t = random_topic(&mut sim.rng);
            sim.publish(i, t);
        }
        let until = sim.now + sim.rng.random_range(0..5 * MS);
        sim.run_until(until);
    }
    sim.run_until(sim.now + 5 * SEC);
    sim.check_deliveries(start)
        .unwrap_or_else(|e| panic!("seed {seed}: after heal: {e}"));
}

#[test]
fn chaos_then_heal_converges() {
    // `WSE_SIM_NODES=8` tries larger meshes locally.
    let n = std::env::var("WSE_SIM_NODES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    for seed in seeds(10) {
        run_chaos(seed, n);
    }
}

/// `kill -9`: sockets close at once, so every peer confirms the suspicion and the node is Dead
/// within ~2 s; a silent hang (a blackhole) takes link timeout + suspicion, ~7 s at most.
#[test]
fn failure_detection_times() {
    for seed in 0..4 {
        let mut sim = Sim::new(4, seed, (100, 2 * MS), false);
        sim.run_until(10 * SEC);
        sim.check_quiescent().unwrap();
        let t0 = sim.now;
        sim.kill(3);
        let dead_at = |sim: &Sim| {
            (0..3).all(|i| {
                sim.nodes[i]
                    .node
                    .as_ref()
                    .unwrap()
                    .members()
                    .iter()
                    .any(|m| m.name == "n3" && m.state == MemberState::Dead)
            })
        };
        while !dead_at(&sim) {
            assert!(
                sim.now < t0 + 2 * SEC,
                "seed {seed}: kill -9 not detected within 2 s"
            );
            sim.run_until(sim.now + TICK);
        }
        let kill_ms = (sim.now - t0) / MS;

        let mut sim = Sim::new(4, seed, (100, 2 * MS), false);
        sim.run_until(10 * SEC);
        let t0 = sim.now;
        for i in 0..3 {
            sim.blocked.insert((i, 3));
        }
        while !dead_at(&sim) {
            assert!(
                sim.now < t0 + 8 * SEC,
                "seed {seed}: partition not detected within 8 s"
            );
            sim.run_until(sim.now + TICK);
        }
        let hang_ms = (sim.now - t0) / MS;
        println!(
            "seed {seed}: kill -9 → Dead everywhere in {kill_ms} ms; blackhole in {hang_ms} ms"
        );
        // Heal: the partitioned node refutes and rejoins.
        sim.heal();
        sim.run_until(sim.now + 60 * SEC);
        sim.check_quiescent()
            .unwrap_or_else(|e| panic!("seed {seed}: after heal: {e}"));
    }
}
