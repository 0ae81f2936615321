//! Sliding windows of call outcomes.
//!
//! Two shapes, both lock-free:
//!
//! - [`TimeWindow`]: the last `T`, cut into buckets. Every thread writes to its own stripe (a
//!   row of bucket words on cache lines no other stripe touches). A success is one
//!   uncontended add to the stripe's pending count, filed under a bucket at the stripe's next
//!   clock read (every 64 successes or its next failure); a failure is one uncontended
//!   compare-and-swap. Reading the totals (only on failures, and for snapshots) sums every
//!   stripe.
//! - [`CountWindow`]: exactly the last `N` calls, as a ring of outcome slots with one shared
//!   cursor. Exact, but every call touches the cursor, so it does not scale across cores like
//!   the time window does; it is meant for low-rate upstreams.

use std::sync::atomic::{
    AtomicU64, AtomicU8,
    Ordering::{Acquire, Relaxed, Release},
};

/// Totals over the window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
}

#[derive(Debug)]
pub(crate) enum Window {
    Time(TimeWindow),
    Count(CountWindow),
}

/// Successes a stripe of the time window (or the count window's cursor) takes between two
/// clock reads.
pub(crate) const CLOCK_EVERY: u64 = 64;

impl Window {
    /// Records a success without reading the clock. Returns true when the caller should read
    /// the clock and call [`tick`](Self::tick) (every [`CLOCK_EVERY`] calls of a stripe).
    #[inline]
    pub(crate) fn record_success(&self, stripe: usize) -> bool {
        match self {
            Window::Time(w) => w.record_pending(stripe),
            Window::Count(w) => w.record(false) % CLOCK_EVERY == 0,
        }
    }

    /// Records a failure (at `now_ms`).
    pub(crate) fn record_failure(&self, stripe: usize, now_ms: u64) {
        match self {
            Window::Time(w) => w.record(stripe, now_ms, true),
            Window::Count(w) => {
                w.record(true);
            }
        }
    }

    /// Files a stripe's pending successes under the bucket of `now_ms`.
    pub(crate) fn tick(&self, stripe: usize, now_ms: u64) {
        if let Window::Time(w) = self {
            w.fold(stripe, now_ms);
        }
    }

    pub(crate) fn totals(&self, now_ms: u64) -> Totals {
        match self {
            Window::Time(w) => w.totals(now_ms),
            Window::Count(w) => w.totals(),
        }
    }

    /// Forgets every outcome (when the circuit closes again).
    pub(crate) fn reset(&self) {
        match self {
            Window::Time(w) => w.reset(),
            Window::Count(w) => w.reset(),
        }
    }
}

// A bucket word: [tag: 20 bits][calls: 22 bits][failures: 22 bits]. The tag is the low bits of
// the bucket's number (time / bucket width), so a slot left over from an earlier lap of the
// ring reads as empty. Counts saturate (4 million per stripe per bucket).
const COUNT_BITS: u32 = 22;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const TAG_MASK: u64 = (1 << (64 - 2 * COUNT_BITS)) - 1;

#[inline]
fn unpack(w: u64) -> (u64, u64, u64) {
    (
        w >> (2 * COUNT_BITS),
        (w >> COUNT_BITS) & COUNT_MAX,
        w & COUNT_MAX,
    )
}

#[inline]
fn pack(tag: u64, calls: u64, failures: u64) -> u64 {
    (tag << (2 * COUNT_BITS)) | (calls << COUNT_BITS) | failures
}

#[derive(Debug)]
pub(crate) struct TimeWindow {
    bucket_ms: u64,
    /// `u64::MAX / bucket_ms`: divides by a multiplication on the hot path.
    reciprocal: u64,
    buckets: usize,
    /// Slots per stripe: `buckets` rounded up to a power of two, so a slot is found by masking.
    ring: usize,
    /// Distance between two stripes' rows, in words. After 8 words of padding (away from
    /// whatever the allocator put before), a row is the pending-successes word, 7 words of
    /// padding, the `ring` bucket slots and 8 more words of padding: two stripes never share
    /// a cache line, nor does a stripe with anything else.
    stride: usize,
    /// A power of two.
    stripes: usize,
    words: Box<[AtomicU64]>,
}

impl TimeWindow {
    pub(crate) fn new(bucket_ms: u64, buckets: usize, stripes: usize) -> Self {
        let bucket_ms = bucket_ms.max(1);
        let ring = buckets.next_power_of_two();
        let stripes = stripes.next_power_of_two();
        let stride = ring + 16;
        TimeWindow {
            bucket_ms,
            reciprocal: u64::MAX / bucket_ms,
            buckets,
            ring,
            stride,
            stripes,
            words: (0..8 + stride * stripes)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// `now_ms / bucket_ms`, without a division instruction.
    #[inline]
    fn bucket(&self, now_ms: u64) -> u64 {
        let q = ((u128::from(now_ms) * u128::from(self.reciprocal)) >> 64) as u64;
        // `q` is the quotient or one less.
        if (q + 1) * self.bucket_ms <= now_ms {
            q + 1
        } else {
            q
        }
    }

    #[inline]
    fn slot(&self, stripe: usize, bucket: u64) -> &AtomicU64 {
        let i =
            16 + (stripe & (self.stripes - 1)) * self.stride + (bucket as usize & (self.ring - 1));
        &self.words[i]
    }

    /// The stripe's count of successes not yet filed under a bucket (word 0 of its row).
    #[inline]
    fn pending(&self, stripe: usize) -> &AtomicU64 {
        &self.words[8 + (stripe & (self.stripes - 1)) * self.stride]
    }

    /// The newest bucket the stripe has written (word 1 of its row, in the pending word's
    /// padding). A tag is only the low bits of a bucket's number: a slot last written
    /// 2^20 buckets ago has the tag of a bucket in the window. Slots of buckets newer than
    /// this are not read, and every slot a stripe's newest bucket passes is cleared.
    #[inline]
    fn newest(&self, stripe: usize) -> &AtomicU64 {
        &self.words[9 + (stripe & (self.stripes - 1)) * self.stride]
    }

    /// Moves the stripe's newest bucket up to `bucket`, clearing the slots of the buckets
    /// it passes (those are about to be reused; what they hold is from an earlier lap).
    ///
    /// A slot is cleared only if it still holds what it held before the move: another
    /// thread of the stripe that sees the move writes its (current) sample into those
    /// slots at once, and a tag cannot tell that sample from one of an earlier lap. The
    /// slots are read before the move is published (release), so none of those samples is
    /// among what was read.
    #[inline]
    fn advance(&self, stripe: usize, bucket: u64) {
        let newest = self.newest(stripe);
        let mut cur = newest.load(Acquire);
        let mut stale = Vec::new();
        while bucket > cur {
            stale.clear();
            let from = (cur + 1).max((bucket + 1).saturating_sub(self.ring as u64));
            for b in from..=bucket {
                let w = self.slot(stripe, b).load(Relaxed);
                if w != 0 && unpack(w).0 == b & TAG_MASK {
                    stale.push((b, w));
                }
            }
            match newest.compare_exchange_weak(cur, bucket, Release, Acquire) {
                Ok(_) => {
                    for (b, w) in stale {
                        let _ = self
                            .slot(stripe, b)
                            .compare_exchange(w, 0, Relaxed, Relaxed);
                    }
                    return;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// A success, counted without a clock read; filed under a bucket at the stripe's next
    /// clock read (every [`CLOCK_EVERY`] successes, or its next failure). Filing them under
    /// the bucket of that read can only make them look more recent than they were: the
    /// failure rate is never overstated, and a partial outage is seen at most that many
    /// calls late.
    #[inline]
    pub(crate) fn record_pending(&self, stripe: usize) -> bool {
        self.pending(stripe).fetch_add(1, Relaxed) + 1 >= CLOCK_EVERY
    }

    pub(crate) fn fold(&self, stripe: usize, now_ms: u64) {
        let n = self.pending(stripe).swap(0, Relaxed);
        if n > 0 {
            self.add(stripe, now_ms, n, 0);
        }
    }

    pub(crate) fn record(&self, stripe: usize, now_ms: u64, failure: bool) {
        let n = self.pending(stripe).swap(0, Relaxed);
        self.add(stripe, now_ms, n + 1, u64::from(failure));
    }

    fn add(&self, stripe: usize, now_ms: u64, calls_add: u64, failures_add: u64) {
        let bucket = self.bucket(now_ms);
        self.advance(stripe, bucket);
        let tag = bucket & TAG_MASK;
        let slot = self.slot(stripe, bucket);
        let mut cur = slot.load(Relaxed);
        loop {
            let (t, calls, failures) = unpack(cur);
            let (calls, failures) = if t == tag { (calls, failures) } else { (0, 0) };
            if calls == COUNT_MAX {
                return;
            }
            let new = pack(
                tag,
                (calls + calls_add).min(COUNT_MAX),
                (failures + failures_add).min(COUNT_MAX),
            );
            match slot.compare_exchange_weak(cur, new, Relaxed, Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    pub(crate) fn totals(&self, now_ms: u64) -> Totals {
        let now = self.bucket(now_ms);
        let mut totals = Totals::default();
        for stripe in 0..self.stripes {
            totals.calls += self.pending(stripe).load(Relaxed);
            let newest = self.newest(stripe).load(Relaxed);
            for back in 0..(self.buckets as u64).min(now + 1) {
                let bucket = now - back;
                if bucket > newest {
                    continue;
                }
                let (tag, calls, failures) = unpack(self.slot(stripe, bucket).load(Relaxed));
                if tag == bucket & TAG_MASK {
                    totals.calls += calls;
                    totals.failures += failures;
                }
            }
        }
        totals
    }

    fn reset(&self) {
        for w in self.words.iter() {
            w.store(0, Relaxed);
        }
    }
}

const EMPTY: u8 = 0;
const SUCCESS: u8 = 1;
const FAILURE: u8 = 2;

#[derive(Debug)]
pub(crate) struct CountWindow {
    cursor: AtomicU64,
    slots: Box<[AtomicU8]>,
    /// `calls << 32 | failures`, kept in step with the slots by wrapping adds.
    totals: AtomicU64,
}

impl CountWindow {
    pub(crate) fn new(size: usize) -> Self {
        CountWindow {
            cursor: AtomicU64::new(0),
            slots: (0..size.max(1)).map(|_| AtomicU8::new(EMPTY)).collect(),
            totals: AtomicU64::new(0),
        }
    }

    /// Records an outcome; returns the cursor before it.
    pub(crate) fn record(&self, failure: bool) -> u64 {
        let cursor = self.cursor.fetch_add(1, Relaxed);
        let i = cursor % self.slots.len() as u64;
        let new = if failure { FAILURE } else { SUCCESS };
        let old = self.slots[i as usize].swap(new, Relaxed);
        let calls: u64 = u64::from(old == EMPTY);
        let delta = (calls << 32)
            .wrapping_add(u64::from(failure))
            .wrapping_sub(u64::from(old == FAILURE));
        if delta != 0 {
            self.totals.fetch_add(delta, Relaxed);
        }
        cursor
    }

    pub(crate) fn totals(&self) -> Totals {
        let w = self.totals.load(Relaxed);
        // A slot's failure may be taken off before the add that put it there is applied:
        // the failures half is then below zero (as an `i32`), and has borrowed one from the
        // calls half.
        let failures = (w as u32 as i32).max(0) as u64;
        let calls = (w >> 32) + u64::from((w as u32 as i32) < 0);
        // A concurrent swap may be half applied; never report more failures than calls.
        Totals {
            calls,
            failures: failures.min(calls),
        }
    }

    fn reset(&self) {
        for s in self.slots.iter() {
            s.store(EMPTY, Relaxed);
        }
        self.totals.store(0, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_window_slides() {
        let w = TimeWindow::new(1000, 10, 4);
        for s in 0..4 {
            w.record(s, 500, s == 0);
        }
        assert_eq!(
            w.totals(900),
            Totals {
                calls: 4,
                failures: 1
            }
        );
        w.record(1, 9_999, true);
        assert_eq!(w.totals(9_999).calls, 5);
        // Bucket 0 has left the window.
        assert_eq!(
            w.totals(10_000),
            Totals {
                calls: 1,
                failures: 1
            }
        );
        // The slot of bucket 0 is reused for bucket 10 and starts from zero.
        w.record(0, 10_001, false);
        assert_eq!(w.totals(10_001).calls, 2);
        w.reset();
        assert_eq!(w.totals(10_001), Totals::default());
    }

    /// A tag is the low 20 bits of a bucket's number: what a stripe wrote 2^20 buckets ago
    /// has the tag of a bucket in the window, and is not a sample of it.
    #[test]
    fn a_slot_from_2_pow_20_buckets_ago_is_not_in_the_window() {
        let lap = 1u64 << 20;
        let w = TimeWindow::new(1, 10, 2);
        w.record(0, 5, true);
        // Stripe 0 has not written since.
        assert_eq!(w.totals(lap + 5), Totals::default());
        // Stripe 0 writes again, in another slot, before the bucket of the old failure.
        w.record(0, lap + 3, false);
        assert_eq!(
            w.totals(lap + 5),
            Totals {
                calls: 1,
                failures: 0
            }
        );
        // And after it.
        w.record(0, lap + 6, false);
        assert_eq!(
            w.totals(lap + 6),
            Totals {
                calls: 2,
                failures: 0
            }
        );
    }

    #[test]
    fn bucket_is_the_quotient() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for d in [1u64, 3, 7, 100, 333, 1000, 1024, 6000, 86_400_000] {
            let w = TimeWindow::new(d, 10, 2);
            for _ in 0..10_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let n = x >> 24; // up to 2^40 ms
                assert_eq!(w.bucket(n), n / d, "{n} / {d}");
            }
            for n in [0, d - 1, d, d + 1, 2 * d - 1, 2 * d] {
                assert_eq!(w.bucket(n), n / d);
            }
        }
    }

    /// Thread A writes a failure in a slot and is preempted before adding it to the totals;
    /// thread B, a lap later, overwrites that slot with a success and takes the failure off
    /// first. With no other failure in the window, the failures half goes below zero for a
    /// moment: that is no failure at all, not every call a failure.
    #[test]
    fn count_window_totals_survive_a_failure_taken_off_before_it_was_added() {
        let w = CountWindow::new(4);
        for _ in 0..4 {
            w.record(false);
        }
        // A: slot 0 becomes a failure (its +1 not applied yet).
        w.slots[0].store(FAILURE, Relaxed);
        // B: slot 0 becomes a success again, and its -1 is applied.
        w.slots[0].store(SUCCESS, Relaxed);
        w.totals.fetch_add(0u64.wrapping_sub(1), Relaxed);
        assert_eq!(
            w.totals(),
            Totals {
                calls: 4,
                failures: 0
            }
        );
        // A's +1 lands.
        w.totals.fetch_add(1, Relaxed);
        assert_eq!(
            w.totals(),
            Totals {
                calls: 4,
                failures: 0
            }
        );
    }

    #[test]
    fn count_window_keeps_last_n() {
        let w = CountWindow::new(3);
        w.record(true);
        w.record(true);
        w.record(false);
        assert_eq!(
            w.totals(),
            Totals {
                calls: 3,
                failures: 2
            }
        );
        w.record(false);
        w.record(false);
        assert_eq!(
            w.totals(),
            Totals {
                calls: 3,
                failures: 0
            }
        );
        w.record(true);
        assert_eq!(w.totals().failures, 1);
    }

    /// Two threads on one stripe reach a new bucket together: one moves the stripe's newest
    /// bucket and clears the slots it passes, the other sees the move and writes its sample
    /// there at once. The clearing must not take that sample (a current one) away.
    #[test]
    fn advancing_a_stripe_keeps_a_sample_written_meanwhile() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        const BUCKETS: u64 = 256;
        for _ in 0..100 {
            let w = Arc::new(TimeWindow::new(1, BUCKETS as usize, 1));
            let step = Arc::new(AtomicUsize::new(0));
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let (w, step) = (w.clone(), step.clone());
                    std::thread::spawn(move || {
                        for b in 1..BUCKETS {
                            w.record(0, b, true);
                            let arrived = step.fetch_add(1, Relaxed) + 1;
                            let target = 2 * b as usize;
                            if arrived < target {
                                while step.load(Relaxed) < target {
                                    std::thread::yield_now();
                                }
                            }
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let t = w.totals(BUCKETS - 1);
            assert_eq!(t.failures, 2 * (BUCKETS - 1), "{t:?}");
        }
    }
}
