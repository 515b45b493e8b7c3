//! How the cross-shard fabric's memory is split (`limits.fabric_memory_per_shard`), worked out
//! from the configuration alone, so the configuration can be checked before anything starts.
//!
//! Owns: the arithmetic and the constants it rests on. Never: allocates (the fabric builds the
//! queues this plan sizes, `fabric::grid`).

/// Bytes of one queue slot: one `fabric::FabricMsg`, which the fabric asserts fits (a cache
/// line).
pub const SLOT_BYTES: usize = 64;
/// Fabric participants besides the shards: the control plane, and the cluster core (the
/// binary's thread that runs the cluster mesh, `Server::take_cluster_endpoint`).
pub const EXTRA_PARTICIPANTS: usize = 2;

/// The cluster core's index in the grid of a server with `shards` shards (after the shards and
/// the control plane).
pub const fn cluster_participant(shards: usize) -> usize {
    shards + 1
}
/// Fewest entries a queue may have: below this a burst goes to overflow at once.
pub const QUEUE_CAPACITY_MIN: usize = 64;
/// The share of a participant's budget its outbound queues' slots may take: 1/8. The rest is for
/// bytes in flight.
const RING_SHARE_DIVISOR: usize = 8;

/// How a participant's memory budget is split, worked out once at start.
///
/// Every participant (each shard, the control plane, the cluster core) gets the same budget:
/// up to 1/8 of it for the slots of its outbound queues, the rest for bytes in flight. The
/// fabric as a whole is bounded by `participants × per-participant budget`: linear in the shard
/// count, although there is a queue for each of the `participants²` ordered pairs — the queues
/// get shorter as shards are added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Shards plus [`EXTRA_PARTICIPANTS`].
    pub participants: usize,
    /// Entries in each queue.
    pub capacity: usize,
    /// Bytes of every queue's slots together (`participants × (participants − 1) × capacity ×
    /// SLOT_BYTES`).
    pub ring_bytes: u64,
    /// Bytes one participant may have in flight: its budget less its queues' slots.
    pub inflight_max: u64,
    /// What the whole fabric may hold: `participants × budget`.
    pub total_bytes: u64,
}

/// Why a [`Plan`] cannot be made: the budget does not leave queues of [`QUEUE_CAPACITY_MIN`]
/// entries within their share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "{shards} shards need at least {needed} bytes per shard for queues of {QUEUE_CAPACITY_MIN} entries"
)]
pub struct PlanError {
    /// The shard count the budget was split for.
    pub shards: usize,
    /// The smallest `limits.fabric_memory_per_shard` that would do, in bytes.
    pub needed: u64,
}

impl Plan {
    /// Splits `budget` bytes per participant among `shards + EXTRA_PARTICIPANTS` participants;
    /// queues get `capacity_max` entries or what their share allows, whichever is fewer.
    ///
    /// # Errors
    /// When a queue of [`QUEUE_CAPACITY_MIN`] entries does not fit the share.
    pub fn new(shards: usize, budget: usize, capacity_max: usize) -> Result<Plan, PlanError> {
        let participants = shards + EXTRA_PARTICIPANTS;
        let peers = participants - 1;
        let ring_share = budget / RING_SHARE_DIVISOR;
        let capacity = (ring_share / (peers * SLOT_BYTES)).min(capacity_max);
        if capacity < QUEUE_CAPACITY_MIN {
            return Err(PlanError {
                shards,
                needed: (peers * SLOT_BYTES * QUEUE_CAPACITY_MIN * RING_SHARE_DIVISOR) as u64,
            });
        }
        let own_rings = (peers * capacity * SLOT_BYTES) as u64;
        Ok(Plan {
            participants,
            capacity,
            ring_bytes: participants as u64 * own_rings,
            inflight_max: budget as u64 - own_rings,
            total_bytes: (participants * budget) as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_keeps_the_fabric_linear_in_shards() {
        const MIB: usize = 1 << 20;
        let budget = 64 * MIB;
        // Few shards: the queues keep their configured length.
        let p = Plan::new(2, budget, 16_384).unwrap();
        assert_eq!(p.participants, 4);
        assert_eq!(p.capacity, 16_384);
        assert_eq!(p.inflight_max, (budget - 3 * 16_384 * SLOT_BYTES) as u64);
        for shards in [16, 64, 128, 256] {
            let p = Plan::new(shards, budget, 16_384).unwrap();
            let peers = (p.participants - 1) as u64;
            // Each participant's queues stay within an eighth of its budget...
            assert!(peers * p.capacity as u64 * SLOT_BYTES as u64 <= (budget / 8) as u64);
            // ... and the whole fabric within participants × budget.
            assert!(p.ring_bytes + p.participants as u64 * p.inflight_max <= p.total_bytes);
            assert_eq!(p.total_bytes, ((shards + 2) * budget) as u64);
        }
        let e = Plan::new(256, MIB, 16_384).unwrap_err();
        assert_eq!(e.needed, (257 * SLOT_BYTES * QUEUE_CAPACITY_MIN * 8) as u64);
        assert!(Plan::new(256, e.needed as usize, 16_384).is_ok());
    }
}
