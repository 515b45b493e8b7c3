//! Distributed runs: `wse-bench agent --listen ADDR` on each load machine, and
//! `wse-bench <scenario> --agents a:port,b:port,...` as the controller.
//!
//! The controller connects to every agent, learns its descriptor budget (RLIMIT_NOFILE after
//! raising it) and cores, splits the scenario's connections in proportion to the budgets
//! ([`split_by_budget`]), and starts each agent's slice of the same workload code that a local
//! run uses ([`crate::fleet`]). It then moves all of them through the phases together — a phase
//! starts everywhere only once every agent finished the previous one (all connections open, for
//! example) — samples the server itself, and at the end merges the agents' counters and
//! HdrHistograms without loss.
//!
//! ## Protocol
//!
//! One TCP connection per agent, opened by the controller. Each message is a frame: a 4-byte
//! big-endian length, then that many bytes of JSON, an object whose `type` says what it is
//! ([`proto`]). A session is:
//!
//! ```text
//! controller                                   agent
//! {"type":"hello","version":1}            -->
//!                                         <--  {"type":"hello","version":1,"host":..,"nofile":20000,
//!                                                "cores":2,"threads":2,"sources":0,..}
//! {"type":"start","scenario":"hold",
//!  "common":{..},"args":{..},"secret":..,
//!  "slice":{"offset":15000,"count":15000},
//!  "sources":"127.0.1.1,..."|null}        -->
//!                                         <--  {"type":"started","threads":2}
//!                                         <--  {"type":"progress","opened":..,"ready":..,..}  (every 100 ms while it changes)
//! {"type":"phase","phase":"measure"}      -->  (open → warmup → measure → stop)
//! {"type":"finish"}                       -->
//!                                         <--  {"type":"result","part":{..},"loadgen":{..}}
//! ```
//!
//! `part` is the workload's figures: integers, and histograms in HdrHistogram's V2 encoding
//! (deflated, base64). An agent answers anything it cannot do with `{"type":"error"}`. It serves
//! one controller at a time; when the controller goes away mid-run the agent stops its
//! connections and waits for the next. The protocol carries the JWT secret in clear and has no
//! authentication: agents belong on a private network.

pub mod agent;
pub mod controller;
pub mod proto;

use std::net::IpAddr;

/// Splits `n` connections between agents in proportion to their descriptor `budgets`, so each
/// agent is as full as the others. Rounding goes to the largest remainders (then the first
/// agents), so the shares always add up to `n`, and no share exceeds its budget while `n` fits
/// in the total. When it does not fit, shares stay proportional (the caller says so). With no
/// budget anywhere the split is even.
pub fn split_by_budget(n: usize, budgets: &[u64]) -> Vec<usize> {
    let k = budgets.len();
    if k == 0 {
        return Vec::new();
    }
    let total: u128 = budgets.iter().map(|&b| u128::from(b)).sum();
    let weights: Vec<u128> = if total == 0 {
        vec![1; k]
    } else {
        budgets.iter().map(|&b| u128::from(b)).collect()
    };
    let wsum: u128 = weights.iter().sum();
    let n128 = n as u128;
    let mut shares: Vec<usize> = weights.iter().map(|w| (n128 * w / wsum) as usize).collect();
    let mut rest = n - shares.iter().sum::<usize>();
    // Largest fractional part first; the sort is stable, so ties go to the earlier agent.
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(n128 * weights[i] % wsum));
    for &i in order.iter().cycle() {
        if rest == 0 {
            break;
        }
        shares[i] += 1;
        rest -= 1;
    }
    shares
}

/// Splits a source-address pool into `k` disjoint contiguous chunks (as even as possible), so
/// agents on one machine never share a source address. Agents get an empty chunk when the pool
/// has fewer than `k` addresses.
pub fn split_pool(pool: &[IpAddr], k: usize) -> Vec<Vec<IpAddr>> {
    let sizes = split_by_budget(pool.len(), &vec![1; k]);
    let mut out = Vec::with_capacity(k);
    let mut at = 0;
    for s in sizes {
        out.push(pool[at..at + s].to_vec());
        at += s;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_budgets_and_add_up() {
        assert_eq!(split_by_budget(60_000, &[19_936; 4]), [15_000; 4]);
        assert_eq!(split_by_budget(10, &[100, 300]), [3, 7]);
        // Remainders go to the largest fractions: 7 * (1/3, 1/3, 1/3) = 2.33 each.
        assert_eq!(split_by_budget(7, &[5, 5, 5]), [3, 2, 2]);
        assert_eq!(split_by_budget(0, &[5, 5]), [0, 0]);
        assert!(split_by_budget(5, &[]).is_empty());
        // No budget reported anywhere: even split.
        assert_eq!(split_by_budget(5, &[0, 0]), [3, 2]);
        // An agent with no budget gets nothing while others have room.
        assert_eq!(split_by_budget(10, &[0, 20]), [0, 10]);
    }

    #[test]
    fn shares_never_exceed_budgets_when_the_total_fits() {
        let budgets_sets: [&[u64]; 5] = [
            &[1, 1, 1],
            &[19_936, 1_000, 65_472],
            &[7, 13, 29, 31],
            &[1_000_000, 1],
            &[3, 3, 3, 3, 3, 3, 3],
        ];
        for budgets in budgets_sets {
            let total: u64 = budgets.iter().sum();
            for n in (0..=total)
                .step_by((total / 97).max(1) as usize)
                .chain([total])
            {
                let shares = split_by_budget(n as usize, budgets);
                assert_eq!(shares.iter().sum::<usize>(), n as usize, "{budgets:?} {n}");
                for (s, b) in shares.iter().zip(budgets) {
                    assert!(*s as u64 <= *b, "{budgets:?} n={n}: {shares:?}");
                    // Proportional to within one connection.
                    let exact = n as f64 * *b as f64 / total as f64;
                    assert!(
                        (*s as f64 - exact).abs() < 1.0,
                        "{budgets:?} n={n}: {shares:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn over_budget_stays_proportional() {
        let shares = split_by_budget(100, &[10, 30]);
        assert_eq!(shares, [25, 75]);
    }

    #[test]
    fn pools_split_disjoint() {
        let pool: Vec<IpAddr> = (2..=11).map(|i| IpAddr::from([127, 0, 0, i])).collect();
        let chunks = split_pool(&pool, 3);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [4, 3, 3]);
        assert_eq!(chunks.concat(), pool);
        let chunks = split_pool(&pool[..1], 2);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [1, 0]);
    }
}
