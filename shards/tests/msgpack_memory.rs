//! `M:` MessagePack is converted to JSON under the size cap without a `serde_json::Value` in
//! between: a 1 MiB frame of nils (1 byte each packed, a 32-byte `Value` each decoded, 5 bytes each
//! as JSON) must not hold more than a small multiple of the cap or of its output.
//!
//! Its own test binary, with an allocator that tracks the peak of live heap bytes; one test only,
//! so nothing else allocates while it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use wse_shards::protocol::{InboundError, binary_to_json};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes `f` had live at its peak, over what was live before it.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - before)
}

#[test]
fn a_mebibyte_of_msgpack_nils_stays_within_a_few_times_the_cap() {
    const NILS: usize = 1 << 20;
    let mut frame = b"M:".to_vec();
    frame.push(0xdd); // array 32
    frame.extend_from_slice(&(NILS as u32).to_be_bytes());
    frame.extend(std::iter::repeat_n(0xc0, NILS));

    // Over the cap (1 MiB; the JSON would be 5 MiB): refused once the output reaches the cap.
    let cap = 1 << 20;
    let (result, peak) = peak_during(|| binary_to_json(&frame, cap).map(|json| json.len()));
    assert_eq!(result, Err(InboundError::InflatedTooLarge));
    assert!(peak <= 2 * cap, "peak {peak} bytes for a cap of {cap}");

    // Under the cap: the JSON itself (5 MiB) is the only large allocation, where a `Value` tree
    // alone would take 32 MiB.
    let cap = 8 << 20;
    let (result, peak) = peak_during(|| binary_to_json(&frame, cap).map(|json| json.len()));
    let len = result.expect("decodes under an 8 MiB cap");
    assert_eq!(len, 5 * NILS + 1);
    assert!(peak <= 2 * len, "peak {peak} bytes for {len} bytes of JSON");
}
