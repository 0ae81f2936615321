//! The retry budget: retries allowed up to a ratio of recent first attempts, plus a floor.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::ConfigError;

/// Number of time slots the window is split into.
const SLOTS: usize = 10;
/// Number of stripes the counters are spread over, so that cores don't share a cache line.
pub(crate) const STRIPES: usize = 8;
/// Fixed-point scale: one retry is worth `PPM` units; a first attempt deposits
/// `ratio × PPM` units (rounded to the nearest unit).
const PPM: i128 = 1_000_000;
/// Smallest ratio that does not round to zero deposits.
const MIN_RATIO: f64 = 1.0 / PPM as f64;

/// A retry budget shared by every clone of a [`Retry`](super::Retry) service.
///
/// Retries are allowed while
/// `retries in the window < ratio × first attempts in the window + min_per_second × window`
/// (the Finagle and Linkerd model: the floor lets a quiet service still retry, the ratio
/// bounds the extra load a failing upstream sees to `ratio` of the real traffic). The default
/// is 20 %, 10 retries per second, over 10 seconds.
///
/// The window is split into 10 slots; first attempts are counted per slot in per-thread
/// stripes of atomics (no lock, no shared cache line on the hot path: every request
/// deposits), retries in one row of atomics (only failing requests withdraw). The
/// arithmetic is in integers scaled by 10⁶, so any ratio in (0, 10] is exact to a millionth
/// (tower's `TpsBudget` over-allocates for fractional ratios, tower#857).
///
/// A deposit does not read the clock: each stripe counts its deposits in a batch stamped
/// with the time of the batch's first deposit, and only every 16th deposit of a stripe
/// reads the clock to start a new batch. A deposit is thus dated no later than it happened:
/// it may leave the window early, never late, so the budget never allows more than its
/// configuration says. (A thread that deposits less than 16 times per window has its later
/// deposits dated too early, and mostly lost; at such rates the per-second floor is what
/// allows retries anyway.)
///
/// A budget is cheap to clone (an `Arc`); clones share the same state. Every `layer()` call
/// of one [`RetryLayer`](super::RetryLayer) uses the budget made at `build()`.
///
/// ```
/// use std::time::Duration;
/// use tower_upstream::RetryBudget;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let budget = RetryBudget::builder()
///     .ratio(0.5)
///     .min_per_second(0)
///     .window(Duration::from_secs(10))
///     .build()
///     .unwrap();
/// budget.deposit();
/// budget.deposit();
/// assert_eq!(budget.balance(), 1); // two first attempts at 50 % allow one retry
/// assert!(budget.withdraw());
/// assert!(!budget.withdraw());
/// assert_eq!(budget.exhausted(), 1);
/// # }
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

/// Deposits a stripe counts in one batch before it reads the clock again.
const BATCH: u64 = 16;

/// One cache line (two on CPUs with 64-byte lines, which prefetch in pairs) of counters.
#[repr(align(128))]
struct Slots([AtomicU64; SLOTS]);

impl Slots {
    fn new() -> Self {
        Slots(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

/// One stripe of first attempts: its slots, and the batch being counted (same word layout,
/// tag = the tick of the batch's first deposit), on the stripe's own cache line(s).
#[repr(align(128))]
struct Stripe {
    slots: [AtomicU64; SLOTS],
    batch: AtomicU64,
}

impl Stripe {
    fn new() -> Self {
        Stripe {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            batch: AtomicU64::new(0),
        }
    }
}

struct Inner {
    origin: Instant,
    /// `ceil(2⁶⁴ / slot width in ms)`: a tick is `ms × this >> 64`, a multiply instead of
    /// a division on every deposit (exact for any elapsed time below 2³² ms).
    slot_inverse: u128,
    ratio_ppm: i128,
    reserve_ppm: i128,
    ratio: f64,
    min_per_second: u32,
    window: Duration,
    /// Per stripe, per slot: tag (tick, high 32 bits) and count of first attempts (low 32
    /// bits), and the batch being counted. Every request deposits, so each thread writes its
    /// own stripe.
    firsts: Box<[Stripe]>,
    /// Per slot: tag and count of retries. Only failing requests write here.
    retries: Slots,
    exhausted: AtomicU64,
}

impl RetryBudget {
    /// A builder with the defaults: ratio 0.2, 10 retries per second, a 10 s window.
    pub fn builder() -> RetryBudgetBuilder {
        RetryBudgetBuilder::default()
    }

    /// Records a first attempt, which earns `ratio` of a retry. Reads the clock only once
    /// per 16 deposits of a thread (see above).
    #[inline]
    pub fn deposit(&self) {
        self.deposit_in(stripe_index(), Instant::now);
    }

    /// [`deposit`](Self::deposit) in this thread's stripe (from [`stripe_index`]); `now` is
    /// called only when a new batch starts.
    #[inline]
    pub(crate) fn deposit_in(&self, stripe: usize, now: impl FnOnce() -> Instant) {
        let stripe = &self.inner.firsts[stripe];
        let mut cur = stripe.batch.load(Ordering::Relaxed);
        let count = cur & COUNT_MASK;
        if count != 0 && count < BATCH {
            // The batch goes on: no clock. (A racing thread of this stripe may have started
            // a newer batch: then this deposit is dated later, by less than one batch.)
            match stripe.batch.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
        self.new_batch(stripe, cur, now());
    }

    /// Starts a batch at `now` with this deposit, and files the batch it replaces.
    #[inline(never)]
    fn new_batch(&self, stripe: &Stripe, mut cur: u64, now: Instant) {
        let tick = self.inner.tick_at(now) as u32;
        let fresh = (u64::from(tick) << 32) | 1;
        loop {
            let count = cur & COUNT_MASK;
            // Another thread of the stripe just started a batch this tick: join it.
            let next = if tag_of(cur) == tick && count != 0 && count < BATCH {
                cur + 1
            } else {
                fresh
            };
            match stripe.batch.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) if next == fresh && count != 0 => {
                    let tag = tag_of(cur);
                    add_n(&stripe.slots[tag as usize % SLOTS], tag, count);
                    return;
                }
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes one retry from the budget; `false` (and the [`exhausted`](Self::exhausted)
    /// counter goes up) when the budget is empty.
    pub fn withdraw(&self) -> bool {
        let tick = self.inner.tick();
        let slot = &self.inner.retries.0[tick as usize % SLOTS];
        // Optimistic: count the retry, then check; undo if that overdrew the budget. Racing
        // withdrawals can make each other fail, never both succeed past the balance.
        add(slot, tick as u32);
        if self.inner.balance_ppm(tick) >= 0 {
            true
        } else {
            sub(slot, tick as u32);
            self.inner.exhausted.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Whole retries that could be withdrawn now.
    pub fn balance(&self) -> u64 {
        let bal = self.inner.balance_ppm(self.inner.tick());
        u64::try_from(bal.max(0) / PPM).unwrap_or(u64::MAX)
    }

    /// How many retries were refused because the budget was empty, since the budget was made.
    pub fn exhausted(&self) -> u64 {
        self.inner.exhausted.load(Ordering::Relaxed)
    }

    /// The configured ratio of retries to first attempts.
    pub fn ratio(&self) -> f64 {
        self.inner.ratio
    }

    /// The configured floor of retries per second.
    pub fn min_per_second(&self) -> u32 {
        self.inner.min_per_second
    }

    /// The configured window.
    pub fn window(&self) -> Duration {
        self.inner.window
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudgetBuilder::default()
            .build()
            .expect("default budget configuration is valid")
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.inner.ratio)
            .field("min_per_second", &self.inner.min_per_second)
            .field("window", &self.inner.window)
            .field("balance", &self.balance())
            .field("exhausted", &self.exhausted())
            .finish()
    }
}

impl Inner {
    #[inline]
    fn tick(&self) -> u64 {
        self.tick_at(Instant::now())
    }

    #[inline]
    fn tick_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin);
        let ms = elapsed
            .as_secs()
            .saturating_mul(1000)
            .saturating_add(u64::from(elapsed.subsec_millis()));
        ((u128::from(ms) * self.slot_inverse) >> 64) as u64
    }

    /// Balance in millionths of a retry: reserve + ratio × firsts − retries.
    fn balance_ppm(&self, tick: u64) -> i128 {
        let tick = tick as u32;
        let mut firsts: i128 = 0;
        let mut retries: i128 = 0;
        // Only stripes some thread was given can hold counts.
        let used = NEXT_STRIPE.load(Ordering::Relaxed).min(STRIPES);
        for stripe in &self.firsts[..used] {
            for slot in stripe.slots.iter().chain([&stripe.batch]) {
                firsts += i128::from(count_if_live(slot, tick));
            }
        }
        for slot in &self.retries.0 {
            retries += i128::from(count_if_live(slot, tick));
        }
        self.reserve_ppm + firsts * self.ratio_ppm - retries * PPM
    }
}

const COUNT_MASK: u64 = 0xffff_ffff;

fn tag_of(word: u64) -> u32 {
    (word >> 32) as u32
}

fn count_if_live(slot: &AtomicU64, tick: u32) -> u32 {
    let word = slot.load(Ordering::Relaxed);
    // Only a slot written during the last SLOTS ticks is in the window.
    if tick.wrapping_sub(tag_of(word)) < SLOTS as u32 {
        (word & COUNT_MASK) as u32
    } else {
        0
    }
}

/// Adds one to a slot for `tick`, restarting it if it still holds an older tick.
#[inline]
fn add(slot: &AtomicU64, tick: u32) {
    let mut cur = slot.load(Ordering::Relaxed);
    loop {
        let new = if tag_of(cur) == tick {
            if cur & COUNT_MASK == COUNT_MASK {
                return; // saturated
            }
            cur + 1
        } else {
            (u64::from(tick) << 32) | 1
        };
        match slot.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

/// Adds a filed batch of `n` dated `tick` to its slot: to its count if the slot holds that
/// tick, replacing the slot if it holds an older one, and not at all if it holds a newer
/// one (same slot, so at least a window newer: the batch has left the window).
fn add_n(slot: &AtomicU64, tick: u32, n: u64) {
    let mut cur = slot.load(Ordering::Relaxed);
    loop {
        let tag = tag_of(cur);
        let new = if tag == tick {
            (cur & !COUNT_MASK) | ((cur & COUNT_MASK) + n).min(COUNT_MASK)
        } else if (tag.wrapping_sub(tick) as i32) > 0 {
            return;
        } else {
            (u64::from(tick) << 32) | n
        };
        match slot.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

/// Takes one back from a slot, if it still holds `tick`.
fn sub(slot: &AtomicU64, tick: u32) {
    let mut cur = slot.load(Ordering::Relaxed);
    while tag_of(cur) == tick && cur & COUNT_MASK != 0 {
        match slot.compare_exchange_weak(cur, cur - 1, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

/// Stripes handed out so far (to threads, round robin).
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

/// The calling thread's stripe, below [`STRIPES`].
#[inline]
pub(crate) fn stripe_index() -> usize {
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        let mut v = i.get();
        if v == usize::MAX {
            v = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
            i.set(v);
        }
        v
    })
}

/// Builds a [`RetryBudget`]; see [`RetryBudget::builder`].
#[derive(Debug, Clone)]
pub struct RetryBudgetBuilder {
    ratio: f64,
    min_per_second: u32,
    window: Duration,
}

impl Default for RetryBudgetBuilder {
    fn default() -> Self {
        RetryBudgetBuilder {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

impl RetryBudgetBuilder {
    /// Retries allowed per first attempt in the window, in (0, 10]. Default 0.2.
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// Retries per second allowed whatever the traffic. Default 10.
    pub fn min_per_second(mut self, min_per_second: u32) -> Self {
        self.min_per_second = min_per_second;
        self
    }

    /// How long first attempts and retries are remembered, from 1 s to 60 s. Default 10 s.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Checks the configuration and makes the budget (its state is made here, once).
    pub fn build(self) -> Result<RetryBudget, ConfigError> {
        if !(self.ratio > 0.0 && self.ratio <= 10.0) {
            return Err(ConfigError::new(
                "retry.budget.ratio",
                format!("must be in (0, 10] (got {})", self.ratio),
            ));
        }
        if self.ratio < MIN_RATIO {
            return Err(ConfigError::new(
                "retry.budget.ratio",
                format!("must be at least 0.000001 (got {})", self.ratio),
            ));
        }
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "retry.budget.window",
                format!("must be from 1s to 60s (got {:?})", self.window),
            ));
        }
        let window_ms = self.window.as_millis() as u64;
        let firsts = (0..STRIPES).map(|_| Stripe::new()).collect();
        Ok(RetryBudget {
            inner: Arc::new(Inner {
                // Tick 0 starts now; a word of 0 (tag 0, count 0) counts nothing either way.
                origin: Instant::now(),
                slot_inverse: (u128::from(u64::MAX)
                    / u128::from((window_ms / SLOTS as u64).max(1)))
                    + 1,
                ratio_ppm: (self.ratio * PPM as f64).round() as i128,
                // floor/s × window: min_per_second × window_ms / 1000 retries, in ppm.
                reserve_ppm: i128::from(self.min_per_second) * i128::from(window_ms) * 1000,
                ratio: self.ratio,
                min_per_second: self.min_per_second,
                window: self.window,
                firsts,
                retries: Slots::new(),
                exhausted: AtomicU64::new(0),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn budget(ratio: f64, floor: u32) -> RetryBudget {
        RetryBudget::builder()
            .ratio(ratio)
            .min_per_second(floor)
            .build()
            .unwrap()
    }

    #[test]
    fn validation() {
        for bad in [0.0, -1.0, 10.5, f64::NAN, f64::INFINITY, 1e-9] {
            let err = RetryBudget::builder().ratio(bad).build().unwrap_err();
            assert_eq!(err.field(), "retry.budget.ratio");
        }
        for bad in [
            Duration::ZERO,
            Duration::from_millis(999),
            Duration::from_secs(61),
        ] {
            let err = RetryBudget::builder().window(bad).build().unwrap_err();
            assert_eq!(err.field(), "retry.budget.window");
        }
        assert_eq!(
            RetryBudget::builder()
                .ratio(0.0)
                .build()
                .unwrap_err()
                .to_string(),
            "invalid retry.budget.ratio: must be in (0, 10] (got 0)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn floor_only() {
        let b = budget(0.1, 1);
        assert_eq!(b.balance(), 10);
        for _ in 0..10 {
            assert!(b.withdraw());
        }
        assert!(!b.withdraw());
        assert_eq!(b.exhausted(), 1);
        // The window slides: after it has passed, the floor is available again.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(b.balance(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire() {
        let b = budget(1.0, 0);
        for _ in 0..5 {
            b.deposit();
        }
        assert_eq!(b.balance(), 5);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.balance(), 5);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(b.balance(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_dated_by_its_first_deposit() {
        let b = budget(1.0, 0);
        b.deposit(); // starts a batch at t = 0
        tokio::time::advance(Duration::from_secs(9)).await;
        for _ in 1..BATCH {
            b.deposit(); // same batch, no clock: dated t = 0
        }
        assert_eq!(b.balance(), BATCH);
        b.deposit(); // the 17th starts a batch at t = 9 and files the first
        assert_eq!(b.balance(), BATCH + 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        // At t = 11 the batch of t = 0 has left the window, early for most of it, never
        // late; the deposit of t = 9 is still in.
        assert_eq!(b.balance(), 1);
    }

    #[test]
    fn a_filed_batch_never_overwrites_a_newer_slot() {
        let slot = AtomicU64::new((20u64 << 32) | 3);
        add_n(&slot, 10, 5); // same slot index, a window older: dropped
        assert_eq!(slot.load(Ordering::Relaxed), (20u64 << 32) | 3);
        add_n(&slot, 20, 5);
        assert_eq!(slot.load(Ordering::Relaxed), (20u64 << 32) | 8);
        add_n(&slot, 30, 2); // newer: replaces
        assert_eq!(slot.load(Ordering::Relaxed), (30u64 << 32) | 2);
    }

    #[test]
    fn tick_division_is_exact() {
        for slot_ms in [1u64, 100, 999, 1000, 6000] {
            let inv = (u128::from(u64::MAX) / u128::from(slot_ms)) + 1;
            for ms in (0..100_000u64).chain([u64::from(u32::MAX) - 1, 1 << 31]) {
                assert_eq!(
                    ((u128::from(ms) * inv) >> 64) as u64,
                    ms / slot_ms,
                    "{ms}/{slot_ms}"
                );
            }
        }
    }

    proptest! {
        /// For any ratio and any sequence of deposits and withdrawals in one window,
        /// granted retries never exceed ratio × deposits + floor × window, and a refused
        /// withdrawal means less than one retry was left.
        #[test]
        fn never_over_allocates(
            ratio in 0.000_001f64..=10.0,
            floor in 0u32..5,
            ops in proptest::collection::vec(any::<bool>(), 0..400),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let b = budget(ratio, floor);
                let (mut deposits, mut granted) = (0u64, 0u64);
                for op in ops {
                    if op {
                        b.deposit();
                        deposits += 1;
                    } else if b.withdraw() {
                        granted += 1;
                    } else {
                        // Refused: the exact (scaled) allowance is below granted + 1.
                        let allowance = (ratio * 1e6).round() as i128 * deposits as i128
                            + i128::from(floor) * 10 * 1_000_000;
                        prop_assert!(allowance < (granted as i128 + 1) * 1_000_000);
                    }
                    let allowance = (ratio * 1e6).round() as i128 * deposits as i128
                        + i128::from(floor) * 10 * 1_000_000;
                    prop_assert!(granted as i128 * 1_000_000 <= allowance);
                }
                Ok(())
            })?;
        }
    }
}
